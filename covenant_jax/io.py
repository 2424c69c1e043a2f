"""Atomic output folders and the small files that travel with a model (tokenizer, configs).

A crash or a bad input never leaves a folder that looks like a valid export or
checkpoint. Locally, outputs are written into a temporary sibling and renamed into place at the
end; before that rename every file and folder in it is fsynced (:func:`fsync_tree`), so after a
power loss the folder is either absent or whole; writers inside it need not fsync file by file.
Object stores have no rename: there the output is written in place, between an in-progress
marker written first and deleted last (``storage.INCOMPLETE``), and our readers refuse a folder
that holds it. With several processes, process 0 owns the folder; the others write into it
between barriers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax

from covenant_jax import storage
from covenant_jax.errors import OutputExistsError

# Files beside the weights that transformers and vLLM read.
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _fsync(path: str | Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # renamed or removed by another process, which syncs its own files
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsyncs every file under ``root``, then every folder (deepest first, ``root`` last), so
    the files' data and their names are on disk."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)


def _has_content(out_dir: storage.Path) -> bool:
    """Whether ``out_dir`` holds something to protect (a leftover of an unfinished write on an
    object store does not count: it is replaced like the local temporary sibling)."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        return True
    names = {p.name for p in out_dir.iterdir()}
    return bool(names) and not (storage.is_remote(out_dir) and storage.INCOMPLETE in names)


def check_output_dir(out_dir: str | Path, overwrite: bool = False, inputs: tuple = ()) -> storage.Path:
    """The checks an output folder gets before any work: not one of ``inputs`` (nor inside or
    around one), empty unless ``overwrite``, writable. (Room for the bytes: ``storage.check_free_space``.)"""
    out_dir = storage.path(out_dir)
    for source in inputs:
        storage.check_separate(source, out_dir)
    if _has_content(out_dir) and not overwrite:
        raise OutputExistsError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    # Locally the output is built beside out_dir and renamed; remotely it is written in place.
    storage.check_writable(out_dir, out_dir if storage.is_remote(out_dir) else out_dir.parent)
    return out_dir


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[storage.Path]:
    """Yields the folder to write the output into; it appears at ``out_dir`` whole, or not at
    all (see the module docstring)."""
    out_dir = storage.path(out_dir)
    if _has_content(out_dir) and not overwrite:
        raise OutputExistsError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    publish = _write_in_place if storage.is_remote(out_dir) else _write_and_rename
    with publish(out_dir) as folder:
        yield folder


@contextlib.contextmanager
def _write_and_rename(out_dir: storage.Path) -> Iterator[Path]:
    """Local: a temporary sibling, fsynced, then renamed to ``out_dir``. Each process fsyncs what
    it wrote (on a shared host, the rest is already clean)."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    lead = jax.process_index() == 0
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _sync(f"atomic_output_dir:start:{out_dir}")
    try:
        yield tmp
        fsync_tree(tmp)
        _sync(f"atomic_output_dir:done:{out_dir}")
    except BaseException:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if lead:
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        _fsync(out_dir.parent)  # the rename itself
    _sync(f"atomic_output_dir:renamed:{out_dir}")


def _clear(folder: storage.Path, keep: str | None = None) -> None:
    """Deletes everything under ``folder`` except the entry ``keep``."""
    for child in folder.iterdir() if folder.exists() else ():
        if child.name == keep:
            continue
        if child.is_dir():
            child.rmtree()
        else:
            child.unlink()


@contextlib.contextmanager
def _write_in_place(out_dir: storage.Path) -> Iterator[storage.Path]:
    """Object stores: the in-progress marker first, then the old content goes, the output is
    written into ``out_dir`` itself, and deleting the marker (one atomic object delete)
    publishes it. A failure deletes what was written, the marker last."""
    marker = out_dir / storage.INCOMPLETE
    lead = jax.process_index() == 0
    if lead:
        marker.write_text("being written by covenant-jax; a folder holding this file is not complete\n")
        _clear(out_dir, keep=storage.INCOMPLETE)
    _sync(f"atomic_output_dir:start:{out_dir}")
    try:
        yield out_dir
        _sync(f"atomic_output_dir:done:{out_dir}")
    except BaseException:
        if lead:
            _clear(out_dir, keep=storage.INCOMPLETE)
            marker.unlink()
        raise
    if lead:
        marker.unlink()
    _sync(f"atomic_output_dir:published:{out_dir}")


def copy_aux_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copies the tokenizer / chat template / generation config files that exist in ``src``."""
    src, dst = storage.path(src), storage.path(dst)
    copied = []
    for name in AUX_FILES:
        if (src / name).is_file():
            storage.copy_file(src / name, dst / name)
            copied.append(name)
    return copied


def write_json(path: str | Path, obj: Any) -> None:
    storage.path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
