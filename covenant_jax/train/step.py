"""The pure, jitted train and eval steps, and the objective a step minimises.

``train_step(state, batch) -> (state, metrics)``. The batch carries a leading micro-batch axis
``[A, b, T]``. An :class:`Objective` says what is minimised: a sum of parts, each a sum over
the batch divided by a batch-wide total that depends on the batch alone (trained tokens for
SFT; valid pairs, and chosen answer tokens for DPO's ``sft`` term), so the totals are known
before any forward and every micro-batch's loss is already normalised by the whole batch's:
accumulating A micro-batches' gradients (float32) equals the full batch's exactly, and packing
weighs every token (or pair) equally. Updates are skipped on the device when the loss or
gradients are not finite (``optax.apply_if_finite``), so the state stays the last good one; the
loop then stops. Finite gradients can still give a non-finite state (a huge learning rate, an
overflowing moment): ``state_finite`` checks the updated params and optimizer state, and the
loop never saves a state whose step failed either check. (Selecting the old state on device
instead would keep two copies of the state alive at once: +2/3 of its size in temporaries,
measured.)

The state is ``{"step", "params", "opt_state"}`` plus, for an objective that reads a frozen
model in the step (DPO's in-step reference, a LoRA model's base: state.py), ``"frozen"``: never
differentiated, never in the optimizer, passed through the donated step unchanged. With LoRA
dropout, the step splits ``fold_in(key(seed), step)`` into one key per micro-batch, carried in
the batch (``dropout_key``), so a resumed run draws the masks the uninterrupted one drew.

Axes: A micro-batches, B/b rows, T sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from covenant_jax.train import state as state_lib
from covenant_jax.train.loss import cross_entropy_sum

Batch = dict[str, jax.Array]
DROPOUT_KEY = "dropout_key"  # a train batch's per-micro-batch dropout keys (LoRA dropout)
Sums = dict[str, jax.Array]


def mean(total, count):
    """``total / count``, 0 when nothing was counted: on device, or on host floats (float64,
    for sums added over eval batches)."""
    if isinstance(count, jax.Array):
        return total / jnp.maximum(count, 1.0)
    return total / max(float(count), 1.0)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a step minimises, in three pure functions.

    * ``totals(batch) -> dict``: the batch-wide normalisers, from the batch alone (any leading
      axes: a whole [A, b, T] train batch or one [B, T] eval batch);
    * ``loss(params, frozen, batch, totals) -> (loss, sums)``: one micro-batch's share of the
      loss, each part already divided by its total, and the sums its metrics are made of;
    * ``report(sums, totals) -> dict``: the logged means (``loss`` and ``tokens`` among them),
      from sums added over micro-batches (in the step) or over eval batches (on the host).
    """

    totals: Callable[[Batch], Sums]
    loss: Callable[[dict, dict, Batch, Sums], tuple[jax.Array, Sums]]
    report: Callable[[Sums, Sums], dict]


def make_loss_fn(graphdef: nnx.GraphDef, rest: nnx.State, chunk_size: int, unroll: bool = False) -> Callable:
    """loss(params, batch[b, T], frozen) -> (summed token loss, trained token count); a batch
    field ``dropout_key`` (:func:`with_dropout_keys`) turns adapter dropout on. ``unroll``: the
    loss chunks as an unrolled loop (for the compiler's cost model, which counts a loop body once)."""

    def loss_fn(params: dict, batch: Batch, frozen: dict | None = None) -> tuple[jax.Array, jax.Array]:
        model = state_lib.merge_trained(graphdef, params, frozen, rest)
        hidden_BTD = model.hidden_states(
            batch["tokens"], batch["positions"], batch["segment_ids"], dropout_key=batch.get(DROPOUT_KEY)
        )
        return cross_entropy_sum(
            hidden_BTD,
            model.output_kernel(),
            batch["targets"],
            batch["loss_mask"],
            chunk_size=chunk_size,
            unroll=unroll,
        )

    return loss_fn


def with_dropout_keys(batch_A: Batch, seed: int | None, step: jax.Array) -> Batch:
    """``batch_A`` with one dropout key per micro-batch, split from ``fold_in(key(seed), step)``
    (a resumed run draws the masks the uninterrupted one drew); unchanged for ``seed`` None."""
    if seed is None:
        return batch_A
    micro_batches = jax.tree.leaves(batch_A)[0].shape[0]
    return {
        **batch_A,
        DROPOUT_KEY: jax.random.split(jax.random.fold_in(jax.random.key(seed), step), micro_batches),
    }


def sft_objective(loss_fn: Callable) -> Objective:
    """The token cross-entropy ``loss_fn`` (:func:`make_loss_fn`) over all trained tokens."""

    def totals(batch: Batch) -> Sums:
        return {"tokens": jnp.sum(batch["loss_mask"].astype(jnp.float32))}

    def loss(params, frozen, batch, totals):
        nll_sum, _ = loss_fn(params, batch, frozen)
        return mean(nll_sum, totals["tokens"]), {"nll": nll_sum}

    def report(sums, totals):
        return {"loss": mean(sums["nll"], totals["tokens"]), "tokens": totals["tokens"]}

    return Objective(totals, loss, report)


def as_objective(objective: Objective | Callable) -> Objective:
    """An Objective as given; a plain ``loss_fn(params, batch) -> (sum, count)`` as SFT's."""
    return objective if isinstance(objective, Objective) else sft_objective(objective)


def accumulate_gradients(
    objective: Objective, params: dict, frozen: dict, batch_A: Batch, totals: Sums, unroll: bool = False
) -> tuple[Any, Sums]:
    """float32 gradients (of ``params`` only: ``frozen`` is read) of the loss and its sums,
    added over the A micro-batches (``unroll``: as an unrolled loop)."""
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)

    def body(carry, micro_batch):
        grads_acc, sums_acc = carry
        (_, sums), grads = grad_fn(params, frozen, micro_batch, totals)
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        return (grads_acc, jax.tree.map(jnp.add, sums_acc, sums)), None

    first = jax.tree.map(lambda x: x[0], batch_A)
    sums_shape = jax.eval_shape(lambda: objective.loss(params, frozen, first, totals)[1])
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), sums_shape)
    (grads, sums), _ = jax.lax.scan(body, (zeros, sums0), batch_A, unroll=unroll)
    return grads, sums


def all_finite(tree: Any) -> jax.Array:
    """One bool: every float element of ``tree`` is finite (a read-only reduction per array)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(checks).all() if checks else jnp.bool_(True)


def make_train_step(
    objective: Objective | Callable,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    unroll: bool = False,
    dropout_seed: int | None = None,
):
    """``train_step(state, batch[A, b, T]) -> (state, metrics)``; ``objective`` may be a plain
    SFT ``loss_fn``; ``unroll``: the micro-batch loop unrolled (plan's cost model);
    ``dropout_seed`` None: no dropout (the model has none, or its rate is 0)."""
    objective = as_objective(objective)

    def train_step(state: dict[str, Any], batch_A: Batch):
        params, frozen = state["params"], state.get("frozen", {})
        totals = objective.totals(batch_A)
        batch_A = with_dropout_keys(batch_A, dropout_seed, state["step"])
        grads, sums = accumulate_gradients(objective, params, frozen, batch_A, totals, unroll)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        metrics = dict(objective.report(sums, totals))
        grad_norm = optax.tree.norm(grads)
        metrics.update(
            grad_norm=grad_norm,
            lr=schedule(state["step"]),
            finite=jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm),
        )
        new_state = {
            **state,
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
        }
        metrics["state_finite"] = all_finite((new_state["params"], opt_state))
        return new_state, metrics

    return train_step


def make_eval_step(objective: Objective | Callable):
    """``eval_step(params, frozen, batch[B, T]) -> (sums, totals)`` of one batch: the caller adds
    them over batches and reports ``objective.report(sums, totals)``."""
    objective = as_objective(objective)

    def eval_step(params: dict, frozen: dict, batch: Batch) -> tuple[Sums, Sums]:
        totals = objective.totals(batch)
        return objective.loss(params, frozen, batch, totals)[1], totals

    return eval_step
