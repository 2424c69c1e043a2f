"""The conversion entry points the CLI and the trainer call."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from covenant_jax import storage
from covenant_jax.config import ModelConfig
from covenant_jax.convert import hf_to_jax as hf_to_jax_lib
from covenant_jax.convert import keymap, params_checkpoint, peft_adapter
from covenant_jax.convert.jax_to_hf import DEFAULT_MAX_SHARD_BYTES, checkpoint_reader, export_hf, live_reader
from covenant_jax.io import atomic_output_dir, check_output_dir, copy_aux_files
from covenant_jax.model.llama import (
    Llama,
    ModelOptions,
    abstract_model,
    add_adapters,
    base_options,
    merge_adapters,
)
from covenant_jax.parallel.sharding import DEFAULT_RULES, make_mesh


def load_model(
    path: str | Path,
    opts: ModelOptions | None = None,
    mesh: Mesh | None = None,
    rules: Mapping = DEFAULT_RULES,
) -> Llama:
    """A converted folder or an HF folder, placed on ``mesh``; ``opts`` None keeps stored dtypes."""
    storage.check_complete(path)
    if params_checkpoint.is_params_checkpoint(path):
        return params_checkpoint.load_params_checkpoint(path, opts, mesh, rules)
    return hf_to_jax_lib.load_hf(path, opts, mesh, rules)


def load_lora_model(
    path: str | Path,
    opts: ModelOptions,
    mesh: Mesh,
    *,
    seed: int = 0,
    adapter: peft_adapter.Adapter | None = None,
    rules: Mapping = DEFAULT_RULES,
) -> Llama:
    """The base at ``path`` (HF or converted folder, in ``opts.base_dtype``) with the adapters of
    ``opts.lora``: freshly initialised from ``seed``, or ``adapter``'s weights."""
    base = load_model(path, base_options(opts), mesh, rules)
    load = None if adapter is None else (lambda abstract: peft_adapter.load_weights(adapter, abstract))
    return add_adapters(base, opts, mesh, seed=seed, load=load, rules=rules)


def hf_to_jax(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    overwrite: bool = False,
) -> Path:
    """HF folder -> converted folder (Orbax params + config + tokenizer), streamed: memory stays
    at a few slices, whatever the model's size. Stored chunks follow ``mesh``'s shards."""
    hf_dir = storage.path(hf_dir)
    out_dir = check_output_dir(out_dir, overwrite, inputs=(hf_dir,))
    storage.check_complete(hf_dir)
    cfg, source = hf_to_jax_lib.open_checked(hf_dir)
    dtype = dtype or hf_to_jax_lib.source_dtype(source, cfg)
    storage.check_free_space(out_dir.parent, weight_bytes(cfg, dtype))
    with atomic_output_dir(out_dir, overwrite) as tmp:
        hf_to_jax_lib.stream_hf(source, cfg, dtype, mesh or make_mesh(), tmp / params_checkpoint.PARAMS)
        params_checkpoint.write_meta(cfg, dtype, tmp)
        if jax.process_index() == 0:
            copy_aux_files(hf_dir, tmp)
    return out_dir


def jax_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Converted folder -> HF folder, read from disk and written a piece at a time."""
    ckpt_dir = storage.path(ckpt_dir)
    out_dir = check_output_dir(out_dir, overwrite, inputs=(ckpt_dir,))
    storage.check_complete(ckpt_dir)
    cfg, stored_dtype = params_checkpoint.read_meta(ckpt_dir)
    storage.check_free_space(out_dir.parent, weight_bytes(cfg, dtype or stored_dtype))
    with atomic_output_dir(out_dir, overwrite) as tmp:
        export_hf(
            checkpoint_reader(ckpt_dir / params_checkpoint.PARAMS),
            cfg,
            tmp,
            dtype or stored_dtype,
            ckpt_dir,
            max_shard_bytes,
        )
    return out_dir


def export_model(
    model: Llama,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    aux_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """A live model -> HF folder (the trainer's final export)."""
    params = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        export_hf(
            live_reader(params),
            model.config,
            tmp,
            dtype or model.options.param_dtype,
            storage.path(aux_dir) if aux_dir else None,
            max_shard_bytes,
            collective=True,
        )
    return storage.path(out_dir)


def weight_bytes(cfg: ModelConfig, dtype: str) -> int:
    """The size of a model's weights in ``dtype``: what a conversion writes, give or take a header."""
    itemsize = np.dtype(jax.numpy.dtype(dtype)).itemsize
    return sum(math.prod(shape) for shape in keymap.expected_hf_shapes(cfg).values()) * itemsize


def export_adapter(
    model: Llama,
    out_dir: str | Path,
    *,
    base: str,
    aux_dir: str | Path | None = None,
    source_config: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """A LoRA model's adapters -> a PEFT adapter folder (``base``: its base model's name or path)."""
    adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    with atomic_output_dir(out_dir, overwrite) as tmp:
        peft_adapter.save_adapter(adapters, model.options.lora, tmp, base, aux_dir, source_config)
    return storage.path(out_dir)


def export_merged(
    model: Llama,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    aux_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """A LoRA model with its adapters folded into the weights -> HF folder (base dtype by default)."""
    return export_model(merge_adapters(model), out_dir, dtype=dtype, aux_dir=aux_dir, overwrite=overwrite)


def merge_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    overwrite: bool = False,
) -> Path:
    """Base folder + PEFT adapter folder -> merged HF folder (``convert lora-merge``)."""
    base_dir = storage.path(base_dir)
    out_dir = check_output_dir(out_dir, overwrite, inputs=(base_dir, storage.path(adapter_dir)))
    storage.check_complete(base_dir)
    cfg, stored_dtype = folder_config(base_dir)
    adapter = peft_adapter.read_adapter(adapter_dir, cfg.num_hidden_layers)
    opts = ModelOptions(
        param_dtype="float32",
        dtype="float32",
        lora=dataclasses.replace(adapter.lora, base_dtype=stored_dtype),
    )
    check_adapter_shapes(adapter, cfg, opts)
    storage.check_free_space(out_dir.parent, weight_bytes(cfg, dtype or stored_dtype))
    model = load_lora_model(base_dir, opts, mesh or make_mesh(), adapter=adapter)
    return export_merged(model, out_dir, dtype=dtype, aux_dir=base_dir, overwrite=overwrite)


def check_adapter_shapes(adapter: peft_adapter.Adapter, cfg: ModelConfig, opts: ModelOptions) -> None:
    """The adapter fits the model ``cfg`` with ``opts.lora`` (from the configs alone: before any
    weight is read)."""
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(cfg, opts), nnx.LoRAParam))
    peft_adapter.check_shapes(adapter, abstract)


def folder_config(folder: str | Path) -> tuple[ModelConfig, str]:
    """(config, stored weight dtype) of a converted or an HF folder."""
    folder = storage.path(folder)
    if params_checkpoint.is_params_checkpoint(folder):
        return params_checkpoint.read_meta(folder)
    cfg, source = hf_to_jax_lib.open_checked(folder)
    return cfg, hf_to_jax_lib.source_dtype(source, cfg)
