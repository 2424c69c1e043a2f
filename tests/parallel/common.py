"""The recipe the multi-process test trains, in both the worker processes and the reference."""

from __future__ import annotations

from pathlib import Path

from tests.train import common


def recipe(root: Path, model: Path, data: Path, **train):
    cfg = common.tiny_recipe(Path(root), Path(model), Path(data), **{"steps": 6, "eval_every": 3, **train})
    cfg.optim.schedule = "constant"  # the train step's program does not depend on train.steps
    cfg.data.shard_rows = 16  # 64 rows: 4 cache shards, so each process prepares half of them
    return cfg


def dpo_recipe(root: Path, model: Path, data: Path, **train):
    """Tiny DPO (in-step reference unless ``dpo.precompute_ref_log_probs`` is set), 4 steps."""
    cfg = common.tiny_dpo_recipe(
        Path(root), Path(model), Path(data), **{"steps": 4, "eval_every": 2, **train}
    )
    cfg.optim.schedule = "constant"
    return cfg
