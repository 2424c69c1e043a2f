"""Memory-mapped safetensors reading and streaming writing.

Hand-written on purpose: the ``safetensors`` package's numpy backend cannot read bfloat16, and
its writer needs every tensor of a file in memory at once. The format is an 8-byte header
length, a JSON header (dtype, shape, byte offsets per tensor) and raw little-endian bytes, so
a range of whole rows is one ``pread``, any other slice a view of an ``mmap`` (touching only its
bytes), and writing is the header followed by one tensor (or row range) at a time.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator

import ml_dtypes
import numpy as np

from covenant_jax.errors import UserError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    # fp8 (quantized checkpoints): readable, so the checks can name them as quantized
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(UserError):
    """A safetensors file is truncated, corrupt or not what its header says."""


class SafetensorsFile:
    """One file's header, and each tensor as a read-only memory-mapped view."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{self.path}: truncated (no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100 << 20):
                raise SafetensorsError(f"{self.path}: corrupt header length {header_len}")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: corrupt header ({e})") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.entries: dict[str, dict[str, Any]] = header
        for name, entry in header.items():
            self._check_entry(name, entry, size)
        self._mmap: mmap.mmap | None = None

    def _check_entry(self, name: str, entry: dict[str, Any], size: int) -> None:
        if entry.get("dtype") not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        expected = int(np.prod(entry["shape"], dtype=np.int64)) * DTYPES[entry["dtype"]].itemsize
        if end - begin != expected:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has {end - begin} bytes, expected {expected}")
        if self.data_start + end > size:
            raise SafetensorsError(
                f"{self.path}: truncated: tensor {name!r} ends at byte {self.data_start + end} "
                f"but the file has {size} bytes"
            )

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
        out = np.empty((stop - start, *shape[1:]), dtype)
        offset = self.data_start + entry["data_offsets"][0] + start * row_bytes
        with open(self.path, "rb", buffering=0) as f:
            view = memoryview(out.reshape(-1).view(np.uint8))
            while view.nbytes:  # pread may return less than asked
                got = os.preadv(f.fileno(), [view], offset)
                if got == 0:
                    raise SafetensorsError(f"{self.path}: truncated while reading tensor {name!r}")
                view, offset = view[got:], offset + got
        return out

    def mapped(self, name: str) -> np.ndarray:
        """A read-only view of the memory-mapped tensor."""
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
    ``pread``; any other index goes through the memory map."""

    def __init__(self, file: SafetensorsFile, name: str):
        self.file, self.name = file, name
        self.shape = file.shape(name)
        self.dtype = file.dtype(name)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        if self.shape and index and isinstance(index[0], slice) and all(
                isinstance(s, slice) and s.indices(d) == (0, d, 1) for s, d in zip(index[1:], self.shape[1:])):
            start, stop, step = index[0].indices(self.shape[0])
            if step == 1:
                return self.file.rows(self.name, start, max(start, stop))
        return self.file.mapped(self.name)[index]

    def __array__(self, dtype=None, copy=None):
        out = self[(slice(None),) * len(self.shape)] if self.shape else self.file.mapped(self.name)
        return out if dtype is None else out.astype(dtype)


def write_safetensors(
    path: str | Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Iterator[np.ndarray | Iterable[np.ndarray]], metadata: dict[str, str] | None = None,
) -> None:
    """Write the header for ``tensors`` (name, shape, dtype), then each tensor ``produce`` yields,
    in ``tensors`` order: an array, or an iterable of consecutive row ranges of it (pieces), so
    peak memory is one tensor, or one piece."""
    specs = list(tensors)
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte alignment, as the reference writer does
    with open(path, "wb") as f:
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
        f.flush()
        os.fsync(f.fileno())
