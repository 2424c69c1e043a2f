"""A long-context train step fits where naive attention and full logits would not."""

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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
    cfg = cfg.with_rope(
        RopeConfig("yarn", theta=10000.0, factor=32.0, original_max_position_embeddings=128), T
    )
    model = Llama(cfg, ModelOptions(attention=attention, remat="full"), rngs=nnx.Rngs(0))
    graphdef, params, rest = state_lib.split_model(model)
    mesh = make_mesh(devices=jax.devices()[:1])
    tx = optax.adamw(1e-3)
    state, _ = state_lib.create_state(params, tx, mesh)
    loss_fn = step_lib.make_loss_fn(graphdef, rest, chunk_size=chunk)
    step = jax.jit(step_lib.make_train_step(loss_fn, tx, optax.constant_schedule(1e-3)))
    tokens = np.random.default_rng(0).integers(0, 4096, (1, 1, T)).astype(np.int32)
    batch = {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=-1),
        "loss_mask": np.ones((1, 1, T), np.float32),
        "segment_ids": np.ones((1, 1, T), np.int32),
        "positions": np.arange(T, dtype=np.int32)[None, None],
    }
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


# ---- model.rope: every knob transformers reads, set from the command line ------------------------

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
# (--config.model.rope.* overrides, max_position_embeddings, the rope dict transformers gets)
KNOBS = {
    "yarn": ({"rope_type": "yarn", "factor": 4}, 128, YARN),
    "beta_fast_slow": (
        {"rope_type": "yarn", "factor": 4, "beta_fast": 8, "beta_slow": 2},
        128,
        {**YARN, "beta_fast": 8.0, "beta_slow": 2.0},
    ),
    "beta_fast_falsy": ({"rope_type": "yarn", "factor": 4, "beta_fast": 0}, 128, {**YARN, "beta_fast": 0.0}),
    "mscale": (
        {"rope_type": "yarn", "factor": 4, "mscale": 0.707, "mscale_all_dim": 1.0},
        128,
        {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0},
    ),
    "attention_factor": (
        {"rope_type": "yarn", "factor": 4, "attention_factor": 1.0},
        128,
        {**YARN, "attention_factor": 1.0},
    ),
    "truncate_false": (
        {"rope_type": "yarn", "factor": 4, "truncate": False},
        128,
        {**YARN, "truncate": False},
    ),
    "original": (
        {"rope_type": "yarn", "factor": 8, "original_max_position_embeddings": 16},
        128,
        {**YARN, "factor": 8.0, "original_max_position_embeddings": 16},
    ),
    "rope_theta": (
        {"rope_type": "yarn", "factor": 4, "rope_theta": 500.0},
        128,
        {**YARN, "rope_theta": 500.0},
    ),
    "llama3": (
        {"rope_type": "llama3", "factor": 4, "low_freq_factor": 1, "high_freq_factor": 4},
        128,
        {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "linear": ({"rope_type": "linear", "factor": 2.5}, 80, {"rope_type": "linear", "factor": 2.5}),
    "theta_only": ({"rope_theta": 500.0}, 32, {"rope_type": "default", "rope_theta": 500.0}),
}


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from covenant_jax.convert.api import load_model
    from tests import helpers

    hf = helpers.hf_model(max_position_embeddings=32)
    src = helpers.save_hf(hf, tmp_path_factory.mktemp("rope") / "hf")
    return hf, load_model(src, ModelOptions(), make_mesh(devices=jax.devices()[:1]))


@pytest.mark.parametrize("case", list(KNOBS))
def test_each_rope_knob_reaches_the_model(tiny_hf, case):
    """--config.model.rope.<knob> gives the logits transformers gives with that knob in config.json."""
    import transformers

    from covenant_jax.cli import load_recipe
    from covenant_jax.train import recipe
    from tests import helpers

    knobs, max_pos, scaling = KNOBS[case]
    hf, model = tiny_hf
    overrides = [f"--config.model.rope.{k}={v}" for k, v in knobs.items()]
    cfg = load_recipe(
        "configs/smollm2_sft_cpu.py", overrides + [f"--config.model.max_position_embeddings={max_pos}"]
    )
    checkpoint_cfg = model.config
    try:
        model.config = recipe.rope_override(checkpoint_cfg, cfg.model)
        rope = model.config.rope
        assert {k: getattr(rope, "theta" if k == "rope_theta" else k) for k in knobs} == knobs
        tokens = helpers.random_tokens(96, length=min(max_pos, 100))
        ours = np.asarray(model(jnp.asarray(tokens)))
    finally:
        model.config = checkpoint_cfg
    hf_cfg = copy.deepcopy(hf.config)
    hf_cfg.rope_parameters, hf_cfg.max_position_embeddings = {"rope_theta": 10000.0, **scaling}, max_pos
    reference = transformers.LlamaForCausalLM(hf_cfg).eval()
    reference.load_state_dict(hf.state_dict())
    np.testing.assert_allclose(ours, helpers.reference_logits(reference, tokens), atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "--config.model.rope.scaling_factor=4",
            "unknown key model.rope.scaling_factor; model.rope has: "
            "attention_factor, beta_fast, beta_slow, factor, high_freq_factor, low_freq_factor, mscale, "
            "mscale_all_dim, original_max_position_embeddings, rope_theta, rope_type, truncate",
        ),
        (
            "--config.model.rope.low_freq_factor=1.0",
            "model.rope.low_freq_factor is not read by rope_type "
            "'yarn', which reads: rope_theta, factor, original_max_position_embeddings, beta_fast, beta_slow, "
            "mscale, mscale_all_dim, attention_factor, truncate",
        ),
        ("--config.model.rope.rope_type=dynamic", "model.rope.rope_type='dynamic' is not supported"),
    ],
)
def test_rope_knob_mistakes_name_the_known_knobs(override, message):
    from covenant_jax.cli import load_recipe
    from covenant_jax.config import ModelConfig
    from covenant_jax.errors import UserError
    from covenant_jax.train import recipe

    checkpoint = ModelConfig.from_hf_dict({**TINY, "model_type": "llama"})
    with pytest.raises(UserError, match=re.escape(message)):
        cfg = load_recipe("configs/smollm2_yarn32k_cpu.py", [override])
        recipe.rope_override(checkpoint, cfg.model)
