"""The pure, jitted train and eval steps.

``train_step(state, batch) -> (state, metrics)``. The batch carries a leading micro-batch axis
``[A, b, T]``; gradients of the summed token loss are accumulated over the A micro-batches in
float32 and divided once by the total number of trained tokens, so accumulation and packing
weigh every token equally. Updates are skipped on the device when the loss or gradients are not
finite (``optax.apply_if_finite``), so the state stays the last good one; the loop then stops.
Finite gradients can still give a non-finite state (a huge learning rate, an overflowing
moment): ``state_finite`` checks the updated params and optimizer state, and the loop never
saves a state whose step failed either check. (Selecting the old state on device instead would
keep two copies of the state alive at once: +2/3 of its size in temporaries, measured.)

``state["frozen"]`` (a LoRA model's base, state.py) is read by the loss and passed through the
donated step unchanged: no gradient, no optimizer state. With LoRA dropout, the step splits
``fold_in(key(seed), step)`` into one key per micro-batch and scans them with the batch, so a
resumed run draws the masks the uninterrupted one drew.

Axes: A micro-batches, B/b rows, T sequence.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from covenant_jax.train import state as state_lib
from covenant_jax.train.loss import cross_entropy_sum

Batch = dict[str, jax.Array]
DROPOUT_KEY = "dropout_key"  # a train batch's per-micro-batch dropout keys (LoRA dropout)


def make_loss_fn(graphdef: nnx.GraphDef, rest: nnx.State, chunk_size: int,
                 unroll: bool = False) -> Callable:
    """loss(params, batch[b, T], frozen) -> (summed token loss, trained token count); a batch
    field ``dropout_key`` (:func:`with_dropout_keys`) turns adapter dropout on. ``unroll``: the
    loss chunks as an unrolled loop (for the compiler's cost model, which counts a loop body once)."""

    def loss_fn(params: dict, batch: Batch, frozen: dict | None = None) -> tuple[jax.Array, jax.Array]:
        model = state_lib.merge_trained(graphdef, params, frozen, rest)
        hidden_BTD = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"],
                                         dropout_key=batch.get(DROPOUT_KEY))
        return cross_entropy_sum(hidden_BTD, model.output_kernel(), batch["targets"],
                                 batch["loss_mask"], chunk_size=chunk_size, unroll=unroll)

    return loss_fn


def with_dropout_keys(batch_A: Batch, seed: int | None, step: jax.Array) -> Batch:
    """``batch_A`` with one dropout key per micro-batch, split from ``fold_in(key(seed), step)``
    (a resumed run draws the masks the uninterrupted one drew); unchanged for ``seed`` None."""
    if seed is None:
        return batch_A
    micro_batches = jax.tree.leaves(batch_A)[0].shape[0]
    return {**batch_A, DROPOUT_KEY: jax.random.split(jax.random.fold_in(jax.random.key(seed), step), micro_batches)}


def accumulate_gradients(loss_fn: Callable, params: dict, batch_A: Batch, frozen: dict | None = None,
                         unroll: bool = False):
    """Summed loss, token count and float32 gradients (of ``params`` only: ``frozen`` is read)
    of the summed loss over micro-batches (``unroll``: as an unrolled loop)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(carry, micro_batch):
        grads_acc, loss_acc, count_acc = carry
        (loss_sum, count), grads = grad_fn(params, micro_batch, frozen)
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        return (grads_acc, loss_acc + loss_sum, count_acc + count), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, loss_sum, count), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), batch_A,
                                               unroll=unroll)
    return grads, loss_sum, count


def all_finite(tree: Any) -> jax.Array:
    """One bool: every float element of ``tree`` is finite (a read-only reduction per array)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(checks).all() if checks else jnp.bool_(True)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    unroll: bool = False, dropout_seed: int | None = None):
    """``unroll``: the micro-batch loop unrolled (plan's cost model); ``dropout_seed`` None: no
    dropout (the model has none, or its rate is 0)."""

    def train_step(state: dict[str, Any], batch_A: Batch):
        params = state["params"]
        batch_A = with_dropout_keys(batch_A, dropout_seed, state["step"])
        grads, loss_sum, count = accumulate_gradients(loss_fn, params, batch_A, state.get("frozen"), unroll)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        metrics = {
            "loss": loss, "tokens": count, "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        new_state = {**state, "step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        metrics["state_finite"] = all_finite((new_state["params"], opt_state))
        return new_state, metrics

    return train_step


def make_eval_step(loss_fn: Callable):
    """``eval_step(params, frozen, batch[B, T]) -> (loss sum, token count)``, no dropout."""

    def eval_step(params: dict, frozen: dict | None, batch: Batch) -> tuple[jax.Array, jax.Array]:
        return loss_fn(params, batch, frozen)

    return eval_step
