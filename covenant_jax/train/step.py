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

Axes: A micro-batches, B/b rows, T sequence.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from covenant_jax.train.loss import cross_entropy_sum

Batch = dict[str, jax.Array]


def make_loss_fn(graphdef: nnx.GraphDef, rest: nnx.State, chunk_size: int,
                 unroll: bool = False) -> Callable:
    """loss(params, batch[b, T]) -> (summed token loss, trained token count). ``unroll``: the loss
    chunks as an unrolled loop (for the compiler's cost model, which counts a loop body once)."""

    def loss_fn(params: dict, batch: Batch) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, params, rest)
        hidden_BTD = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
        return cross_entropy_sum(hidden_BTD, model.output_kernel(), batch["targets"],
                                 batch["loss_mask"], chunk_size=chunk_size, unroll=unroll)

    return loss_fn


def accumulate_gradients(loss_fn: Callable, params: dict, batch_A: Batch, unroll: bool = False):
    """Summed loss, token count and float32 gradients of the summed loss over micro-batches
    (``unroll``: as an unrolled loop)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(carry, micro_batch):
        grads_acc, loss_acc, count_acc = carry
        (loss_sum, count), grads = grad_fn(params, micro_batch)
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
                    unroll: bool = False):
    def train_step(state: dict[str, Any], batch_A: Batch):
        params = state["params"]
        grads, loss_sum, count = accumulate_gradients(loss_fn, params, batch_A, unroll)
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
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        metrics["state_finite"] = all_finite((new_state["params"], opt_state))
        return new_state, metrics

    return train_step


def make_eval_step(loss_fn: Callable):
    def eval_step(params: dict, batch: Batch) -> tuple[jax.Array, jax.Array]:
        return loss_fn(params, batch)

    return eval_step
