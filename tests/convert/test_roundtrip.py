"""HF -> JAX -> HF is bit-identical, and the export loads in transformers with the same logits."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from covenant_jax.convert.api import export_model, hf_to_jax, jax_to_hf, load_model
from covenant_jax.model.llama import ModelOptions
from covenant_jax.parallel.sharding import make_mesh
from tests import helpers


def _all_tensors(folder):
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _assert_bit_identical(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].view(torch.uint8) if a[key].dtype == torch.bfloat16 else a[key],
                           b[key].view(torch.uint8) if b[key].dtype == torch.bfloat16 else b[key]), key


@pytest.mark.parametrize(
    "dtype,shard,tied",
    [("float32", None, False), ("bfloat16", "60KB", True), ("float32", "60KB", True), ("bfloat16", None, False)],
)
def test_round_trip_is_bit_identical(tmp_path, dtype, shard, tied):
    hf = helpers.hf_model(dtype=dtype, tie_word_embeddings=tied)
    src = helpers.save_hf(hf, tmp_path / "hf", max_shard_size=shard)
    hf_to_jax(src, tmp_path / "ckpt", mesh=make_mesh({"fsdp": 4, "tensor": 2}))
    out = jax_to_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_bytes=60_000 if shard else 5 * 10**9)
    _assert_bit_identical(_all_tensors(src), _all_tensors(out))
    assert (out / "model.safetensors.index.json").exists() == (shard is not None)
    assert "lm_head.weight" not in _all_tensors(out) if tied else True
    src_cfg, out_cfg = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert {k: v for k, v in out_cfg.items()} == {**src_cfg, **{k: out_cfg[k] for k in out_cfg if k not in src_cfg}}

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = helpers.random_tokens(hf.config.vocab_size)
    original = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    np.testing.assert_array_equal(helpers.reference_logits(reloaded, tokens),
                                  helpers.reference_logits(original, tokens))
    if tied:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_torch_bin_input_round_trips(tmp_path):
    hf = helpers.hf_model()
    src = helpers.save_hf(hf, tmp_path / "hf", torch_bin=True)
    hf_to_jax(src, tmp_path / "ckpt")
    out = jax_to_hf(tmp_path / "ckpt", tmp_path / "out")
    expected = {k: v for k, v in hf.state_dict().items()}
    _assert_bit_identical(expected, _all_tensors(out))


def test_yarn_fields_survive_export_in_both_spellings(tmp_path):
    rope = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0}
    hf = helpers.hf_model(rope_scaling=rope)
    for spelling, v4 in (("v5", False), ("v4", True)):
        src = helpers.save_hf(hf, tmp_path / spelling, v4_rope=v4)
        hf_to_jax(src, tmp_path / f"{spelling}_ckpt")
        out = jax_to_hf(tmp_path / f"{spelling}_ckpt", tmp_path / f"{spelling}_out")
        assert json.loads((out / "config.json").read_text()) == {
            **json.loads((src / "config.json").read_text()), "dtype": "float32"}
        reloaded = transformers.AutoConfig.from_pretrained(out)
        assert reloaded.rope_parameters["rope_type"] == "yarn"
        assert reloaded.rope_parameters["factor"] == 4.0 and reloaded.rope_parameters["beta_fast"] == 16.0


def test_export_with_new_yarn_scaling_loads_in_transformers(tmp_path):
    """A model whose RoPE we changed (the long-context recipe) exports a config transformers reads."""
    from covenant_jax.config import RopeConfig

    hf = helpers.hf_model(max_position_embeddings=32)
    model = load_model(helpers.save_hf(hf, tmp_path / "hf", v4_rope=True), ModelOptions(), helpers.one_device_mesh())
    long_cfg = model.config.with_rope(
        RopeConfig("yarn", theta=10000.0, factor=4.0, original_max_position_embeddings=32), 128)
    model.config = long_cfg
    out = export_model(model, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["max_position_embeddings"] == 128
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.rope_parameters["rope_type"] == "yarn"
    relong = load_model(out, ModelOptions(), helpers.one_device_mesh())
    tokens = helpers.random_tokens(96, length=100)
    np.testing.assert_allclose(np.asarray(relong(jnp.asarray(tokens))),
                               helpers.reference_logits(reloaded, tokens), atol=1e-4)


def test_dtype_cast_on_export(tmp_path):
    hf = helpers.hf_model()
    hf_to_jax(helpers.save_hf(hf, tmp_path / "hf"), tmp_path / "ckpt")
    out = jax_to_hf(tmp_path / "ckpt", tmp_path / "out", dtype="bfloat16")
    tensors = _all_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    torch.testing.assert_close(tensors["model.embed_tokens.weight"],
                               hf.state_dict()["model.embed_tokens.weight"].to(torch.bfloat16), rtol=0, atol=0)
