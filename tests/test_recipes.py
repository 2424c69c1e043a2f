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
    assert {"configs/covenant72b_sft.py", "configs/covenant72b_yarn32k.py",
            "configs/smollm2_sft_cpu.py", "configs/smollm2_yarn32k_cpu.py", "configs/smollm2_dpo_cpu.py",
            "configs/covenant72b_dpo.py"} <= set(RECIPES)


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_loads_with_overrides(path):
    cfg = load_recipe(path, ["--config.train.steps=7"])
    assert cfg.train.steps == 7 and cfg.model.path and cfg.data.sources


@pytest.mark.parametrize("path", ["configs/covenant72b_sft.py", "configs/covenant72b_sft.py:8k",
                                  "configs/covenant72b_yarn32k.py", "configs/covenant72b_dpo.py",
                                  "configs/covenant72b_dpo.py:precompute"])
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
        assert hf["rope_scaling"] == {"rope_type": "yarn", "type": "yarn", "factor": 16.0,
                                      "original_max_position_embeddings": 2048}
