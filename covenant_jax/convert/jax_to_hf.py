"""Parameters -> HF folder (size-capped safetensors shards + index, config, tokenizer).

One parameter is fetched at a time (from a live model, or restored alone from a checkpoint),
each layer's tensor is gathered to the host, converted by the key map and streamed into the
shard file; process 0 writes every file. Peak host memory is one stacked parameter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np

from covenant_jax.config import ModelConfig
from covenant_jax.convert import keymap
from covenant_jax.convert.safetensors_io import write_safetensors
from covenant_jax.io import AUX_FILES, copy_aux_files, write_json

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host, also when other processes hold parts of it."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _plan_shards(entries, max_shard_bytes: int) -> list[list]:
    shards, size = [[]], 0
    for entry in entries:
        nbytes = int(np.prod(entry[2].hf_shape)) * entry[3].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def export_hf(
    get_param: Callable[[tuple[str, ...]], jax.Array], cfg: ModelConfig, out_dir: Path,
    dtype: str, aux_dir: Path | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Writes the HF folder into ``out_dir`` (an existing, empty folder); returns the weight files."""
    out_dtype = np.dtype(jax.numpy.dtype(dtype))
    entries = [
        (m.hf_name(layer), layer, m, out_dtype)
        for m in keymap.tensor_maps(cfg)
        for layer in (range(cfg.num_hidden_layers) if m.stacked else [None])
    ]
    shards = _plan_shards(entries, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    lead = jax.process_index() == 0
    cache: dict[tuple[str, ...], jax.Array] = {}

    def tensors(shard) -> Iterator[np.ndarray]:
        for _, layer, m, dt in shard:
            if m.path not in cache:
                cache.clear()  # hold one parameter at a time
                cache[m.path] = get_param(m.path)
            value = cache[m.path] if layer is None else cache[m.path][layer]
            yield np.ascontiguousarray(m.to_hf(to_host(value)), dtype=dt)  # one copy, HF layout

    for name, shard in zip(names, shards):
        specs = [(key, m.hf_shape, dt) for key, _, m, dt in shard]
        if lead:
            write_safetensors(out_dir / name, specs, tensors(shard))
        else:  # take part in the gathers, write nothing
            for _ in tensors(shard):
                pass
    cache.clear()
    if lead:
        _write_side_files(cfg, out_dir, out_dtype, names, shards, aux_dir)
    return names


def _write_side_files(cfg, out_dir: Path, out_dtype: np.dtype, names, shards, aux_dir) -> None:
    if len(names) > 1:
        total = sum(int(np.prod(m.hf_shape)) * dt.itemsize for s in shards for _, _, m, dt in s)
        weight_map = {key: name for name, s in zip(names, shards) for key, _, _, _ in s}
        write_json(out_dir / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    hf = cfg.to_hf_dict()
    hf["dtype" if "dtype" in hf else "torch_dtype"] = out_dtype.name
    write_json(out_dir / "config.json", hf)
    if aux_dir is not None:
        copy_aux_files(aux_dir, out_dir)
    if not (out_dir / "generation_config.json").exists():
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        write_json(out_dir / "generation_config.json", gen)


