"""Which recipe changes a resumed run accepts, checked before anything loads or compiles.

Each checkpoint step stores the recipe it was trained with (its ``config`` item). Resuming with a
recipe that differs in anything that shapes the numbers (data, seeds, batch layout, optimizer,
model dtypes and RoPE, the model itself) would silently continue a different run, so it is
refused with the differing keys named, unless ``train.allow_recipe_change=True``. What only
says how long to train, how often to log / evaluate / checkpoint, where to export, or how the
same computation is laid out (mesh, remat, attention backend, loss chunking, DPO's reference
log-probs computed in the step or before it) may change.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from covenant_jax.errors import ResumeError

# Dotted keys (or section prefixes ending in ".") a resumed run may change.
MAY_CHANGE = (
    "mesh.",
    "model.remat",
    "model.attention",
    "model.lora.export_merged",
    "dpo.precompute_ref_log_probs",
    "train.steps",
    "train.run_dir",
    "train.resume",
    "train.allow_recipe_change",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.async_checkpoint",
    "train.loss_chunk_size",
    "train.export",
    "train.export_dtype",
    "train.peak_tflops_per_device",
    "train.progress",
    "data.cache_dir",
    "data.workers",
    "data.shard_rows",  # Where / how samples are prepared.
)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."


def recipe_changes(saved: dict, current: dict) -> list[str]:
    """``key old -> new`` for every key both recipes have that differs and matters for the numbers.

    Values are compared as JSON (the checkpoint stores them so: tuples read back as lists); keys
    only one side has (a recipe field added or removed between versions) are not compared.
    """
    old, new = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))
    return [
        f"{key} {_short(old[key])} -> {_short(new[key])}"
        for key in sorted(old.keys() & new.keys())
        if old[key] != new[key] and not _may_change(key)
    ]


def check(
    cfg: ml_collections.ConfigDict, saved: tuple[int, dict] | None, latest: int | None, directory: Any
) -> None:
    """Refuses a resume that would not continue the run saved in ``directory``."""
    if not cfg.train.resume and latest is not None:
        raise ResumeError(
            f"train.resume=False, but {directory} holds checkpoints up to step {latest}, which a "
            "fresh run would not replace (Orbax skips steps it already has): train into a new "
            "run_dir, or move that folder away"
        )
    if latest is not None and cfg.train.steps < latest:
        raise ResumeError(
            f"train.steps={cfg.train.steps} is below the latest checkpoint in {directory} "
            f"(step {latest}): raise train.steps to continue that run, or train into a new run_dir"
        )
    if saved is None or cfg.train.allow_recipe_change:
        return
    step, recipe = saved
    changes = recipe_changes(recipe, cfg.to_dict())
    if changes:
        raise ResumeError(
            f"{directory} holds a run trained with a different recipe (checkpoint step {step}); "
            f"resuming it would not continue that run: {'; '.join(changes)}. Restore those values, "
            "train into a new run_dir, or pass --config.train.allow_recipe_change=True to resume anyway"
        )
