"""Inverse frequencies and attention scale equal transformers' for every RoPE type and knob."""

import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from covenant_jax.config import ModelConfig
from covenant_jax.model.rope import inverse_frequencies

BASE = dict(
    vocab_size=32,
    hidden_size=256,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=4096,
    rope_theta=500000.0,
)
SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 2.5},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
    {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256},
    {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
        "beta_fast": 8,
        "beta_slow": 2,
        "truncate": False,
    },
    {
        "rope_type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 128,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
    },
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048, "attention_factor": 0.9},
    {"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 4096},  # no scaling: scale 1
    # null and falsy knobs, as transformers uses them: truncate null = no truncation, a null
    # factor = max_position_embeddings / original, beta_fast 0 = 32, mscale 0 = plain 0.1 ln(s) + 1
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "truncate": None},
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 512},
    {
        "type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 512,
        "beta_fast": 0,
        "mscale": 0,
        "mscale_all_dim": 1.0,
    },
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: str(s and sorted(s.items())))
@pytest.mark.parametrize("head_dim", [128, 64])
def test_inverse_frequencies_match_transformers(scaling, head_dim):
    hf = dict(BASE, head_dim=head_dim, rope_scaling=scaling)
    hf_cfg = transformers.LlamaConfig(**hf)
    rope_type = hf_cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        ref_freq = 1.0 / (500000.0 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        ref_scale = 1.0
    else:
        ref_freq, ref_scale = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg)
        ref_freq = ref_freq.numpy()
    inv_freq, scale = inverse_frequencies(
        ModelConfig.from_hf_dict({**hf, "model_type": "llama"}).rope, head_dim
    )
    np.testing.assert_allclose(inv_freq, ref_freq, rtol=1e-6)
    assert scale == pytest.approx(ref_scale, rel=1e-7)
