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
        assert torch.equal(
            a[key].view(torch.uint8) if a[key].dtype == torch.bfloat16 else a[key],
            b[key].view(torch.uint8) if b[key].dtype == torch.bfloat16 else b[key],
        ), key


@pytest.mark.parametrize(
    "dtype,shard,tied",
    [
        ("float32", None, False),
        ("bfloat16", "60KB", True),
        ("float32", "60KB", True),
        ("bfloat16", None, False),
    ],
)
def test_round_trip_is_bit_identical(tmp_path, dtype, shard, tied):
    hf = helpers.hf_model(dtype=dtype, tie_word_embeddings=tied)
    src = helpers.save_hf(hf, tmp_path / "hf", max_shard_size=shard)
    hf_to_jax(src, tmp_path / "ckpt", mesh=make_mesh({"fsdp": 4, "tensor": 2}))
    out = jax_to_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_bytes=60_000 if shard else 5 * 10**9)
    _assert_bit_identical(_all_tensors(src), _all_tensors(out))
    assert (out / "model.safetensors.index.json").exists() == (shard is not None)
    assert "lm_head.weight" not in _all_tensors(out) if tied else True
    src_cfg, out_cfg = (
        json.loads((src / "config.json").read_text()),
        json.loads((out / "config.json").read_text()),
    )
    assert {k: v for k, v in out_cfg.items()} == {
        **src_cfg,
        **{k: out_cfg[k] for k in out_cfg if k not in src_cfg},
    }

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = helpers.random_tokens(hf.config.vocab_size)
    original = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    np.testing.assert_array_equal(
        helpers.reference_logits(reloaded, tokens), helpers.reference_logits(original, tokens)
    )
    if tied:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_torch_bin_input_round_trips(tmp_path):
    hf = helpers.hf_model()
    src = helpers.save_hf(hf, tmp_path / "hf", torch_bin=True)
    hf_to_jax(src, tmp_path / "ckpt")
    out = jax_to_hf(tmp_path / "ckpt", tmp_path / "out")
    expected = {k: v for k, v in hf.state_dict().items()}
    _assert_bit_identical(expected, _all_tensors(out))


_ROPE_KEYS = ("rope_scaling", "rope_parameters", "rope_theta")


def _rope_as_each_reader_sees_it(cfg: dict):
    """The RoPE a transformers-4.x reader (rope_theta + rope_scaling) and, where the file has
    rope_parameters, a reader of that alone get from one config.json."""
    from covenant_jax.config import ModelConfig

    v4 = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    v5 = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_theta")}
    return [ModelConfig.from_hf_dict(c).rope for c in ([v4, v5] if "rope_parameters" in cfg else [v4])]


def test_yarn_fields_survive_export_in_both_spellings(tmp_path):
    """A v4-spelled config comes back verbatim; a v5-spelled one gains rope_theta + rope_scaling,
    which transformers 4.x and vLLM on it read (they ignore rope_parameters)."""
    from covenant_jax.config import ModelConfig

    rope = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0}
    hf = helpers.hf_model(rope_scaling=rope)
    for spelling, v4 in (("v5", False), ("v4", True)):
        src = helpers.save_hf(hf, tmp_path / spelling, v4_rope=v4)
        hf_to_jax(src, tmp_path / f"{spelling}_ckpt")
        out = jax_to_hf(tmp_path / f"{spelling}_ckpt", tmp_path / f"{spelling}_out")
        src_cfg, out_cfg = (json.loads((d / "config.json").read_text()) for d in (src, out))
        if v4:
            assert out_cfg == {**src_cfg, "dtype": "float32"}
        else:
            assert {k: v for k, v in out_cfg.items() if k not in _ROPE_KEYS} == {
                **{k: v for k, v in src_cfg.items() if k not in _ROPE_KEYS},
                "dtype": "float32",
            }
            assert out_cfg["rope_scaling"]["type"] == out_cfg["rope_parameters"]["rope_type"] == "yarn"
        source_rope = ModelConfig.from_hf_dict(src_cfg).rope
        assert all(r == source_rope for r in _rope_as_each_reader_sees_it(out_cfg))
        reloaded = transformers.AutoConfig.from_pretrained(out)
        assert reloaded.rope_parameters["rope_type"] == "yarn"
        assert reloaded.rope_parameters["factor"] == 4.0 and reloaded.rope_parameters["beta_fast"] == 16.0


@pytest.mark.parametrize("v4", [False, True], ids=["v5_source", "v4_source"])
def test_export_after_context_extension(tmp_path, v4):
    """YaRN applied by a recipe: the export's config says so in both spellings, its tokenizer's
    model_max_length is the new context, and transformers runs it with our logits."""
    from covenant_jax.train import recipe

    hf = helpers.hf_model(max_position_embeddings=32)
    src = helpers.save_hf(hf, tmp_path / "hf", v4_rope=v4)
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32, "eos_token": "</s>"}))
    model = load_model(src, ModelOptions(), helpers.one_device_mesh())
    section = recipe.default_config().model
    section.rope.rope_type, section.rope.factor, section.rope.truncate = "yarn", 4.0, False
    section.max_position_embeddings = 128
    model.config = recipe.rope_override(model.config, section)
    out = export_model(model, tmp_path / "out", aux_dir=src)

    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config == {"model_max_length": 128, "eos_token": "</s>"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 128 and cfg["rope_theta"] == 10000.0
    assert cfg["rope_scaling"] == {
        "rope_type": "yarn",
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "truncate": False,
    }
    assert ("rope_parameters" in cfg) == (not v4)
    assert all(r == model.config.rope for r in _rope_as_each_reader_sees_it(cfg))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.rope_parameters["rope_type"] == "yarn"
    assert reloaded.config.rope_parameters["truncate"] is False
    relong = load_model(out, ModelOptions(), helpers.one_device_mesh())
    tokens = helpers.random_tokens(96, length=100)
    np.testing.assert_allclose(
        np.asarray(relong(jnp.asarray(tokens))), helpers.reference_logits(reloaded, tokens), atol=1e-4
    )


def test_dtype_cast_on_export(tmp_path):
    hf = helpers.hf_model()
    hf_to_jax(helpers.save_hf(hf, tmp_path / "hf"), tmp_path / "ckpt")
    out = jax_to_hf(tmp_path / "ckpt", tmp_path / "out", dtype="bfloat16")
    tensors = _all_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    torch.testing.assert_close(
        tensors["model.embed_tokens.weight"],
        hf.state_dict()["model.embed_tokens.weight"].to(torch.bfloat16),
        rtol=0,
        atol=0,
    )
