"""When a recipe does not fit: the changes to try, cheapest in step time first, as recipe fields."""

from __future__ import annotations

import copy
from typing import Any, Iterator

from covenant_jax.config import ModelConfig

REMAT_ORDER = ("none", "save_dots", "full")  # least recompute first


def candidates(cfg, model_cfg: ModelConfig, sizes: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Stronger remat, more micro-batches, fsdp instead of data / more or less tensor, smaller loss
    chunks; each after the remat steps builds on the strongest remat."""
    current = cfg.model.remat if cfg.model.remat in REMAT_ORDER else "full"
    for remat in REMAT_ORDER[REMAT_ORDER.index(current) + 1 :]:
        yield {"model.remat": remat}
    base = {"model.remat": "full"} if cfg.model.remat not in ("full", "offload") else {}
    micro = micro_batch_counts(cfg, sizes)
    for count in micro:
        yield {**base, "train.micro_batches": count}
    most_micro = {"train.micro_batches": micro[-1]} if micro else {}
    for mesh in other_meshes(model_cfg, sizes):
        for extra in ({}, most_micro) if most_micro else ({},):
            if _splits(cfg.data.batch_size, extra.get("train.micro_batches", cfg.train.micro_batches), mesh):
                yield {**base, **extra, "mesh": mesh}
    if cfg.train.loss_chunk_size >= 512:
        yield {**base, **most_micro, "train.loss_chunk_size": cfg.train.loss_chunk_size // 4}


def micro_batch_counts(cfg, sizes: dict[str, int]) -> list[int]:
    """2, 4 and 8 times the recipe's micro-batches, where the rows still split over the mesh."""
    a = cfg.train.micro_batches
    return [a * factor for factor in (2, 4, 8) if _splits(cfg.data.batch_size, a * factor, sizes)]


def other_meshes(model_cfg: ModelConfig, sizes: dict[str, int]) -> list[dict[str, int]]:
    """The data axis folded into fsdp; tensor halved (fsdp doubled); tensor doubled where the heads allow."""
    meshes = []
    if sizes["data"] > 1:
        meshes.append({**sizes, "data": 1, "fsdp": sizes["fsdp"] * sizes["data"]})
    if sizes["tensor"] > 1:
        meshes.append({**sizes, "tensor": sizes["tensor"] // 2, "fsdp": sizes["fsdp"] * 2})
    if sizes["fsdp"] % 2 == 0 and model_cfg.num_attention_heads % (sizes["tensor"] * 2) == 0:
        meshes.append({**sizes, "tensor": sizes["tensor"] * 2, "fsdp": sizes["fsdp"] // 2})
    return meshes


def with_changes(cfg, changes: dict[str, Any]):
    """A copy of the recipe with ``changes`` (dotted fields; "mesh": axis sizes) applied."""
    out = copy.deepcopy(cfg)
    with out.unlocked():
        for key, value in changes.items():
            if key == "mesh":
                for axis, size in value.items():
                    out.mesh[axis] = size
            else:
                section, field = key.split(".", 1)
                out[section][field] = value
    return out


def changes_text(changes: dict[str, Any]) -> str:
    """The changes as the command-line overrides that make them."""
    parts = []
    for key, value in changes.items():
        if key == "mesh":
            parts += [f"--config.mesh.{a}={s}" for a, s in value.items()]
        else:
            parts.append(f"--config.{key}={value}")
    return " ".join(parts)


def _splits(rows: int, micro_batches: int, sizes: dict[str, int]) -> bool:
    """The batch's rows divide into ``micro_batches`` that divide over the data-parallel axes."""
    return rows % micro_batches == 0 and (rows // micro_batches) % (sizes["data"] * sizes["fsdp"]) == 0
