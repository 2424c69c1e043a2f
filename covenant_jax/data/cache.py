"""The on-disk cache of prepared samples (prepare.py): one entry per source and the settings that
shape its samples, written once and read by index.

Why a cache: rendering and tokenising is the whole cost of the input pipeline (milliseconds a
chat row a core), so it is done once, shared by the hosts of a job (each writes its own shards)
and reused by every restart, later stage or eval with the same source and settings.

Why ArrayRecord: Grain reads it by index (`ArrayRecordDataSource`), across many files, without
loading it: a host holds only the readers' indexes and the per-sample arrays below, whatever the
token count. Its files are a deterministic function of their records (same samples, same
bytes), so an entry is identical whoever prepared it. ArrayRecord opens local files only (0.8),
so an entry on an object store (``gs://``) is written through a local file and read from a local
copy (`local_copy`).

Layout of an entry, ``<cache_dir>/<source stem>-<key>/``:

  shard-00000.array_record  the samples of rows [0, shard_rows), in row order; a record is the
                            sample's int32 tokens then its uint8 trained flags (5 bytes a token)
  shard-00000.json          that shard's tally and, per sample, its row's ordinal among the
                            shard's valid rows and whether that row was over seq_len
  ...
  index.npz                 the shards' per-sample arrays joined (ordinals made source-wide)
  manifest.json             written last, by one process: the entry is complete when it exists

A shard is complete when its .json exists (written after its records), so a preparation that
was stopped resumes at the first missing shard.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterable, Sequence

import numpy as np

from covenant_jax import storage
from covenant_jax.errors import CacheError

VERSION = 1  # Of the layout above; part of every key.
MANIFEST = "manifest.json"
INDEX = "index.npz"
# ArrayRecord writer options: one record a chunk (random access reads one record), no
# compression (token ids barely compress; reads stay a copy).
WRITER_OPTIONS = "group_size:1,uncompressed"


def key(spec: Any) -> str:
    """A short stable digest of a JSON-able spec (sorted keys)."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_identity(path: str) -> dict:
    """What the file's samples depend on, the same on every host: a local file's content digest
    (every host may hold its own copy; sha256 reads ~1 GB/s), or, on an object store, the
    store's content checksum (else its generation / etag), without reading the object."""
    p = storage.path(path)
    if not p.exists():
        raise FileNotFoundError(f"Data file not found: {path}")
    if not storage.is_remote(p):
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"size": os.path.getsize(p), "sha256": digest.hexdigest()}
    return _object_identity(storage.object_info(p))


def _object_identity(info: dict) -> dict:
    """An object's size and the store's content checksum (else its generation / etag)."""
    content = [k for k in ("md5Hash", "crc32c", "ContentMD5") if info.get(k)]
    keep = content or [
        k for k in ("generation", "etag", "ETag", "mtime", "updated", "LastModified") if k in info
    ]
    return {"size": info.get("size"), **{k: str(info[k]) for k in keep}}


# A model folder's files that its weights depend on: an HF folder's config and weights, a
# converted folder's config, meta and Orbax checkpoint (not the tokenizer's files).
MODEL_FILES = re.compile(
    r"(config|covenant)\.json|[^/]*\.(safetensors|bin|safetensors\.index\.json)|params/.*"
)


def folder_identity(folder: str | os.PathLike) -> dict[str, dict]:
    """{file: identity} of a model folder's config and weight files: a local file's size and
    mtime (a content digest of a 72B model would read 144 GB on every start), an object's
    checksum or generation (read from the listing, not the object). Rewritten weights get a new
    mtime (or generation), so a new identity."""
    folder = storage.path(folder)
    if storage.is_remote(folder):
        listing = storage.list_objects(folder)
        return {k: _object_identity(info) for k, info in sorted(listing.items()) if MODEL_FILES.fullmatch(k)}
    out = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(parent, name), folder)
            if MODEL_FILES.fullmatch(rel):
                st = os.stat(os.path.join(parent, name))
                out[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return dict(sorted(out.items()))


def entry_name(source_path: str | None, spec_key: str) -> str:
    stem = os.path.basename(os.fspath(source_path or "dataset").rstrip("/")).split(".")[0]
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '_', stem)[:40] or 'source'}-{spec_key}"


class Entry:
    """One cache entry's folder (local or remote)."""

    def __init__(self, cache_dir: str | os.PathLike, name: str):
        self.dir = storage.path(cache_dir) / name
        self.name = name

    def shard_stem(self, shard: int) -> storage.Path:
        return self.dir / f"shard-{shard:05d}"

    def complete(self) -> bool:
        return (self.dir / MANIFEST).exists()

    def shard_done(self, shard: int) -> bool:
        return self.shard_stem(shard).with_suffix(".json").exists()

    def write_shard(self, shard: int, samples_records: Iterable[bytes], meta: dict) -> None:
        """The shard's records, then its meta (the shard's commit)."""
        storage.makedirs(self.dir)
        stem = self.shard_stem(shard)
        _write_array_record(stem.with_suffix(".array_record"), samples_records)
        write_bytes(stem.with_suffix(".json"), json.dumps(meta).encode())

    def read_shard_meta(self, shard: int) -> dict:
        path = self.shard_stem(shard).with_suffix(".json")
        if not path.exists():
            raise CacheError(
                f"data cache {self.dir}: shard {shard} is missing after every process prepared "
                "its share: data.cache_dir must be storage all hosts share (gs://, NFS), or run "
                "`covenant-jax data prepare` once before the job"
            )
        return json.loads(path.read_bytes())

    def finalize(self, shards: int, index: dict[str, np.ndarray], manifest: dict) -> None:
        """Writes the joined index, then the manifest: from then on the entry is complete."""
        buf = io.BytesIO()
        np.savez(buf, **index)
        write_bytes(self.dir / INDEX, buf.getvalue())
        write_bytes(self.dir / MANIFEST, json.dumps({**manifest, "shards": shards}).encode())

    def read(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(manifest, index arrays) of a complete entry."""
        manifest = json.loads((self.dir / MANIFEST).read_bytes())
        if manifest.get("version") != VERSION:
            raise CacheError(f"data cache {self.dir}: layout version {manifest.get('version')}, "
                             f"expected {VERSION}")  # fmt: skip
        with np.load(io.BytesIO((self.dir / INDEX).read_bytes())) as z:
            return manifest, {k: z[k] for k in z.files}

    def shard_files(self, shards: int) -> list[storage.Path]:
        return [self.shard_stem(s).with_suffix(".array_record") for s in range(shards)]


def encode_record(tokens: np.ndarray, weights: np.ndarray) -> bytes:
    return tokens.astype("<i4", copy=False).tobytes() + weights.astype(np.uint8).tobytes()


def decode_record(record: bytes) -> dict[str, np.ndarray]:
    n = len(record) // 5
    return {
        "tokens": np.frombuffer(record, "<i4", n),
        "weights": np.frombuffer(record, np.bool_, n, offset=4 * n),
    }


class ShardStore:
    """The samples of an entry, read by index through Grain's ArrayRecordDataSource."""

    def __init__(self, files: Sequence[os.PathLike]):
        import grain  # pylint: disable=g-import-not-at-top

        self._source = grain.sources.ArrayRecordDataSource([os.fspath(f) for f in files])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return decode_record(self._source[int(i)])


def local_copy(entry: Entry, shards: int, local_root: str | None = None) -> list[os.PathLike]:
    """Local paths of the entry's shard files: the files themselves when the entry is local,
    else a copy under ``local_root`` (default: the temp folder). The copy's folder is named after
    the manifest and appears whole (renamed into place), so it is reused as it is, also by other
    processes on the host."""
    files = entry.shard_files(shards)
    if not storage.is_remote(entry.dir):
        return files
    digest = hashlib.sha256((entry.dir / MANIFEST).read_bytes()).hexdigest()[:12]
    parent = os.path.join(local_root or tempfile.gettempdir(), "covenant-data-cache")
    root = os.path.join(parent, f"{entry.name}-{digest}")
    if not os.path.isdir(root):
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{entry.name}-", dir=parent)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda f: storage.copy_file(f, storage.Path(tmp) / f.name), files))
        try:
            os.rename(tmp, root)
        except OSError:  # Another process of this host renamed its copy first.
            shutil.rmtree(tmp, ignore_errors=True)
    return [storage.Path(root) / f.name for f in files]


def write_bytes(path: storage.Path, data: bytes) -> None:
    """Whole or absent: a local file is written beside and renamed; an object is one upload."""
    if storage.is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with storage.open_for_write(tmp) as f:
        f.write(data)
    os.replace(tmp, path)


def _write_array_record(path: storage.Path, records: Iterable[bytes]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

    remote = storage.is_remote(path)
    folder = tempfile.mkdtemp(prefix="covenant-shard-") if remote else os.fspath(path.parent)
    tmp = os.path.join(folder, f".{path.name}.tmp")
    try:
        try:
            writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
            for record in records:
                writer.write(record)
            writer.close()
        except RuntimeError as e:
            raise _as_os_error(e, tmp) from e
        _fsync(tmp)
        if remote:
            storage.copy_file(storage.Path(tmp), path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if remote:
            os.rmdir(folder)


def _as_os_error(error: RuntimeError, path: str) -> Exception:
    """ArrayRecord's writer reports a failed write() as a RuntimeError quoting strerror ("File too
    large", "No space left on device"); as an OSError with its errno, the CLI names a full disk in
    one line like any other."""
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO):
        if os.strerror(code) in str(error):
            return OSError(code, os.strerror(code), path)
    return error


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
