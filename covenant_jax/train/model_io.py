"""A run's model in and out: loaded as the recipe says (the base, its LoRA adapters, the recipe's
RoPE) and exported as the ecosystem reads it (an HF folder, or with LoRA a PEFT adapter folder
and, if asked, the merged weights) — at the end of a run, or from any checkpoint step of one
(``covenant-jax export RUN_DIR --step N``: an intermediate step, a preempted run, a run whose
last step was not exported).

A checkpoint export reads the step's own recipe (saved with it), restores the trained params
alone (no optimizer state, no data iterator) and checks them against the digests saved with
the step, so a damaged step is named rather than exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import ml_collections

from covenant_jax import storage
from covenant_jax.convert import peft_adapter
from covenant_jax.convert.api import (
    check_adapter_shapes,
    export_adapter,
    export_merged,
    export_model,
    folder_config,
    load_lora_model,
    load_model,
)
from covenant_jax.errors import CheckpointError, MeshError
from covenant_jax.model.llama import Llama, with_rope
from covenant_jax.parallel.sharding import make_mesh
from covenant_jax.train import checkpoint, program, recipe
from covenant_jax.train import state as state_lib


def recipe_adapter(cfg) -> peft_adapter.Adapter | None:
    """The PEFT adapter folder ``model.lora.adapter``, checked against the recipe and the model's
    shapes (from the configs alone) before any weight is read."""
    lora = program.lora_config(cfg)
    if lora is None or not cfg.model.lora.adapter:
        return None
    model_cfg, _ = folder_config(cfg.model.path)
    adapter = peft_adapter.read_adapter(cfg.model.lora.adapter, model_cfg.num_hidden_layers, lora.dropout)
    peft_adapter.check_matches(adapter, lora)
    check_adapter_shapes(adapter, model_cfg, program.model_options(cfg))
    return adapter


def load_recipe_model(
    cfg, mesh, adapter: peft_adapter.Adapter | None = None, path: str | None = None
) -> Llama:
    """The recipe's model (``path``: another folder's weights, as DPO's reference), with its
    LoRA adapters when it has them, and the recipe's RoPE."""
    opts = program.model_options(cfg)
    if opts.lora is None:
        model = load_model(path or cfg.model.path, opts, mesh)
    else:
        model = load_lora_model(cfg.model.path, opts, mesh, seed=cfg.train.seed, adapter=adapter)
    target = recipe.rope_override(model.config, cfg.model)  # the recipe's RoPE, if it sets one
    return with_rope(model, target.rope, target.max_position_embeddings)


def export_dir(cfg: ml_collections.ConfigDict) -> storage.Path:
    """The HF folder, or with LoRA the PEFT adapter folder."""
    return storage.path(cfg.train.run_dir) / "export"


def merged_dir(cfg: ml_collections.ConfigDict) -> storage.Path:
    """With LoRA and ``model.lora.export_merged``: the base with the adapters merged, as an HF folder."""
    return storage.path(cfg.train.run_dir) / "export_merged"


def write_exports(
    cfg,
    model: Llama,
    out,
    merged_out=None,
    source_config: dict | None = None,
    dtype: str | None = None,
    overwrite: bool = True,
) -> Path:
    """``model`` (its trained weights merged in) as an HF folder at ``out``; with LoRA a PEFT
    adapter folder there (``source_config``: the adapter_config.json it continues) and, with
    ``merged_out``, the merged weights as an HF folder."""
    dtype = dtype or cfg.train.export_dtype or None
    if model.options.lora is None:
        return export_model(model, out, dtype=dtype, aux_dir=cfg.model.path, overwrite=overwrite)
    if merged_out is not None:
        export_merged(model, merged_out, dtype=dtype, aux_dir=cfg.model.path, overwrite=overwrite)
    return export_adapter(
        model,
        out,
        base=str(cfg.model.path),
        aux_dir=cfg.model.path,
        source_config=source_config,
        overwrite=overwrite,
    )


def export_checkpoint(
    run_dir,
    step: int | None = None,
    out=None,
    merged_out=None,
    dtype: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Exports checkpoint ``step`` of ``run_dir`` (default: the newest) to ``out`` (default
    RUN_DIR/export-step{N}); ``merged_out``: also the merged weights of a LoRA run."""
    directory = storage.path(run_dir) / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"{run_dir}: no checkpoints folder ({directory}); is it a run_dir?")
    reader = checkpoint.RunCheckpointer(directory, async_save=False, create=False)
    try:
        steps = reader.all_steps()
        if not steps:
            raise CheckpointError(f"{directory} holds no checkpoint")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"{directory} holds no step {step}; its steps: {steps}")
        cfg = ml_collections.ConfigDict(reader.config_of(step))
        if merged_out is not None and program.lora_config(cfg) is None:
            raise CheckpointError(f"--merged-out: {run_dir} trained every weight (no LoRA): export it alone")
        model = load_recipe_model(cfg, _mesh(cfg))
        graphdef, params, frozen, rest = state_lib.split_trained(model)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
        trained = reader.restore_params(step, abstract)
    finally:
        reader.close()
    out = out or storage.path(run_dir) / f"export-step{step}"
    if merged_out is not None:
        storage.check_separate(cfg.model.path, merged_out, "the merged export folder")
    storage.check_separate(cfg.model.path, out, "the export folder")
    exported = write_exports(
        cfg,
        state_lib.merge_trained(graphdef, trained, frozen, rest),
        out,
        merged_out,
        dtype=dtype,
        overwrite=overwrite,
    )
    log(f"exported step {step} of {run_dir} to {exported}" + (f" and {merged_out}" if merged_out else ""))
    return exported


def _mesh(cfg):
    """The run's mesh where this host's devices can lay it out, else every device on fsdp: an
    export reads the same weights whatever the mesh."""
    try:
        return make_mesh(cfg.mesh.to_dict())
    except MeshError:
        return make_mesh({"fsdp": -1})
