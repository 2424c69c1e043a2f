"""Atomic output folders and the small files that travel with a model (tokenizer, configs).

Decision 9: outputs are written into a temporary sibling and renamed into place at the end,
so a crash or a bad input never leaves a folder that looks like a valid export or checkpoint.
Before that rename every file and folder in it is fsynced (:func:`fsync_tree`), so after a power
loss the folder is either absent or whole; writers inside it need not fsync file by file.
With several processes, process 0 owns the folder; the others write into it between barriers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax

from covenant_jax.errors import UserError

# Files beside the weights that transformers and vLLM read.
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


class OutputExistsError(UserError, FileExistsError):
    """OUT_DIR is not empty and --overwrite was not given."""


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


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of ``out_dir``; on success fsyncs it, then renames it to
    ``out_dir``. Each process fsyncs what it wrote (on a shared host, the rest is already clean)."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
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


def copy_aux_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copies the tokenizer / chat template / generation config files that exist in ``src``."""
    copied = []
    for name in AUX_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
