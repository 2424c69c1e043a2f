"""Memory-mapped safetensors reading and streaming writing.

Hand-written on purpose: the ``safetensors`` package's numpy backend cannot read bfloat16, and
its writer needs every tensor of a file in memory at once. The format is an 8-byte header
length, a JSON header (dtype, shape, byte offsets per tensor) and raw little-endian bytes, so
a range of whole rows is one ``pread``, any other slice a view of an ``mmap`` (touching only its
bytes), and writing is the header followed by one tensor (or row range) at a time.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator

import ml_dtypes
import numpy as np

from covenant_jax import storage
from covenant_jax.errors import SafetensorsError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    # fp8 (quantized checkpoints): readable, so the checks can name them as quantized
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# The safetensors library's own bound on the JSON header.
MAX_HEADER_BYTES = 100_000_000
ENTRY_FIELDS = ("dtype", "shape", "data_offsets")


def parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    """The JSON header, parsed as strictly as the library parses it: UTF-8, one object, no
    NaN/Infinity; a name given twice (the library keeps the last) is refused as ambiguous."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) < len(pairs):
            seen: set[str] = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise SafetensorsError(f"{path}: {twice!r} appears twice in the header")
        return out

    def no_constant(word: str):
        raise SafetensorsError(f"{path}: corrupt header ({word} is not JSON)")

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique, parse_constant=no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt header ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt header (not a JSON object)")
    return header


def check_header(path: Path, header: dict[str, Any], data_len: int) -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata, tensor entries) once every check the library makes on load has passed, so no
    offset can point into the header, into another tensor or past the file."""
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(
            f"{path}: __metadata__ must map strings to strings, got {json.dumps(metadata)[:80]}"
        )
    for name, entry in header.items():
        _check_entry(path, name, entry)
    _check_layout(path, header, data_len)
    return metadata, header


def _naturals(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _check_entry(path: Path, name: str, entry: Any) -> None:
    """One tensor's entry: a known dtype, a shape, two offsets, and as many bytes as they need."""
    if not isinstance(entry, dict) or not all(field in entry for field in ENTRY_FIELDS):
        raise SafetensorsError(
            f"{path}: tensor {name!r} needs dtype, shape and data_offsets, got {json.dumps(entry)[:80]}"
        )
    dtype, shape, offsets = (entry[field] for field in ENTRY_FIELDS)
    if dtype not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not _naturals(shape):
        raise SafetensorsError(
            f"{path}: tensor {name!r} has shape {shape}: expected a list of non-negative integers"
        )
    if not (_naturals(offsets) and len(offsets) == 2):
        raise SafetensorsError(
            f"{path}: tensor {name!r} has data_offsets {offsets}: expected two non-negative integers"
        )
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise SafetensorsError(
            f"{path}: tensor {name!r} has data_offsets {offsets}, "
            f"{offsets[1] - offsets[0]} bytes, but {dtype} {shape} needs {expected}"
        )


def _check_layout(path: Path, entries: dict[str, Any], data_len: int) -> None:
    """As the library requires: in offset order each tensor starts where the previous one ended,
    the first at 0, and the last ends where the file does."""
    end, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = entry["data_offsets"]
        if begin < end:
            raise SafetensorsError(
                f"{path}: tensor {name!r} at data_offsets [{begin}, {stop}] overlaps tensor {previous!r}"
            )
        if begin > end:
            raise SafetensorsError(f"{path}: {begin - end} bytes before tensor {name!r} belong to no tensor")
        end, previous = stop, name
    if end > data_len:
        raise SafetensorsError(
            f"{path}: truncated: the tensors need {end} bytes of data, the file has {data_len}"
        )
    if end < data_len:
        raise SafetensorsError(f"{path}: {data_len - end} bytes after the last tensor belong to no tensor")


class SafetensorsFile:
    """One file's header, and each tensor as a read-only memory-mapped view."""

    def __init__(self, path: str | Path):
        self.path = storage.path(path)
        size = self.path.stat().length
        with self.path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{self.path}: truncated (no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise SafetensorsError(f"{self.path}: corrupt header length {header_len}")
            header = parse_header(self.path, f.read(header_len))
        self.data_start = 8 + header_len
        self.metadata, self.entries = check_header(self.path, header, size - self.data_start)
        self._mmap: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def tensor(self, name: str) -> "TensorRows":
        """The tensor, read lazily: slicing reads only the bytes the slice covers."""
        return TensorRows(self, name)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (axis 0) in a fresh array, with one ``pread``: a large sequential
        read, where touching a mapping would fault pages in a few at a time."""
        entry = self.entries[name]
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        offset = self.data_start + entry["data_offsets"][0] + start * row_bytes
        if storage.is_remote(self.path):
            return self._fetch(name, offset, (stop - start, *shape[1:]), dtype)
        out = np.empty((stop - start, *shape[1:]), dtype)
        with open(self.path, "rb", buffering=0) as f:
            view = memoryview(out.reshape(-1).view(np.uint8))
            while view.nbytes:  # pread may return less than asked
                got = os.preadv(f.fileno(), [view], offset)
                if got == 0:
                    raise SafetensorsError(f"{self.path}: truncated while reading tensor {name!r}")
                view, offset = view[got:], offset + got
        return out

    def _fetch(self, name: str, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A remote file's bytes at ``offset`` as a read-only array: one ranged request."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = storage.read_range(self.path, offset, nbytes)
        if len(raw) < nbytes:
            raise SafetensorsError(f"{self.path}: truncated while reading tensor {name!r}")
        return np.frombuffer(raw, dtype).reshape(shape)

    def mapped(self, name: str) -> np.ndarray:
        """A read-only view of the memory-mapped tensor (remote: the tensor, fetched)."""
        if storage.is_remote(self.path):
            entry = self.entries[name]
            return self._fetch(
                name,
                self.data_start + entry["data_offsets"][0],
                tuple(entry["shape"]),
                DTYPES[entry["dtype"]],
            )
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        raw = np.frombuffer(self._mmap, dtype, (end - begin) // dtype.itemsize, self.data_start + begin)
        return raw.reshape(entry["shape"])


class TensorRows:
    """One stored tensor: ``[rows, ...]`` with whole trailing axes reads those rows with one
    ``pread``; any other index goes through the memory map (remote files: the rows it covers are
    fetched, then indexed)."""

    def __init__(self, file: SafetensorsFile, name: str):
        self.file, self.name = file, name
        self.shape = file.shape(name)
        self.dtype = file.dtype(name)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        if (
            self.shape
            and index
            and isinstance(index[0], slice)
            and all(
                isinstance(s, slice) and s.indices(d) == (0, d, 1) for s, d in zip(index[1:], self.shape[1:])
            )
        ):
            start, stop, step = index[0].indices(self.shape[0])
            if step == 1:
                return self.file.rows(self.name, start, max(start, stop))
        if storage.is_remote(self.file.path) and self.shape and index and isinstance(index[0], slice):
            start, stop, step = index[0].indices(self.shape[0])
            if step == 1:
                return self.file.rows(self.name, start, max(start, stop))[(slice(None),) + index[1:]]
        return self.file.mapped(self.name)[index]

    def __array__(self, dtype=None, copy=None):
        out = self[(slice(None),) * len(self.shape)] if self.shape else self.file.mapped(self.name)
        return out if dtype is None else out.astype(dtype)


def write_safetensors(
    path: str | Path,
    tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Iterator[np.ndarray | Iterable[np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the header for ``tensors`` (name, shape, dtype), then each tensor ``produce`` yields,
    in ``tensors`` order: an array, or an iterable of consecutive row ranges of it (pieces), so
    peak memory is one tensor, or one piece."""
    specs = list(tensors)
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte alignment, as the reference writer does
    with storage.open_for_write(storage.path(path)) as f:  # made durable by io.atomic_output_dir
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        written = 0
        for (name, shape, dtype), item in zip(specs, produce):
            written, rows = written + 1, 0
            for piece in [item] if isinstance(item, np.ndarray) else item:
                piece = np.ascontiguousarray(piece)
                if piece.dtype != np.dtype(dtype) or piece.shape[1:] != tuple(shape[1:]):
                    raise SafetensorsError(
                        f"{path}: tensor {name!r} arrived as {piece.dtype}{piece.shape}, "
                        f"header says {np.dtype(dtype)}{tuple(shape)}"
                    )
                f.write(memoryview(piece.reshape(-1).view(np.uint8)))
                rows += piece.shape[0] if piece.ndim else 1
            if rows != (shape[0] if len(shape) else 1):
                raise SafetensorsError(f"{path}: tensor {name!r} got {rows} rows, header says {tuple(shape)}")
        if written != len(specs):
            raise SafetensorsError(f"{path}: got {written} tensors, the header lists {len(specs)}")
