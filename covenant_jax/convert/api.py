"""The conversion entry points the CLI and the trainer call."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh

from covenant_jax.convert import hf_to_jax as hf_to_jax_lib
from covenant_jax.convert import params_checkpoint
from covenant_jax.convert.jax_to_hf import DEFAULT_MAX_SHARD_BYTES, checkpoint_reader, export_hf, live_reader
from covenant_jax.io import atomic_output_dir, copy_aux_files
from covenant_jax.model.llama import Llama, ModelOptions
from covenant_jax.parallel.sharding import DEFAULT_RULES, make_mesh


def load_model(path: str | Path, opts: ModelOptions | None = None, mesh: Mesh | None = None,
               rules: Mapping = DEFAULT_RULES) -> Llama:
    """A converted folder or an HF folder, placed on ``mesh``; ``opts`` None keeps stored dtypes."""
    if params_checkpoint.is_params_checkpoint(path):
        return params_checkpoint.load_params_checkpoint(path, opts, mesh, rules)
    return hf_to_jax_lib.load_hf(path, opts, mesh, rules)


def hf_to_jax(hf_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None,
              mesh: Mesh | None = None, overwrite: bool = False) -> Path:
    """HF folder -> converted folder (Orbax params + config + tokenizer), streamed: memory stays
    at a few slices, whatever the model's size. Stored chunks follow ``mesh``'s shards."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg, source = hf_to_jax_lib.open_checked(hf_dir)
    dtype = dtype or hf_to_jax_lib.source_dtype(source, cfg)
    with atomic_output_dir(out_dir, overwrite) as tmp:  # checks OUT_DIR before any work
        hf_to_jax_lib.stream_hf(source, cfg, dtype, mesh or make_mesh(), tmp / params_checkpoint.PARAMS)
        params_checkpoint.write_meta(cfg, dtype, tmp)
        if jax.process_index() == 0:
            copy_aux_files(hf_dir, tmp)
    return out_dir


def jax_to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Converted folder -> HF folder, read from disk and written a piece at a time."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    cfg, stored_dtype = params_checkpoint.read_meta(ckpt_dir)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        export_hf(checkpoint_reader(ckpt_dir / params_checkpoint.PARAMS), cfg, tmp,
                  dtype or stored_dtype, ckpt_dir, max_shard_bytes)
    return out_dir


def export_model(model: Llama, out_dir: str | Path, *, dtype: str | None = None,
                 aux_dir: str | Path | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 overwrite: bool = False) -> Path:
    """A live model -> HF folder (the trainer's final export)."""
    params = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        export_hf(live_reader(params), model.config, tmp, dtype or model.options.param_dtype,
                  Path(aux_dir) if aux_dir else None, max_shard_bytes, collective=True)
    return Path(out_dir)
