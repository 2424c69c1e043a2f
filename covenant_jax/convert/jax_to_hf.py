"""Parameters -> HF folder (size-capped safetensors shards + index, config, tokenizer).

Each HF tensor is written in pieces -- ranges of its rows, the same units ``param_store``
stores -- read one at a time from a checkpoint on disk or gathered from a live model,
converted by the key map and appended to the shard file. Process 0 writes every file. Peak
host memory is about one piece.
"""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np

from covenant_jax.config import ModelConfig
from covenant_jax.convert import keymap, param_store
from covenant_jax.convert.safetensors_io import write_safetensors
from covenant_jax.io import copy_aux_files, write_json

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host, also when other processes hold parts of it."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Scratch:
    """A reusable read buffer, grown to the largest piece read into it."""

    def __init__(self):
        self._buffer = np.empty(0, np.uint8)

    def buffer(self, nbytes: int) -> np.ndarray:
        if self._buffer.nbytes < nbytes:
            self._buffer = np.empty(nbytes, np.uint8)
        return self._buffer


# (tensor map, index into our array, scratch) -> a call that returns that slice on the host, in
# our axis order. A reader may start fetching before the call (read-ahead) and may read into
# the scratch buffer, which belongs to that piece until the piece is written.
ReadSlice = Callable[[keymap.TensorMap, param_store.Index, Scratch], Callable[[], np.ndarray]]

# Pieces being fetched while the current one is written.
READ_AHEAD = 2


def live_reader(params: dict[tuple[str, ...], jax.Array]) -> ReadSlice:
    """Slices of a live model's arrays (a collective: every process must call it, in order)."""
    return lambda m, index, scratch: lambda: to_host(params[m.path][index])


def checkpoint_reader(params_dir: Path) -> ReadSlice:
    """Slices read from a params checkpoint on disk (no devices, no collectives), laid out in
    HF memory order so turning them into HF rows is a reshape, not a transpose."""
    readers: dict[tuple[str, ...], param_store.ParamReader] = {}

    def read(m, index, scratch):
        if m.path not in readers:
            readers.clear()  # one parameter open at a time
            readers[m.path] = param_store.ParamReader(params_dir, ".".join(m.path), m.storage_order)
        return readers[m.path].read(index, scratch.buffer)

    return read


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


def _shard_tensors(read: ReadSlice, shard: list) -> Iterator[Iterator[np.ndarray]]:
    """Each tensor of ``shard`` as its consecutive HF row ranges, fetched ``READ_AHEAD`` ahead.

    Read ``n`` goes into scratch buffer ``n % (READ_AHEAD + 1)``: when it starts, reads ``n - 1``
    .. ``n - READ_AHEAD`` are in flight and read ``n - READ_AHEAD - 1``, the buffer's last user,
    has been written (the writer takes each piece before asking for the next).
    """
    pieces = [
        [(m, layer, dt, index) for index in param_store.row_ranges(m.shape, dt.itemsize, m.split_axis)]
        for _, layer, m, dt in shard
    ]
    scratch = itertools.cycle([Scratch() for _ in range(READ_AHEAD + 1)])

    def fetched() -> Iterator[np.ndarray]:
        pending: collections.deque = collections.deque()
        for m, layer, dt, index in itertools.chain.from_iterable(pieces):
            full_index = index if layer is None else (slice(layer, layer + 1),) + index
            pending.append((m, layer, dt, read(m, full_index, next(scratch))))
            if len(pending) > READ_AHEAD:
                yield _to_hf(*pending.popleft())
        while pending:
            yield _to_hf(*pending.popleft())

    flat = fetched()
    for tensor_pieces in pieces:
        yield (next(flat) for _ in tensor_pieces)


def _to_hf(m: keymap.TensorMap, layer: int | None, dtype: np.dtype, fetch) -> np.ndarray:
    piece = fetch() if layer is None else fetch()[0]
    return np.ascontiguousarray(m.piece_to_hf(piece), dtype=dtype)


def export_hf(
    read: ReadSlice,
    cfg: ModelConfig,
    out_dir: Path,
    dtype: str,
    aux_dir: Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    collective: bool = False,
) -> list[str]:
    """Writes the HF folder into ``out_dir`` (an existing, empty folder); returns the weight files.

    ``collective``: ``read`` needs every process (a live model); otherwise only process 0 reads.
    """
    out_dtype = np.dtype(jax.numpy.dtype(dtype))
    entries = [
        (m.hf_name(layer), layer, m, out_dtype)
        for m in keymap.tensor_maps(cfg)
        for layer in (range(cfg.num_hidden_layers) if m.stacked else [None])
    ]
    shards = _plan_shards(entries, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    lead = jax.process_index() == 0
    for name, shard in zip(names, shards):
        tensors = _shard_tensors(read, shard)
        if lead:
            write_safetensors(out_dir / name, [(key, m.hf_shape, dt) for key, _, m, dt in shard], tensors)
        elif collective:  # take part in the gathers, write nothing
            for pieces in tensors:
                for _ in pieces:
                    pass
    if lead:
        _write_side_files(cfg, out_dir, out_dtype, names, shards, aux_dir)
    return names


def _write_side_files(cfg, out_dir: Path, out_dtype: np.dtype, names, shards, aux_dir) -> None:
    if len(names) > 1:
        total = sum(int(np.prod(m.hf_shape)) * dt.itemsize for s in shards for _, _, m, dt in s)
        weight_map = {key: name for name, s in zip(names, shards) for key, _, _, _ in s}
        write_json(
            out_dir / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    hf = cfg.to_hf_dict()
    hf["dtype" if "dtype" in hf else "torch_dtype"] = out_dtype.name
    write_json(out_dir / "config.json", hf)
    if aux_dir is not None:
        copy_aux_files(aux_dir, out_dir)
        _fit_tokenizer_to_context(out_dir / "tokenizer_config.json", cfg.max_position_embeddings)
    if not (out_dir / "generation_config.json").exists():
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        write_json(out_dir / "generation_config.json", gen)


def _fit_tokenizer_to_context(path: Path, max_positions: int) -> None:
    """After a context extension the copied tokenizer_config.json still says the old
    ``model_max_length`` (SmolLM2: 8192), and transformers' tokenizer truncates or warns at it:
    raise it to the model's context. A larger value (often transformers' "no limit" 1e30) stays."""
    if not path.is_file():
        return
    tokenizer_config = json.loads(path.read_text())
    current = tokenizer_config.get("model_max_length")
    if isinstance(current, (int, float)) and current < max_positions:
        path.unlink()  # a copy of a read-only source file keeps its mode
        write_json(path, {**tokenizer_config, "model_max_length": max_positions})
