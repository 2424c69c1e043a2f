"""Readers that turn a file (local or on an object store, e.g. ``gs://``) or an in-memory dataset
into a list of raw rows.

Why a plain list: SFT corpora fit in host memory, and a list gives the Grain pipeline random
access, exact lengths for the eval split and a complete validation report before training.

A row that cannot even be decoded (bad UTF-8 or bad JSON on one JSONL line, a CSV record with
more cells than the header) does not abort the read: it becomes a `BadRow` carrying its skip
reason, so it is counted like any other invalid row. A file that cannot be read at all raises,
naming the file. Each row knows where it came from (`Rows.where`: ``file:line`` for JSONL and
CSV, ``file:row N`` otherwise), so the skip report can point at it. A UTF-8 byte-order mark
(Windows tools write one) is dropped; a UTF-16 file is refused with that name. `iter_rows`
yields the same rows one at a time with where they are, streaming a JSONL file (the parallel
preparation of a large file never holds it whole).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import json
import os
from typing import Any, Callable, Iterator, Sequence

from covenant_jax import storage
from covenant_jax.errors import UserError

BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
EXTENSIONS = ("jsonl", "json", "csv", "parquet")


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A row lost before parsing; `reason` is a skip reason (see formats.SKIP_REASONS)."""

    reason: str
    detail: str = ""


class Rows(list):
    """A source's rows (dicts or BadRows), each locatable for the skip report."""

    def __init__(self, rows: Sequence = (), name: str = "", lines: Sequence[int] | None = None):
        super().__init__(rows)
        self.name = name
        self.lines = lines  # Line of each row in the file (JSONL, CSV), else None.

    def where(self, i: int) -> str:
        """`file:line` (or `file:row N`, `row N` for in-memory data), 1-based."""
        place = str(self.lines[i]) if self.lines is not None else f"row {i + 1}"
        return f"{self.name}:{place}" if self.name else place

    def head(self, limit: int | None) -> Rows:
        if limit is None or limit >= len(self):
            return self
        lines = None if self.lines is None else self.lines[:limit]
        return Rows(self[:limit], self.name, lines)


def read_rows(source: Any, max_rows: int = 0) -> Rows:
    """Returns the rows of `source`: a .jsonl/.json/.csv/.parquet path, a list of dicts, or an HF
    `datasets.Dataset` (anything with `column_names` that iterates over dict rows). With
    max_rows > 0 only the first max_rows rows (a JSONL or CSV file is read no further)."""
    limit = max_rows if max_rows > 0 else None
    if isinstance(source, (str, os.PathLike)):
        return _read_path(os.fspath(source), limit).head(limit)
    if isinstance(source, (list, tuple)):
        return Rows(source[:limit])
    if hasattr(source, "column_names"):  # datasets.Dataset; optional dependency, duck-typed.
        return Rows([dict(row) for row, _ in zip(source, range(limit or len(source)))])
    raise TypeError(
        f"Unsupported data source {type(source).__name__}: expected a path, "
        "a list of dicts or a datasets.Dataset"
    )


def _read_path(path: str, limit: int | None = None) -> Rows:
    _check_exists(path)
    if storage.path(path).is_dir():
        return _read_hf_dir(path)
    ext = path.lower().rsplit(".", 1)[-1]
    if ext not in EXTENSIONS:
        known = ", ".join("." + e for e in EXTENSIONS)
        raise UserError(f"{path}: unknown data file extension {ext!r} (use {known})")
    if ext == "parquet":
        return _read_parquet(path)
    _check_not_utf16(path)
    if ext == "jsonl":
        return _read_jsonl(path, limit)
    if ext == "csv":
        return _read_csv(path, limit)
    return _read_json(path)


def _check_exists(path: str) -> None:
    if not storage.path(path).exists():
        raise FileNotFoundError(f"Data file not found: {path}")


def _check_not_utf16(path: str) -> None:
    with storage.path(path).open("rb") as f:
        if f.read(2) in _UTF16_BOMS:
            raise UserError(f"{path}: the file is UTF-16 (byte-order mark); save it as UTF-8")


def _read_jsonl(path: str, limit: int | None = None) -> Rows:
    rows, lines = [], []
    for lineno, raw in itertools.islice(_jsonl_lines(path), limit):
        rows.append(_parse_jsonl_line(raw))
        lines.append(lineno)
    return Rows(rows, path, lines)


def _jsonl_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line holding a row (blank lines do not), streamed; the
    first line's byte-order mark dropped."""
    with storage.path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            if _holds_row(raw):
                yield lineno, raw


def _holds_row(raw: bytes) -> bool:
    try:
        return bool(raw.decode("utf-8").strip())
    except UnicodeDecodeError:
        return True  # A row, skipped as non_utf8.


def _parse_jsonl_line(raw: bytes) -> dict | BadRow:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow("non_utf8", str(e))
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return BadRow("invalid_json", str(e))
    return row if isinstance(row, dict) else BadRow("invalid_json", "not an object")


def _read_json(path: str) -> Rows:
    """A JSON array of rows, an object holding one array of rows, or JSONL named .json."""
    raw = storage.path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # Drops a byte-order mark.
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: file is not valid UTF-8 ({e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return _read_json_lines(path, text, e)
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a JSON array of rows or an object with one array")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of rows")
    return Rows(
        [r if isinstance(r, dict) else BadRow("invalid_json", "not an object") for r in data],
        path,
    )


def _read_json_lines(path: str, text: str, error: json.JSONDecodeError) -> Rows:
    """Many ".json" SFT files are really JSON lines; a file that is neither names the JSON
    error instead of reporting every line as a bad row."""
    if not text.lstrip().startswith("["):
        rows = _read_jsonl(path)
        if any(not isinstance(r, BadRow) for r in rows):
            return rows
    raise UserError(f"{path}: not valid JSON ({error}) nor JSON lines")


def _read_csv(path: str, limit: int | None = None) -> Rows:
    """A header row, then one row per record (a quoted cell may span lines). Cells are strings;
    an empty cell is None (as pandas / `datasets` read it). Bytes that are not UTF-8 reach the
    row as surrogates, so that row alone is skipped as non_utf8."""
    csv.field_size_limit(2**31 - 1)  # SFT answers are longer than the 128 KiB default.
    rows, lines = [], []
    with storage.path(path).open("rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text)
        try:
            header = next(reader)
        except StopIteration:
            return Rows([], path, [])
        except csv.Error as e:
            raise UserError(f"{path}:1: cannot read the CSV header ({e})") from e
        start = reader.line_num + 1
        while limit is None or len(rows) < limit:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # E.g. a NUL byte: the rest of the file cannot be trusted.
                raise UserError(f"{path}:{reader.line_num}: invalid CSV ({e})") from e
            if cells:  # A blank line is not a record.
                rows.append(_csv_row(header, cells))
                lines.append(start)
            start = reader.line_num + 1
    return Rows(rows, path, lines)


def _csv_row(header: list[str], cells: list[str]) -> dict | BadRow:
    if len(cells) > len(header):
        return BadRow("invalid_csv", f"{len(cells)} cells, the header has {len(header)}")
    cells = cells + [""] * (len(header) - len(cells))
    return {k: (v if v != "" else None) for k, v in zip(header, cells)}


def _read_parquet(path: str) -> Rows:
    try:
        import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError(f"{path}: reading parquet needs `pyarrow` (pip install pyarrow)") from e
    with storage.path(path).open("rb") as f:
        return Rows(pq.read_table(f).to_pylist(), path)


def _read_hf_dir(path: str) -> Rows:
    try:
        import datasets  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise UserError(
            f"{path} is a directory: only a `datasets.save_to_disk` folder is "
            "supported there, and the optional `datasets` package is missing"
        ) from e
    rows = read_rows(datasets.load_from_disk(path))
    rows.name = path
    return rows


def iter_rows(
    source: Any, max_rows: int = 0, select: Callable[[int], bool] | None = None
) -> Iterator[tuple[str, Any]]:
    """`read_rows` one row at a time, as (`Rows.where` location, row). A JSONL file is streamed,
    never held whole; other sources are read whole. Rows i with `select(i)` false are counted
    but not decoded (their row is None): a host skips the JSON of other hosts' shards."""
    limit = max_rows if max_rows > 0 else None
    if _is_jsonl_file(source):
        path = os.fspath(source)
        _check_exists(path)
        _check_not_utf16(path)
        located = (
            (f"{path}:{lineno}", functools.partial(_parse_jsonl_line, raw))
            for lineno, raw in _jsonl_lines(path)
        )
    else:
        rows = read_rows(source, max_rows)
        located = ((rows.where(i), functools.partial(_same, row)) for i, row in enumerate(rows))
    for i, (where, decode) in enumerate(itertools.islice(located, limit)):
        yield where, decode() if select is None or select(i) else None


def _is_jsonl_file(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike)) and os.fspath(source).lower().endswith(".jsonl")


def _same(row: Any) -> Any:
    return row
