"""A long-context train step fits where naive attention and full logits would not."""

import jax
import numpy as np
import optax
from flax import nnx

from covenant_jax.config import ModelConfig, RopeConfig
from covenant_jax.model.llama import Llama, ModelOptions
from covenant_jax.parallel.sharding import make_mesh
from covenant_jax.train import state as state_lib, step as step_lib
from tests.helpers import TINY

T = 4096
BUDGET = 64 * 2**20  # the test's memory budget for one step's temporaries


def _compiled_step(attention: str, chunk: int, run: bool = False):
    cfg = ModelConfig.from_hf_dict({**TINY, "model_type": "llama", "vocab_size": 4096})
    cfg = cfg.with_rope(RopeConfig("yarn", theta=10000.0, factor=32.0, original_max_position_embeddings=128), T)
    model = Llama(cfg, ModelOptions(attention=attention, remat="full"), rngs=nnx.Rngs(0))
    graphdef, params, rest = state_lib.split_model(model)
    mesh = make_mesh(devices=jax.devices()[:1])
    tx = optax.adamw(1e-3)
    state, _ = state_lib.create_state(params, tx, mesh)
    loss_fn = step_lib.make_loss_fn(graphdef, rest, chunk_size=chunk)
    step = jax.jit(step_lib.make_train_step(loss_fn, tx, optax.constant_schedule(1e-3)))
    tokens = np.random.default_rng(0).integers(0, 4096, (1, 1, T)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=-1),
             "loss_mask": np.ones((1, 1, T), np.float32),
             "segment_ids": np.ones((1, 1, T), np.int32),
             "positions": np.arange(T, dtype=np.int32)[None, None]}
    compiled = step.lower(state, batch).compile()
    metrics = step(state, batch)[1] if run else None
    return compiled.memory_analysis().temp_size_in_bytes, metrics


def test_long_step_fits_the_budget_where_naive_does_not():
    # Naive attention holds [N, T, T] fp32 scores per layer; unchunked loss holds [T, V] logits.
    naive_bytes = TINY["num_attention_heads"] * T * T * 4 + T * 4096 * 4
    assert naive_bytes > 4 * BUDGET
    temp, metrics = _compiled_step("blockwise", chunk=512, run=True)
    assert temp < BUDGET, f"{temp / 2**20:.1f} MiB"
    assert bool(metrics["finite"]) and float(metrics["tokens"]) == T
    assert abs(float(metrics["loss"]) - np.log(4096)) < 0.5  # a random model: ~ln(V)
