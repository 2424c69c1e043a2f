"""Every location a user gives -- model, data, run dir, checkpoints, exports, eval output,
conversion in and out -- as one path type, etils ``epath`` (what Orbax uses): local folders and
object stores (``gs://`` through gcsfs; ``s3://`` and the rest where fsspec has the filesystem)
take the same code. Orbax and TensorStore open ``gs://`` paths natively.

Also the checks every output makes before any work: writable (a probe), room for the bytes
(local), not overlapping its input, and the in-progress marker that keeps "absent or whole" on
object stores, which cannot rename a folder (see ``io.atomic_output_dir``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import Iterable, Iterator

from etils import epath

from covenant_jax.errors import IncompleteFolderError, OutputNotWritableError, OutputOverlapsInputError

Path = epath.Path

# Written first and deleted last by a writer on an object store (io.atomic_output_dir); a folder
# holding it is being written or its writer died, and our readers refuse it.
INCOMPLETE = ".covenant-incomplete"


def _no_stale_listings() -> None:
    """gcsfs caches each folder listing for good by default: objects that TensorStore or another
    host writes later would stay unseen (a checkpoint step, a commit marker). List afresh."""
    import fsspec.config

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_no_stale_listings()


def is_remote(path: os.PathLike | str) -> bool:
    """True for a URL (``gs://bucket/x``), False for a local path."""
    return "://" in os.fspath(path)


def path(p: os.PathLike | str) -> Path:
    """A user's path: a URL as given, a local path made absolute (symlinks kept)."""
    return Path(p) if is_remote(p) else Path(os.path.abspath(os.fspath(p)))


def makedirs(folder: Path) -> None:
    """Local: creates the folder. Object stores have no folders (and gcsfs would create a missing
    *bucket*), so there it does nothing."""
    if not is_remote(folder):
        folder.mkdir(parents=True, exist_ok=True)


def _fs(p: Path):
    import fsspec

    return fsspec.core.url_to_fs(os.fspath(p))


def object_info(p: Path) -> dict:
    """A remote object's metadata as its store reports it (size, checksums, generation), without
    reading the object."""
    fs, fs_path = _fs(p)
    return fs.info(fs_path)


def list_objects(folder: Path) -> dict[str, dict]:
    """{name relative to ``folder``: metadata} of every object under a remote folder, from one
    listing (no object is read)."""
    fs, root = _fs(folder)
    root = root.rstrip("/")
    return {name[len(root) + 1 :]: info for name, info in fs.find(root, detail=True).items()}


def read_range(p: Path, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of a remote file, in one ranged request (fewer at its end)."""
    fs, fs_path = _fs(p)
    return fs.cat_file(fs_path, offset, offset + size)


@contextlib.contextmanager
def open_for_write(p: Path, *, sync: bool = False) -> Iterator:
    """A binary file to stream into. Remote: an upload in parts (gcsfs buffers one block), complete
    when the file closes. Local: fsynced at the end only with ``sync`` (outputs are written inside
    ``io.atomic_output_dir``, which fsyncs the whole folder once before publishing it)."""
    if is_remote(p):
        with p.open("wb") as f:
            yield f
        return
    with open(p, "wb") as f:
        yield f
        if sync:
            f.flush()
            os.fsync(f.fileno())


def copy_file(src: Path, dst: Path) -> None:
    """Copies one file between any two locations, local or remote."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copy2(src, dst)
        return
    with src.open("rb") as fin, open_for_write(dst) as fout:
        shutil.copyfileobj(fin, fout, 8 << 20)


@contextlib.contextmanager
def local_folder(folder: Path, names: Iterable[str]) -> Iterator[Path]:
    """``folder`` itself when local; for a remote one, a temporary local folder holding the files
    ``names`` that exist there (transformers loads tokenizers from local folders only)."""
    folder = path(folder)
    if not is_remote(folder):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="covenant-") as tmp:
        for name in names:
            if (folder / name).exists():
                copy_file(folder / name, Path(tmp) / name)
        yield Path(tmp)


def check_complete(folder: os.PathLike | str) -> None:
    """Refuses a folder whose writer on an object store has not finished (see ``INCOMPLETE``)."""
    folder = path(folder)
    if is_remote(folder) and (folder / INCOMPLETE).exists():
        raise IncompleteFolderError(
            f"{folder} is incomplete: it is being written, or its writer stopped before finishing "
            f"({INCOMPLETE} is there); write it again (--overwrite)"
        )


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def _probe(folder: Path) -> None:
    """Creates, syncs and deletes a small file in ``folder``: permissions, a read-only mount, a
    full disk (the byte needs a block), a missing bucket all fail here."""
    probe = folder / f".covenant-write-probe-{uuid.uuid4().hex}"
    with open_for_write(probe, sync=True) as f:
        f.write(b"\0")
    probe.unlink()


def check_writable(target: os.PathLike | str, folder: os.PathLike | str | None = None) -> None:
    """Refuses, in one line naming ``target``, an output that cannot be written. The probe goes
    where the writes will: ``folder`` (default: ``target`` itself, a folder) on an object store,
    locally its nearest existing ancestor."""
    folder = path(target if folder is None else folder)
    where = folder if is_remote(folder) else _nearest_existing(folder)
    if not is_remote(where) and not where.is_dir():
        raise OutputNotWritableError(f"{target}: cannot write there ({where} is not a folder)")
    try:
        _probe(where)
    except Exception as e:  # OSError locally; gcsfs raises its own HttpError types too
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e).splitlines()[0]
        raise OutputNotWritableError(f"{target}: cannot write there ({where}: {reason})") from e


def check_free_space(folder: os.PathLike | str, nbytes: int) -> None:
    """Refuses a local output whose filesystem has less than ``nbytes`` free (object stores: no limit)."""
    folder = path(folder)
    if is_remote(folder):
        return
    free = shutil.disk_usage(_nearest_existing(folder)).free
    if free < nbytes:
        raise OutputNotWritableError(
            f"{folder}: not enough space: the output needs {nbytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free"
        )


def _resolved(p: Path) -> str:
    """Normalised path for comparisons: symlinks resolved locally, no trailing slash remotely."""
    return os.fspath(p).rstrip("/") if is_remote(p) else os.path.realpath(os.fspath(p))


def check_separate(source: os.PathLike | str, output: os.PathLike | str, what: str = "OUT_DIR") -> None:
    """Refuses an output folder that is ``source``, lies inside it, or contains it: replacing it
    would delete or mix with the input."""
    src, out = _resolved(path(source)), _resolved(path(output))
    relation = (
        "is"
        if out == src
        else "is inside"
        if out.startswith(src + "/")
        else "contains"
        if src.startswith(out + "/")
        else None
    )
    if relation:
        raise OutputOverlapsInputError(
            f"{what} {output} {relation} the input {source}: write the output to a separate folder"
        )
