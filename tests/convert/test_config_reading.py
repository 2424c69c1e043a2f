"""config.json is read exactly as transformers reads it: its defaults, its null and falsy knobs,
its precedence between RoPE spellings; and the export writes what was read."""

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from covenant_jax.config import ModelConfig
from covenant_jax.convert.api import hf_to_jax, jax_to_hf, load_model
from covenant_jax.model.llama import ModelOptions
from tests import helpers

FP32 = ModelOptions(param_dtype="float32", dtype="float32")
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _assert_parity_with_transformers(folder):
    """Our logits equal those of the model transformers builds from the same (edited) folder."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = helpers.random_tokens(96, length=96)
    ours = np.asarray(load_model(folder, FP32, helpers.one_device_mesh())(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, helpers.reference_logits(reference, tokens), atol=2e-5, rtol=0)


def _without(*keys):
    return lambda cfg: [cfg.pop(k) for k in keys]


def _yarn_with(**knobs):
    return lambda cfg: cfg.update(rope_parameters={**YARN, "rope_theta": 10000.0, **knobs})


CASES = {
    # transformers' LlamaConfig default is 1e-6 (was read as 1e-5)
    "llama_no_rms_norm_eps": ("llama", {}, _without("rms_norm_eps")),
    "mistral_no_rms_norm_eps": ("mistral", {"sliding_window": None}, _without("rms_norm_eps")),
    # transformers truncates only when `truncate` is truthy (null was read as true)
    "yarn_truncate_null": ("llama", {}, _yarn_with(truncate=None)),
    "yarn_truncate_false": ("llama", {}, _yarn_with(truncate=False)),
    # a null yarn factor is max_position_embeddings / original_max_position_embeddings
    "yarn_factor_null": ("llama", {}, _yarn_with(factor=None)),
    # falsy beta_fast / mscale mean transformers' defaults (32; the plain 0.1 ln(s) + 1)
    "yarn_falsy_knobs": ("llama", {}, _yarn_with(beta_fast=0, beta_slow=0.0, mscale=0, mscale_all_dim=1.0)),
    # both spellings: transformers takes rope_scaling (and rope_theta beside it)
    "both_rope_keys": (
        "llama",
        {},
        lambda cfg: cfg.update(
            rope_scaling={"type": "linear", "factor": 3.0},
            rope_theta=5000.0,
            rope_parameters={**YARN, "rope_theta": 20000.0},
        ),
    ),
    # a top-level original_max_position_embeddings wins over the dict's
    "top_level_original": (
        "llama",
        {},
        lambda cfg: (_yarn_with()(cfg), cfg.update(original_max_position_embeddings=16)),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers_reading_the_same_config(tmp_path, case):
    architecture, overrides, edit = CASES[case]
    folder = helpers.save_hf(helpers.hf_model(architecture=architecture, **overrides), tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_parity_with_transformers(_edit_config(folder, edit))


def test_both_rope_keys_warn_naming_both(tmp_path):
    folder = helpers.save_hf(helpers.hf_model(), tmp_path / "hf")
    _edit_config(folder, CASES["both_rope_keys"][2])
    with pytest.warns(
        UserWarning, match=r"both rope_scaling=.*'linear'.* and rope_parameters=.*'yarn'.*rope_scaling"
    ):
        ModelConfig.from_json_file(folder / "config.json")
    _edit_config(
        folder,
        lambda cfg: cfg.update(rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 5000.0}),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # agreeing spellings: no warning
        ModelConfig.from_json_file(folder / "config.json")


def test_export_writes_what_was_read(tmp_path):
    """A field the source leaves to transformers' default is not written back as another value."""
    src = _edit_config(helpers.save_hf(helpers.hf_model(), tmp_path / "hf"), _without("rms_norm_eps"))
    hf_to_jax(src, tmp_path / "ckpt")
    out = jax_to_hf(tmp_path / "ckpt", tmp_path / "out")
    out_cfg = json.loads((out / "config.json").read_text())
    assert out_cfg.get("rms_norm_eps", 1e-6) == 1e-6
    assert transformers.AutoConfig.from_pretrained(out).rms_norm_eps == 1e-6
    assert ModelConfig.from_json_file(out / "config.json") == ModelConfig.from_json_file(src / "config.json")
