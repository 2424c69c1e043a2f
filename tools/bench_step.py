"""What the training-step benchmarks share: a one-device train step and a random batch.

Imported by tools/bench_train.py and tools/bench_remat.py (run as scripts, so this folder is on
``sys.path``).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
import optax

from covenant_jax.parallel.sharding import make_mesh
from covenant_jax.train import state as state_lib, step as step_lib


def one_device_step(model, lr: float, loss_chunk_size: int) -> tuple[Callable, Any]:
    """(jitted AdamW train step with the state donated, its initial state) on the first device."""
    graphdef, params, rest = state_lib.split_model(model)
    tx = optax.adamw(lr)
    state, _ = state_lib.create_state(params, tx, make_mesh(devices=jax.devices()[:1]))
    loss_fn = step_lib.make_loss_fn(graphdef, rest, chunk_size=loss_chunk_size)
    return jax.jit(
        step_lib.make_train_step(loss_fn, tx, optax.constant_schedule(lr)), donate_argnums=0
    ), state


def random_batch(vocab: int, rows: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One micro-batch of ``rows`` unpacked rows of random tokens (every token trained)."""
    tokens = np.random.default_rng(seed).integers(0, vocab, (1, rows, seq)).astype(np.int32)
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, -1),
        "loss_mask": np.ones_like(tokens, np.float32),
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), tokens.shape),
    }


def time_steps(step: Callable, state: Any, batch: Any, steps: int, warmup: int) -> tuple[Any, Any, float]:
    """Runs ``warmup`` then ``steps`` steps; returns (state, last metrics, seconds per timed step)."""
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return state, metrics, (time.perf_counter() - start) / steps
