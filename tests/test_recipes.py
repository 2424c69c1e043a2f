"""Every recipe in configs/ loads through the CLI's loader and passes validation against its model."""

from pathlib import Path

import pytest

from covenant_jax import plan
from covenant_jax.cli import load_recipe
from covenant_jax.config import ModelConfig
from covenant_jax.train import recipe

RECIPES = sorted(str(p) for p in Path("configs").glob("*.py"))
COVENANT = ModelConfig.from_json_file("configs/models/covenant-72b/config.json")


def test_all_recipes_are_listed():
    assert {
        "configs/covenant72b_sft.py",
        "configs/covenant72b_yarn32k.py",
        "configs/smollm2_sft_cpu.py",
        "configs/smollm2_yarn32k_cpu.py",
        "configs/smollm2_dpo_cpu.py",
        "configs/covenant72b_dpo.py",
    } <= set(RECIPES)


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_loads_with_overrides(path):
    cfg = load_recipe(path, ["--config.train.steps=7"])
    assert cfg.train.steps == 7 and cfg.model.path and cfg.data.sources


@pytest.mark.parametrize(
    "path",
    [
        "configs/covenant72b_sft.py",
        "configs/covenant72b_sft.py:8k",
        "configs/covenant72b_yarn32k.py",
        "configs/covenant72b_dpo.py",
        "configs/covenant72b_dpo.py:precompute",
    ],
)
def test_covenant_recipes_validate(path):
    cfg = load_recipe(path, [])
    model_cfg = recipe.rope_override(COVENANT, cfg.model)
    recipe.validate(cfg, model_cfg, num_data_shards=cfg.mesh.data * cfg.mesh.fsdp)
    chips = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.context * cfg.mesh.tensor
    assert chips >= 64 and model_cfg.num_params() == pytest.approx(72.7e9, rel=0.02)
    # the TPU kernel, shard_map-ped: plan's mesh check holds it to no context axis and kv heads
    # that the tensor axis divides
    assert cfg.model.attention == "splash"
    plan.check_mesh(cfg, model_cfg, plan.mesh_shape(cfg, chips))
    if "yarn" in path:
        assert model_cfg.max_position_embeddings == 32768
        hf = model_cfg.to_hf_dict()
        assert hf["rope_scaling"] == {
            "rope_type": "yarn",
            "type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 2048,
        }


@pytest.mark.parametrize("path", ["configs/covenant72b_lora_sft.py", "configs/covenant72b_lora_sft.py:8k"])
def test_covenant_lora_recipe_has_a_frozen_bf16_base_and_adapter_optimizer_state(path):
    """What plan compiles for the LoRA recipe: the base (72.7B, bf16) in ``frozen`` with no
    optimizer state; the trained params are rank-8 adapters on all seven projections of the 80
    layers, and AdamW's moments are theirs only."""
    import jax

    from covenant_jax.parallel.sharding import make_mesh
    from covenant_jax.train import program

    cfg = load_recipe(path, [])
    c = recipe.rope_override(COVENANT, cfg.model)
    recipe.validate(cfg, c, num_data_shards=cfg.mesh.data * cfg.mesh.fsdp)
    chips = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.context * cfg.mesh.tensor
    assert chips == 8
    plan.check_mesh(cfg, c, plan.mesh_shape(cfg, chips))
    state = program.abstract_state(cfg, c, make_mesh({k: v for k, v in cfg.mesh.to_dict().items()})).state
    base = jax.tree.leaves(state["frozen"])
    assert {x.dtype for x in base} == {jax.numpy.dtype("bfloat16")}
    assert sum(x.size for x in base) == c.num_params()
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    d, f = c.hidden_size, c.intermediate_size
    per_layer = 8 * ((d + q) * 2 + (d + kv) * 2 + (d + f) * 3)  # r (in + out) per projection
    adapters = sum(x.size for x in jax.tree.leaves(state["params"]))
    assert adapters == c.num_hidden_layers * per_layer
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * adapters
