"""What one training step is, in one place: the batch (its fields, dtypes, shapes and shardings
from the rule table), the abstract model and state, and the jitted steps.

The loop runs these on real arrays, ``plan`` lowers them on abstract ones for a TPU topology,
evaluation feeds the same batches; nothing else restates them.

Batch contract (each field [rows, T], or [A, rows / A, T] with A micro-batches): ``tokens``,
``targets`` (the next token of the same sample, else padding), ``loss_mask`` (1 where the
target is trained), ``segment_ids`` (1, 2, ... per packed sample; 0 = padding), ``positions``
(restarting at 0 per sample). Rows are sharded over the ``batch`` rule's mesh axes, T over
``seq``'s. DPO batches add ``pair_slot`` and ``chosen`` (and ``ref_logp`` when the reference
log-probs are precomputed): see :mod:`covenant_jax.train.preference`.

``train.objective`` picks what the step minimises (:class:`step.Objective`): ``sft`` (token
cross-entropy) or ``dpo``. DPO's in-step reference is a frozen copy of the starting model in the
state (``state["frozen"]["ref_params"]``), sharded like the params; with LoRA it is the model's
own frozen base with the adapters off (no copy).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from covenant_jax.config import ModelConfig
from covenant_jax.data import pairs
from covenant_jax.model import lora as lora_lib
from covenant_jax.model.llama import ModelOptions, abstract_model
from covenant_jax.parallel.sharding import logical_to_spec, state_shardings
from covenant_jax.train import metrics as metrics_lib
from covenant_jax.train import optimizer, preference
from covenant_jax.train import state as state_lib
from covenant_jax.train import step as step_lib

OBJECTIVES = ("sft", "dpo")  # train.objective
BATCH_FIELDS = {
    "tokens": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "segment_ids": np.int32,
    "positions": np.int32,
}
PAIR_FIELDS = {"pair_slot": np.int32, "chosen": np.int32}
REF_FIELDS = {"ref_logp": np.float32}
_PAD = {"pair_slot": -1}  # padding values other than 0 (tokens and targets: the pad id)


def is_dpo(cfg) -> bool:
    return cfg.train.objective == "dpo"


def in_step_reference(cfg) -> bool:
    """DPO's reference runs in the step (a frozen model in the state) unless precomputed."""
    return is_dpo(cfg) and not cfg.dpo.precompute_ref_log_probs


def batch_fields(cfg) -> dict[str, type]:
    """The batch's fields and dtypes for the recipe's objective."""
    if not is_dpo(cfg):
        return dict(BATCH_FIELDS)
    extra = REF_FIELDS if cfg.dpo.precompute_ref_log_probs else {}
    return {**BATCH_FIELDS, **PAIR_FIELDS, **extra}


def pairs_per_row(cfg) -> int:
    """K, the most pairs a packed row holds (the packer's bound; :func:`pairs.pairs_per_row`)."""
    return pairs.pairs_per_row(cfg.data.seq_len, cfg.data.max_samples_per_row)


def flops_per_token(cfg, model_cfg: ModelConfig) -> float:
    """The model FLOPs of one trained token (MFU's numerator, plan's step time at 100% MFU): with
    the recipe's adapters, and DPO's reference forward when it runs in the step."""
    return metrics_lib.train_flops_per_token(
        model_cfg, cfg.data.seq_len, lora_config(cfg), reference_forward=in_step_reference(cfg)
    )


def lora_config(cfg) -> lora_lib.LoraConfig | None:
    """The recipe's adapters (``model.lora``, checked: rank >= 1, known targets, ...), or None
    without LoRA."""
    section = cfg.model.lora
    if not section.enabled:
        return None
    return lora_lib.LoraConfig(
        rank=section.rank,
        alpha=section.alpha,
        dropout=section.dropout,
        targets=tuple(section.targets),
        rslora=section.rslora,
        base_dtype=section.base_dtype,
    )


def model_options(cfg) -> ModelOptions:
    """How the recipe runs the model (``model.*`` and the packed-row bound)."""
    return ModelOptions(
        param_dtype=cfg.model.param_dtype,
        dtype=cfg.model.dtype,
        remat=cfg.model.remat,
        attention=cfg.model.attention,
        max_samples_per_row=cfg.data.max_samples_per_row,
        lora=lora_config(cfg),
    )


# ---- the batch ----------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, rows: int, seq_len: int, micro_batched: bool) -> NamedSharding:
    """Rows over the ``batch`` rule's axes, T over ``seq``'s; a leading micro-batch axis whole."""
    spec = logical_to_spec(("batch", "seq"), (rows, seq_len), mesh)
    return NamedSharding(mesh, P(None, *spec) if micro_batched else spec)


def abstract_batch(
    rows: int, seq_len: int, micro_batches: int, sharding: NamedSharding, fields: dict | None = None
) -> dict:
    """The [A, rows / A, T] train batch (``fields``: :func:`batch_fields`, SFT's by default) as
    ShapeDtypeStructs on ``sharding``."""
    shape = (micro_batches, rows // micro_batches, seq_len)
    return {k: jax.ShapeDtypeStruct(shape, d, sharding=sharding) for k, d in (fields or BATCH_FIELDS).items()}


def padding_batch(rows: int, seq_len: int, pad_id: int, fields: dict | None = None) -> dict[str, np.ndarray]:
    """Rows of padding (no tokens, no loss): what a process feeds once its share of a pass ends."""
    fill = {"tokens": pad_id, "targets": pad_id, **_PAD}
    return {k: np.full((rows, seq_len), fill.get(k, 0), d) for k, d in (fields or BATCH_FIELDS).items()}


def host_layout(cfg, mesh: Mesh, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zig-zag context parallelism balances causal work by reordering T once, on the host."""
    if cfg.model.attention == "context_zigzag":
        from covenant_jax.model.context_parallel import zigzag_permute

        return zigzag_permute(batch, mesh.shape["context"])
    return batch


def token_order(cfg, mesh: Mesh, x_BT: np.ndarray) -> np.ndarray:
    """A [B, T] result of a :func:`host_layout` batch back in token order."""
    if cfg.model.attention == "context_zigzag":
        from covenant_jax.model.context_parallel import zigzag_order

        return np.take(x_BT, np.argsort(zigzag_order(x_BT.shape[-1], mesh.shape["context"])), axis=-1)
    return x_BT


def device_batch(batch: dict[str, np.ndarray], sharding: NamedSharding, micro_batches: int | None) -> dict:
    """This process's host rows [rows, T] -> global arrays, [A, b, T] when micro-batched."""

    def put(x):
        if micro_batches is not None:
            x = x.reshape(micro_batches, -1, *x.shape[1:])
        global_shape = list(x.shape)
        global_shape[1 if micro_batches is not None else 0] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

    return {k: put(v) for k, v in batch.items()}


# ---- the state ----------------------------------------------------------------------------------


@dataclasses.dataclass
class AbstractState:
    """A model's graph and the train state as sharded ShapeDtypeStructs (no weights anywhere)."""

    graphdef: nnx.GraphDef
    rest: nnx.State
    tx: Any
    schedule: Any
    state: dict
    shardings: dict


def abstract_state(
    cfg, model_cfg: ModelConfig, mesh: Mesh, options: ModelOptions | None = None
) -> AbstractState:
    """What ``plan`` compiles and a restore targets: params, optimizer state and step on ``mesh``
    (``options``: how the model runs, the recipe's by default), and with LoRA the frozen base
    (``state["frozen"]``: no optimizer state)."""
    model = abstract_model(model_cfg, options or model_options(cfg))
    graphdef, params, frozen, rest = state_lib.split_trained(model)
    params, frozen = _placed(model, params, frozen, mesh)
    tx, schedule = optimizer.make_optimizer(cfg.optim, cfg.train.steps)
    if holds_reference_copy(cfg):  # DPO's reference: a frozen copy of the starting weights
        frozen = {**(frozen or {}), "ref_params": params}
    shardings = state_lib.state_shardings(params, tx, mesh, frozen)
    state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": params,
        "opt_state": jax.eval_shape(tx.init, params),
    }
    if frozen is not None:
        state["frozen"] = frozen
    return AbstractState(graphdef, rest, tx, schedule, state_lib.abstract_like(state, shardings), shardings)


def _placed(model, params: dict, frozen: dict | None, mesh: Mesh) -> tuple[dict, dict | None]:
    """(params, frozen) of :func:`state.split_trained` on an abstract ``model`` as
    ShapeDtypeStructs with each weight's sharding."""
    shardings = traverse_util.flatten_dict(
        nnx.to_pure_dict(state_shardings(nnx.state(model, nnx.Param), mesh))
    )

    def placed(tree):
        return traverse_util.unflatten_dict(
            {
                path: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=shardings[path])
                for path, p in traverse_util.flatten_dict(tree).items()
            }
        )

    return placed(params), None if frozen is None else {k: placed(v) for k, v in frozen.items()}


# ---- the steps ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Steps:
    train_step: Any  # jitted (state, batch[A, b, T]) -> (state, metrics)
    eval_step: Any  # jitted (params, frozen, batch[B, T]) -> (sums, totals)
    batch_sharding: NamedSharding  # of a [A, b, T] train batch
    eval_sharding: NamedSharding  # of a [B, T] eval batch
    objective: step_lib.Objective  # its ``report`` turns an eval pass's sums into metrics
    fields: dict  # the batch's fields and dtypes


def reference_forward(cfg, graphdef, rest, unroll: bool = False) -> preference.Reference:
    """DPO's reference model, run in the step or in the pass before training: a LoRA model's own
    base with the adapters off, else the frozen copy ``frozen["ref_params"]``."""
    chunk = cfg.train.loss_chunk_size
    if lora_config(cfg) is not None:
        return preference.adapters_off_reference(graphdef, rest, chunk, unroll)
    return preference.frozen_model_reference(graphdef, rest, chunk, unroll)


def holds_reference_copy(cfg) -> bool:
    """The state holds a frozen copy of the reference's weights (``frozen["ref_params"]``): DPO
    with the reference in the step, without LoRA (whose reference is its own base)."""
    return in_step_reference(cfg) and lora_config(cfg) is None


def make_objective(cfg, graphdef, rest, unroll: bool = False) -> step_lib.Objective:
    """The recipe's ``train.objective``, with DPO's reference strategy (``unroll``: the loss
    chunks' loops unrolled)."""
    chunk = cfg.train.loss_chunk_size
    if not is_dpo(cfg):
        return step_lib.sft_objective(step_lib.make_loss_fn(graphdef, rest, chunk, unroll))
    reference = (
        reference_forward(cfg, graphdef, rest, unroll)
        if in_step_reference(cfg)
        else preference.precomputed_reference
    )
    return preference.dpo_objective(
        graphdef,
        rest,
        cfg.dpo,
        chunk_size=chunk,
        pairs_per_row=pairs_per_row(cfg),
        reference=reference,
        unroll=unroll,
    )


def make_steps(cfg, graphdef, rest, tx, schedule, shardings: dict, mesh: Mesh, unroll: bool = False) -> Steps:
    """The jitted steps with explicit shardings and donation (the frozen weights, when there are
    any, pass through the donated state unchanged: their buffers are aliased, not copied).
    ``unroll``: the micro-batch and loss-chunk loops unrolled (``plan``'s step time estimate; the
    compiler's cost model counts a loop body once)."""
    objective = make_objective(cfg, graphdef, rest, unroll)
    rows, seq_len = cfg.data.batch_size // cfg.train.micro_batches, cfg.data.seq_len
    train_sharding = batch_sharding(mesh, rows, seq_len, micro_batched=True)
    eval_sharding = batch_sharding(mesh, cfg.data.batch_size, seq_len, micro_batched=False)
    lora = lora_config(cfg)
    dropout_seed = cfg.train.seed if lora is not None and lora.dropout > 0 else None
    train_step = jax.jit(
        step_lib.make_train_step(objective, tx, schedule, unroll, dropout_seed=dropout_seed),
        in_shardings=(shardings, train_sharding),
        out_shardings=(shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        step_lib.make_eval_step(objective),
        in_shardings=(shardings["params"], shardings.get("frozen", {}), eval_sharding),
    )
    return Steps(train_step, eval_step, train_sharding, eval_sharding, objective, batch_fields(cfg))
