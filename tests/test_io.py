"""Atomic output folders: published only whole, and only once their bytes are on disk."""

import os
from pathlib import Path

import pytest

from covenant_jax import io as io_lib


def test_output_is_fsynced_before_the_rename_that_publishes_it(tmp_path, monkeypatch):
    synced: list[Path] = []
    real_fsync, real_replace = io_lib._fsync, os.replace

    def fsync(path):
        synced.append(Path(path))
        real_fsync(path)

    def replace(src, dst):  # at the publishing rename, everything inside must already be synced
        if Path(src).name.endswith(".partial"):
            inside = {Path(src), *Path(src).rglob("*")}
            assert inside <= set(synced), sorted(inside - set(synced))
        real_replace(src, dst)

    monkeypatch.setattr(io_lib, "_fsync", fsync)
    monkeypatch.setattr(io_lib.os, "replace", replace)
    with io_lib.atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "params" / "d").mkdir(parents=True)
        (tmp / "params" / "d" / "chunk").write_bytes(b"\0" * 4096)
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "out" / "params" / "d" / "chunk").read_bytes() == b"\0" * 4096
    partial = tmp_path / ".out.partial"
    order = [p for p in synced if p != tmp_path]
    for child, parent in [
        (partial / "params" / "d" / "chunk", partial / "params" / "d"),
        (partial / "params" / "d", partial / "params"),
        (partial / "config.json", partial),
    ]:
        assert order.index(child) < order.index(parent), (child, parent)  # a folder after its entries
    assert synced[-1] == tmp_path  # then the folder holding the rename


def test_failed_output_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with io_lib.atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"1")
            raise RuntimeError("writer died")
    assert list(tmp_path.iterdir()) == []


def test_fsync_tree_skips_files_another_process_moved(tmp_path, monkeypatch):
    (tmp_path / "gone").write_text("x")
    real_open = os.open

    def open_after_rename(path, flags, *args):
        if str(path).endswith("gone"):
            raise FileNotFoundError(path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(io_lib.os, "open", open_after_rename)
    io_lib.fsync_tree(tmp_path)  # no error
