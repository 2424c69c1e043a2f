"""Train state, created already sharded (never whole on one host).

The state is a plain pytree ``{"step", "params", "opt_state"}`` so Orbax saves and restores
it directly; ``params`` is the model's pure param dict and the model's graph definition stays
outside, static. Optimizer moments get their parameter's sharding via ``optax.tree_map_params``.

An optional ``"frozen"`` subtree holds arrays the step reads but never changes: DPO's reference
params (``frozen["ref_params"]``, sharded like ``params``) and a LoRA model's base weights
(``frozen["base"]``, :func:`split_trained`). They get no gradient and no optimizer state and come
from the model folder on every start, so they are not checkpointed (:func:`saved_part`) and
:func:`attach_frozen` puts them back after a restore.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from covenant_jax.model.llama import Llama

BASE = "base"  # frozen[BASE]: a LoRA model's base weights


def split_model(model: Llama) -> tuple[nnx.GraphDef, dict, nnx.State]:
    """(graphdef, pure param dict, the rest of the state) of a model that trains every weight —
    merge them back with ``nnx.merge``. A LoRA model splits with :func:`split_trained`."""
    if model.options.lora is not None:
        raise ValueError("a LoRA model trains its adapters only: split it with split_trained")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def split_trained(model: Llama) -> tuple[nnx.GraphDef, dict, dict | None, nnx.State]:
    """(graphdef, trained params, frozen or None, rest), params as pure dicts: a LoRA model
    trains its adapters (``nnx.LoRAParam``) and reads its base as ``frozen["base"]``; any other
    model trains every ``Param``. :func:`merge_trained` puts them back together."""
    if model.options.lora is None:
        graphdef, params, rest = split_model(model)
        return graphdef, params, None, rest
    graphdef, adapters, base, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(adapters), {BASE: nnx.to_pure_dict(base)}, rest


def merge_trained(graphdef: nnx.GraphDef, params: dict, frozen: dict | None, rest: nnx.State) -> Llama:
    """The model of :func:`split_trained`'s parts (inside a jitted step: the traced arrays)."""
    base = (frozen or {}).get(BASE)
    return nnx.merge(graphdef, params, rest) if base is None else nnx.merge(graphdef, params, base, rest)


def state_shardings(
    params: dict, tx: optax.GradientTransformation, mesh: Mesh, frozen: dict | None = None
) -> dict:
    replicated = NamedSharding(mesh, P())
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}
    if frozen is not None:
        shardings["frozen"] = jax.tree.map(lambda x: x.sharding, frozen)
    return shardings


def create_state(
    params: dict, tx: optax.GradientTransformation, mesh: Mesh, frozen: dict | None = None
) -> tuple[dict, dict]:
    """(state, its shardings); the optimizer state is initialised on its shardings, for
    ``params`` only (``frozen`` has none). ``frozen`` must not share buffers with ``params``
    (the step donates both)."""
    shardings = state_shardings(params, tx, mesh, frozen)
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    state = {"step": step, "params": params, "opt_state": opt_state}
    if frozen is not None:
        state["frozen"] = frozen
    return state, shardings


def saved_part(tree: dict) -> dict:
    """What a checkpoint holds (and its digests cover): the state (or its shardings) without
    ``frozen``."""
    return {k: v for k, v in tree.items() if k != "frozen"}


def attach_frozen(restored: dict, state: dict) -> dict:
    """A restored state with ``state``'s frozen arrays (loaded from the model folder) put back."""
    return {**restored, "frozen": state["frozen"]} if "frozen" in state else restored


def copy_tree(tree: Any) -> Any:
    """A copy of every array on its own sharding: a frozen copy the donated step cannot alias to
    the params it was copied from."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t))(tree)


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings: the target Orbax restores onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
