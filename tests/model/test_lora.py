"""LoRA against PEFT on transformers: the same adapter weights give the same logits (fp32, tiny
random Llama) for several target sets, ranks, alphas, with and without rsLoRA; merged weights equal
PEFT's ``merge_and_unload``; adapters carry their weight's logical axes with the rank replicated."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from covenant_jax.convert import peft_adapter
from covenant_jax.convert.api import load_model
from covenant_jax.model import lora as lora_lib
from covenant_jax.model.llama import ModelOptions, abstract_model, add_adapters, base_options, merge_adapters
from covenant_jax.parallel.sharding import make_mesh, state_shardings
from tests import helpers

FP32 = ModelOptions(param_dtype="float32", dtype="float32")

CASES = {
    "all_r8_a16": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "qv_r4_a8": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "mlp_r3_a5_rslora": dict(
        r=3, lora_alpha=5, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True
    ),
    "ko_r16_a7_rslora": dict(r=16, lora_alpha=7, target_modules=["k_proj", "o_proj"], use_rslora=True),
}


def peft_model(case: str, hf_dir, seed: int = 0, **hf_overrides):
    """A tiny random Llama (saved to ``hf_dir`` first: PEFT wraps its layers in place) under a PEFT
    adapter whose A and B are both random (B is zero at a normal init, which would hide a wrong B)."""
    import torch
    from peft import LoraConfig, get_peft_model

    hf = helpers.hf_model(seed=seed, **hf_overrides)
    helpers.save_hf(hf, hf_dir)
    torch.manual_seed(seed + 1)
    return get_peft_model(hf, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **CASES[case]))


def ours_with_adapter(tmp_path, peft, hf_dir, mesh):
    peft.save_pretrained(tmp_path / "adapter")
    adapter = peft_adapter.read_adapter(tmp_path / "adapter", peft.config.num_hidden_layers)
    opts = ModelOptions(param_dtype="float32", dtype="float32", lora=adapter.lora)
    base = load_model(hf_dir, base_options(opts), mesh)
    return add_adapters(base, opts, mesh, load=functools.partial(peft_adapter.load_weights, adapter))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mesh_shape", [None, {"fsdp": 2, "tensor": 4}], ids=["1dev", "fsdp2xtensor4"])
def test_logits_match_peft(tmp_path, case, mesh_shape):
    peft = peft_model(case, tmp_path / "hf")
    mesh = helpers.one_device_mesh() if mesh_shape is None else make_mesh(mesh_shape)
    tokens = helpers.random_tokens(peft.config.vocab_size, length=40)
    expected = helpers.reference_logits(peft, tokens)
    model = ours_with_adapter(tmp_path, peft, tmp_path / "hf", mesh)
    ours = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    # the adapters matter at this size (so the comparison above can fail), and switch off exactly
    with peft.disable_adapter():
        base_expected = helpers.reference_logits(peft, tokens)
    assert np.abs(expected - base_expected).max() > 1e-2
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(tokens), adapters=False)), base_expected, atol=1e-4, rtol=0
    )


def _spec(sharding, ndim):
    return tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))


def test_adapters_are_sharded_as_their_weights_with_rank_replicated():
    """A's input axis and B's output axis take the mesh axes of the weight's own (major) input and
    output axes, the layers axis stays as the weight's, the rank axis is replicated; the base is
    in base_dtype, the adapters in param_dtype."""
    from covenant_jax.config import ModelConfig

    cfg = ModelConfig.from_hf_dict(
        {**helpers.TINY, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    )
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0, base_dtype="bfloat16")
    model = abstract_model(cfg, ModelOptions(param_dtype="float32", lora=lora))
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    shardings = dict(nnx.to_flat_state(state_shardings(nnx.state(model, nnx.Param), mesh)))
    for target in lora_lib.TARGETS:
        module = "attn" if lora_lib.HF_MODULES[target] == "self_attn" else "mlp"
        weight = _spec(shardings[("layers", module, target)], 4 if module == "attn" else 3)
        a = _spec(shardings[("layers", module, f"{target}_lora", "lora_a")], 3)
        b = _spec(shardings[("layers", module, f"{target}_lora", "lora_b")], 3)
        first_out = 3 if target == "o" else 2
        assert a == (weight[0], weight[1], None), target
        assert b == (weight[0], None, weight[first_out]), target
    assert {a for a in jax.tree.leaves(shardings) if a.spec != ()}  # something is sharded at all
    dtypes = {path: v.get_value().dtype for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {str(d) for p, d in dtypes.items() if p[-1].startswith("lora_")} == {"float32"}
    assert {str(d) for p, d in dtypes.items() if not p[-1].startswith("lora_")} == {"bfloat16"}
    assert len(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))) == 2 * len(lora_lib.TARGETS)


@pytest.mark.parametrize(
    "names,expected",
    [
        (("q_proj", "v"), ("q", "v")),
        ("all-linear", lora_lib.TARGETS),
        (["down_proj", "gate", "up_proj", "up"], ("gate", "up", "down")),
    ],
)
def test_target_names(names, expected):
    assert lora_lib.normalize_targets(names) == expected
