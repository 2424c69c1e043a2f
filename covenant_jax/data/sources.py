"""Readers that turn a file (local or on an object store, e.g. ``gs://``) or an in-memory dataset
into a list of raw rows.

Why a plain list: SFT corpora fit in host memory, and a list gives the Grain pipeline random
access, exact lengths for the eval split and a complete validation report before training.

A row that cannot even be decoded (bad UTF-8 or bad JSON on one JSONL line) does not abort the
read: it becomes a `BadRow` carrying its skip reason, so it is counted like any other invalid
row. A file that cannot be read at all raises, naming the file.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Any, Iterator

from covenant_jax import storage
from covenant_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A row lost before parsing; `reason` is a skip reason (see formats.SKIP_REASONS)."""

    reason: str
    detail: str = ""


def read_rows(source: Any, max_rows: int = 0) -> list[dict | BadRow]:
    """Returns the rows of `source`: a .jsonl/.json/.parquet path, a list of dicts, or an HF
    `datasets.Dataset` (anything with `column_names` that iterates over dict rows). With
    max_rows > 0 only the first max_rows rows (a JSONL file is read no further)."""
    limit = max_rows if max_rows > 0 else None
    if isinstance(source, (str, os.PathLike)):
        return _read_path(os.fspath(source), limit)[:limit]
    if isinstance(source, (list, tuple)):
        return list(source[:limit])
    if hasattr(source, "column_names"):  # datasets.Dataset; optional dependency, duck-typed.
        return [dict(row) for row, _ in zip(source, range(limit or len(source)))]
    raise TypeError(
        f"Unsupported data source {type(source).__name__}: expected a path, "
        "a list of dicts or a datasets.Dataset"
    )


def _read_path(path: str, limit: int | None = None) -> list[dict | BadRow]:
    if not storage.path(path).exists():
        raise FileNotFoundError(f"Data file not found: {path}")
    if storage.path(path).is_dir():
        return _read_hf_dir(path)
    ext = path.lower().rsplit(".", 1)[-1]
    if ext == "jsonl":
        return _read_jsonl(path, limit)
    if ext == "json":
        return _read_json(path)
    if ext == "parquet":
        return _read_parquet(path)
    raise UserError(f"{path}: unknown data file extension {ext!r} (use .jsonl, .json, .parquet)")


def _read_jsonl(path: str, limit: int | None = None) -> list[dict | BadRow]:
    rows = []
    with storage.path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            row = _parse_jsonl_line(raw, f"{path}:{lineno}")
            if row is not None:
                rows.append(row)
    return rows


def _parse_jsonl_line(raw: bytes, where: str) -> dict | BadRow | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow("non_utf8", f"{where}: {e}")
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return BadRow("invalid_json", f"{where}: {e}")
    return row if isinstance(row, dict) else BadRow("invalid_json", f"{where}: not an object")


def _read_json(path: str) -> list[dict | BadRow]:
    """A JSON array of rows, an object holding one array of rows, or JSONL named .json."""
    raw = storage.path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: file is not valid UTF-8 ({e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)  # Many ".json" SFT files are really JSON lines.
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a JSON array of rows or an object with one array")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of rows")
    return [
        r if isinstance(r, dict) else BadRow("invalid_json", f"{path}: row {i} is not an object")
        for i, r in enumerate(data)
    ]


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError(f"{path}: reading parquet needs `pyarrow` (pip install pyarrow)") from e
    with storage.path(path).open("rb") as f:
        return pq.read_table(f).to_pylist()


def _read_hf_dir(path: str) -> list[dict]:
    try:
        import datasets  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise UserError(
            f"{path} is a directory: only a `datasets.save_to_disk` folder is "
            "supported there, and the optional `datasets` package is missing"
        ) from e
    return read_rows(datasets.load_from_disk(path))


def iter_rows(source: Any, max_rows: int = 0, select=None) -> Iterator[tuple[str, Any]]:
    """`read_rows` one row at a time, as (location, row): a JSONL file is streamed (never held
    in memory) and located as ``path:line``; other sources are read whole and located by row
    index (``path[i]``, or ``row i`` in memory). Rows i with ``select(i)`` false are counted but not decoded (their row is None)."""
    limit = max_rows if max_rows > 0 else None
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).lower().endswith(".jsonl"):
        rows = _iter_jsonl(os.fspath(source))
    else:
        where = f"{os.fspath(source)}[{{}}]" if isinstance(source, (str, os.PathLike)) else "row {}"
        rows = ((where.format(i), lambda r=r: r) for i, r in enumerate(read_rows(source, max_rows)))
    for i, (where, decode) in enumerate(itertools.islice(rows, limit)):
        yield where, decode() if select is None or select(i) else None


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    """(``path:line``, a function decoding the line) per non-empty line, streamed."""
    if not storage.path(path).exists():
        raise FileNotFoundError(f"Data file not found: {path}")
    with storage.path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if _is_row(raw):
                where = f"{path}:{lineno}"
                yield where, lambda raw=raw, where=where: _parse_jsonl_line(raw, where)


def _is_row(raw: bytes) -> bool:
    """Whether `read_rows` counts this JSONL line as a row (blank lines are not rows)."""
    try:
        return bool(raw.decode("utf-8").strip())
    except UnicodeDecodeError:
        return True
