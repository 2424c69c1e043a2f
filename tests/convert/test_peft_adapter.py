"""PEFT adapter folders: PEFT -> covenant_jax -> PEFT is bit-identical; our export loads in PEFT
with the same logits; merged export equals PEFT's ``merge_and_unload``; bad folders are refused
in one line naming the cause."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

from covenant_jax.convert import peft_adapter
from covenant_jax.convert.api import export_adapter, export_merged, load_lora_model, merge_adapter
from covenant_jax.errors import AdapterError
from covenant_jax.model.llama import ModelOptions
from covenant_jax.parallel.sharding import make_mesh
from tests import helpers
from tests.convert.test_roundtrip import _all_tensors, _assert_bit_identical

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter_dir(tmp_path, hf_dtype="float32", seed=0, hidden_size=64, num_hidden_layers=2, **lora):
    """(base HF folder, PEFT adapter folder, the PEFT model) with random A and B."""
    from peft import LoraConfig, get_peft_model

    hf = helpers.hf_model(
        seed=seed, dtype=hf_dtype, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers
    )
    base = helpers.save_hf(hf, tmp_path / "hf")
    torch.manual_seed(seed + 1)
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    peft = get_peft_model(hf, LoraConfig(**{**config, **lora}))
    peft.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter", peft


def ours(base, adapter_dir, mesh=None, base_dtype=""):
    adapter = peft_adapter.read_adapter(adapter_dir, helpers.TINY["num_hidden_layers"])
    import dataclasses

    opts = ModelOptions(
        param_dtype="float32", dtype="float32", lora=dataclasses.replace(adapter.lora, base_dtype=base_dtype)
    )
    return load_lora_model(base, opts, mesh or make_mesh({"fsdp": 4, "tensor": 2}), adapter=adapter), adapter


@pytest.mark.parametrize(
    "lora", [dict(), dict(r=8, lora_alpha=3, use_rslora=True, target_modules=["v_proj", "up_proj"])]
)
def test_peft_round_trip_is_bit_identical(tmp_path, lora):
    base, adapter_dir, _ = peft_adapter_dir(tmp_path, **lora)
    model, adapter = ours(base, adapter_dir)
    out = export_adapter(model, tmp_path / "out", base="tiny", aux_dir=base, source_config=adapter.raw_config)
    assert (out / peft_adapter.WEIGHTS).read_bytes() == (adapter_dir / peft_adapter.WEIGHTS).read_bytes()
    _assert_bit_identical(
        load_file(adapter_dir / peft_adapter.WEIGHTS), load_file(out / peft_adapter.WEIGHTS)
    )
    source, written = (json.loads((d / peft_adapter.CONFIG).read_text()) for d in (adapter_dir, out))
    assert {k: v for k, v in written.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in source.items() if k != "base_model_name_or_path"
    }


def test_our_adapter_loads_in_peft_and_vllm_fields(tmp_path):
    """An adapter we trained (fresh, then B moved off zero) loads with PeftModel.from_pretrained
    on the original HF base and gives our logits; the config has the fields vLLM's PEFTHelper
    requires, with the values it accepts."""
    import dataclasses
    import transformers
    from peft import PeftModel

    from covenant_jax.model.lora import LoraConfig

    base = helpers.save_hf(helpers.hf_model(), tmp_path / "hf")
    lora = LoraConfig(rank=4, alpha=16.0, targets=("q", "v", "down"), rslora=True)
    model = load_lora_model(base, ModelOptions(lora=lora), make_mesh({"fsdp": 2, "tensor": 4}), seed=3)
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapters)
    model = nnx.merge(graphdef, adapters, rest)
    out = export_adapter(model, tmp_path / "adapter", base=str(base), aux_dir=base)

    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(hf, out).eval()
    tokens = helpers.random_tokens(helpers.TINY["vocab_size"])
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(tokens))), helpers.reference_logits(peft, tokens), atol=1e-4, rtol=0
    )
    config = json.loads((out / peft_adapter.CONFIG).read_text())
    assert {
        k: config[k] for k in ("r", "lora_alpha", "use_rslora", "bias", "modules_to_save", "use_dora")
    } == {
        "r": 4,
        "lora_alpha": 16,
        "use_rslora": True,
        "bias": "none",
        "modules_to_save": None,
        "use_dora": False,
    }
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert (out / "tokenizer_config.json").exists() == (base / "tokenizer_config.json").exists()


@pytest.mark.parametrize("hf_dtype", ["float32", "bfloat16"])
def test_merged_export_equals_peft_merge_and_unload(tmp_path, hf_dtype):
    """W + scale·(B@A) rounded once to W's dtype, as PEFT merges. Equal up to the rounding of
    that computation: the two matmul libraries sum the r products in different orders (measured:
    torch's own CPU result changes between runs, by one unit in the last place of W), so each
    element is checked against the float rounding bound 2·eps·(|W| + scale·|B|@|A|)."""
    base, adapter_dir, peft = peft_adapter_dir(tmp_path, hf_dtype=hf_dtype, use_rslora=True)
    state = peft.get_base_model().state_dict()
    bounds = {}
    for name, module in peft.get_base_model().named_modules():
        if hasattr(module, "lora_A"):
            a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
            w = state[f"{name}.base_layer.weight"].double()
            bounds[f"{name}.weight"] = (
                2
                * torch.finfo(getattr(torch, hf_dtype)).eps
                * (w.abs() + module.scaling["default"] * (b.abs() @ a.abs()))
            )
    expected = {k: v.contiguous() for k, v in peft.merge_and_unload().state_dict().items()}
    got = _all_tensors(merge_adapter(base, adapter_dir, tmp_path / "merged"))
    assert sorted(got) == sorted(expected) and len(bounds) == 7 * helpers.TINY["num_hidden_layers"]
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        diff = (got[key].double() - expected[key].double()).abs()
        if key in bounds:
            assert bool((diff <= bounds[key]).all()), key
        else:
            assert torch.equal(got[key], expected[key]), key
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == hf_dtype


def _edit_config(folder, **fields):
    path = folder / peft_adapter.CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(
    "fields,cause",
    [
        (dict(use_dora=True), "DoRA (use_dora)"),
        (dict(bias="all"), "trained biases (bias='all')"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
        (dict(rank_pattern={"q_proj": 2}), "per-module ranks (rank_pattern)"),
        (dict(layers_to_transform=[0]), "adapters on some layers only (layers_to_transform)"),
        (dict(peft_type="IA3"), "peft_type 'IA3': only LoRA adapters are supported"),
        (dict(r=8), "adapter_config.json says r=8 but the weights have rank 4"),
    ],
)
def test_unsupported_peft_features_are_named(tmp_path, fields, cause):
    _, adapter_dir, _ = peft_adapter_dir(tmp_path)
    _edit_config(adapter_dir, **fields)
    with pytest.raises(AdapterError, match=f"^adapter {adapter_dir}: .*{re.escape(cause)}"):
        peft_adapter.read_adapter(adapter_dir, helpers.TINY["num_hidden_layers"])


def test_adapter_of_another_base_is_refused(tmp_path):
    """Another width: the shapes are named; more layers: the extra layers are named; an adapter on
    lm_head: the tensor is named. Nothing is loaded."""
    wide, _, _ = peft_adapter_dir(tmp_path / "a")
    _, narrow_adapter, _ = peft_adapter_dir(tmp_path / "b", hidden_size=32)
    with pytest.raises(
        AdapterError,
        match=r"_proj.lora_A.weight' has shape \[4, 32\] but this model's needs "
        r"\[4, 64\]: the adapter was trained on another base model",
    ):
        ours(wide, narrow_adapter)
    _, deep_adapter, _ = peft_adapter_dir(tmp_path / "c", num_hidden_layers=3)
    with pytest.raises(AdapterError, match=r"layers \[2\] do not exist in the model \(2 layers\)"):
        peft_adapter.read_adapter(deep_adapter, 2)
    _, head_adapter, _ = peft_adapter_dir(tmp_path / "d", target_modules=["q_proj", "lm_head"])
    with pytest.raises(
        AdapterError,
        match=r"tensor 'base_model.model.lm_head.[a-z_.]*' is not a LoRA A/B weight of q/k/v/o_proj",
    ):
        peft_adapter.read_adapter(head_adapter, 2)


def test_missing_or_foreign_files_are_refused(tmp_path):
    _, adapter_dir, _ = peft_adapter_dir(tmp_path)
    (adapter_dir / peft_adapter.WEIGHTS).rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(AdapterError, match="no adapter_model.safetensors .*safe_serialization=True"):
        peft_adapter.read_adapter(adapter_dir, 2)
    (adapter_dir / peft_adapter.CONFIG).unlink()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        peft_adapter.read_adapter(adapter_dir, 2)
