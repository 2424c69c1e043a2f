"""Logits parity with transformers (PyTorch, fp32) for the config matrix, 1 device and 8."""

import jax.numpy as jnp
import numpy as np
import pytest

from covenant_jax.convert.api import load_model
from covenant_jax.model.llama import ModelOptions
from covenant_jax.parallel.sharding import make_mesh
from tests import helpers

FP32 = ModelOptions(param_dtype="float32", dtype="float32")

CASES = {
    "gqa_untied": dict(),
    "tied_mha": dict(tie_word_embeddings=True, num_key_value_heads=4),
    "head_dim_override_bias": dict(head_dim=24, attention_bias=True, mlp_bias=True),
    "linear": dict(rope_scaling={"type": "linear", "factor": 3.0}),
    "llama3": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 32,
        }
    ),
    "yarn_knobs": dict(
        max_position_embeddings=256,
        rope_scaling={
            "type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "mscale": 0.9,
            "mscale_all_dim": 0.5,
            "truncate": False,
        },
    ),
    "yarn_attention_factor": dict(
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "attention_factor": 1.3,
        }
    ),
    "mistral": dict(architecture="mistral", sliding_window=None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mesh_shape", [None, {"fsdp": 2, "tensor": 4}], ids=["1dev", "fsdp2xtensor4"])
def test_logits_match_transformers(tmp_path, case, mesh_shape):
    overrides = dict(CASES[case])
    architecture = overrides.pop("architecture", "llama")
    hf = helpers.hf_model(architecture=architecture, **overrides)
    folder = helpers.save_hf(hf, tmp_path / "hf")
    mesh = helpers.one_device_mesh() if mesh_shape is None else make_mesh(mesh_shape)
    model = load_model(folder, FP32, mesh)
    # Positions past original_max_position_embeddings exercise the scaled frequencies.
    tokens = helpers.random_tokens(hf.config.vocab_size, length=96)
    ours = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, helpers.reference_logits(hf, tokens), atol=1e-4, rtol=0)


def test_v4_rope_spelling_reads_the_same(tmp_path):
    hf = helpers.hf_model(
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    )
    v5 = load_model(helpers.save_hf(hf, tmp_path / "v5"), FP32, helpers.one_device_mesh())
    v4 = load_model(helpers.save_hf(hf, tmp_path / "v4", v4_rope=True), FP32, helpers.one_device_mesh())
    assert v4.config.rope == v5.config.rope
    assert v4.config.rope.rope_type == "yarn" and v4.config.rope.factor == 4.0


def test_positions_and_segments_are_honoured(tmp_path):
    """Two samples packed in one row give the same logits as each run alone."""
    hf = helpers.hf_model()
    model = load_model(helpers.save_hf(hf, tmp_path / "hf"), FP32, helpers.one_device_mesh())
    a, b = helpers.random_tokens(96, 1, 20, seed=1), helpers.random_tokens(96, 1, 12, seed=2)
    packed = jnp.asarray(np.concatenate([a, b], axis=1))
    positions = jnp.asarray(np.concatenate([np.arange(20), np.arange(12)])[None])
    segments = jnp.asarray(np.array([[1] * 20 + [2] * 12]))
    logits = np.asarray(model(packed, positions, segments))
    np.testing.assert_allclose(logits[:, :20], np.asarray(model(jnp.asarray(a))), atol=1e-5)
    np.testing.assert_allclose(logits[:, 20:], np.asarray(model(jnp.asarray(b))), atol=1e-5)
