"""An HF model folder's weights as one name -> lazily read tensor source.

Safetensors (one file, or shards with ``model.safetensors.index.json``) are memory-mapped;
PyTorch ``.bin`` / ``.pt`` state dicts are loaded with ``torch.load(mmap=True)`` so their bytes
are paged in only when a slice is read. Nothing here holds a whole model in memory.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import ml_dtypes
import numpy as np

from covenant_jax import storage
from covenant_jax.errors import CheckpointError, SafetensorsError, require
from covenant_jax.convert.safetensors_io import SafetensorsFile


class _TorchFile:
    def __init__(self, path: Path):
        if storage.is_remote(path):
            raise CheckpointError(
                f"{path}: PyTorch files are read from local disk only (torch.load maps "
                "them into memory): convert from a local copy of the folder"
            )
        torch = require("torch", f"reading the PyTorch file {path.name}")
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types for corrupt files
            raise CheckpointError(f"{path}: cannot read PyTorch state dict ({e})") from e
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: not a flat state dict of tensors")
        self.path, self.state = path, state

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> np.dtype:
        return _torch_to_numpy(self.state[name].reshape(-1)[:1]).dtype

    def tensor(self, name: str) -> "_TorchView":
        return _TorchView(self.state[name])


class _TorchView:
    """Slicing reads the slice, then converts it (bfloat16 included) to numpy."""

    def __init__(self, t: Any):
        self.t = t
        self.shape = tuple(t.shape)

    def __getitem__(self, index) -> np.ndarray:
        return _torch_to_numpy(self.t[index])

    def __array__(self, dtype=None, copy=None):
        out = _torch_to_numpy(self.t)
        return out if dtype is None else out.astype(dtype)


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class WeightSource:
    """Every tensor of an HF folder: ``keys()``, ``shape(k)``, ``dtype(k)``, ``tensor(k)[slices]``."""

    def __init__(self, files: list[Any]):
        self._owner: dict[str, Any] = {}
        for f in files:
            for key in f.keys():
                if key in self._owner:
                    raise CheckpointError(
                        f"tensor {key!r} appears in both {self._owner[key].path} and {f.path}"
                    )
                self._owner[key] = f
        self.files = files

    def keys(self) -> list[str]:
        return list(self._owner)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._owner[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._owner[key].dtype(key)

    def tensor(self, key: str):
        return self._owner[key].tensor(key)


def open_weights(folder: str | Path) -> WeightSource:
    """Finds and opens the weight files of an HF folder, safetensors first."""
    folder = storage.path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    for index_name, opener in (
        ("model.safetensors.index.json", _open_safetensors),
        ("pytorch_model.bin.index.json", _TorchFile),
    ):
        index_path = folder / index_name
        if index_path.exists():
            weight_map = _weight_map(index_path)
            shards = {name: opener(folder / name) for name in sorted(set(weight_map.values()))}
            _check_index_matches_shards(index_path, weight_map, shards)
            return WeightSource(list(shards.values()))
    singles = sorted(folder.glob("*.safetensors"))
    if singles:
        return WeightSource([_open_safetensors(p) for p in singles])
    torch_files = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
    if torch_files:
        return WeightSource([_TorchFile(p) for p in torch_files])
    raise CheckpointError(f"{folder}: no *.safetensors, *.bin or *.pt weight files found")


def _open_safetensors(path: Path) -> SafetensorsFile:
    try:
        return SafetensorsFile(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: listed in the index but missing") from e
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e


def _weight_map(index_path: Path) -> dict[str, str]:
    """The index's tensor -> shard map, each shard a file name that stays inside the folder."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid index ({e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
    for name in sorted(set(weight_map.values())):
        relative = PurePosixPath(name)
        if not name or relative.is_absolute() or ".." in relative.parts or "://" in name:
            raise CheckpointError(
                f"{index_path}: shard name {name!r} is not a file name inside {index_path.parent}"
            )
    return weight_map


def _check_index_matches_shards(index_path: Path, weight_map: dict[str, str], shards: dict[str, Any]) -> None:
    """Each shard holds exactly the tensors the index lists for it: an index and shards that
    disagree (a partial upload, shards of two revisions) are refused, not read as found."""
    for shard, file in shards.items():
        held, listed = set(file.keys()), {k for k, v in weight_map.items() if v == shard}
        if listed - held:
            raise CheckpointError(
                f"{index_path}: lists tensor {min(listed - held)!r} in {shard}, which does not hold it"
            )
        if held - listed:
            raise CheckpointError(
                f"{index_path}: {shard} holds tensor {min(held - listed)!r}, "
                "which the index does not list there"
            )
