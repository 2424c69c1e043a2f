"""Slice-by-slice reads and writes of the Orbax params checkpoint, for conversion.

Conversion must not hold the model: on a CPU host a ``jax.Array`` *is* host memory, so saving
whole arrays through Orbax costs the model's size (and its write transaction buffers another
copy). Here a parameter is written one *unit* at a time -- a contiguous range of HF rows of
one layer, at most ``UNIT_BYTES`` -- and read back the same way, so peak memory is a few units.

Writing goes through Orbax's own save (``PyTreeCheckpointHandler``: tree metadata, per-process
OCDBT stores and their merge, the atomic rename) with one extension point: a ``TypeHandler``
for :class:`StreamedParam` leaves. It builds each array's TensorStore spec with Orbax's spec
builder and records the leaf as a ``jax.Array``, so the result is an ordinary Orbax checkpoint
that ``PyTreeCheckpointer.restore`` (training, verify) reads onto any sharding. Each array's
chunk is one unit, so unit writes and reads touch whole chunks; each unit write is an OCDBT
commit, whose manifest stays in memory until the last one (:func:`_manifest_in_memory`). With
several processes, unit ``i`` is read and written by process ``i % process_count``: each reads
only its own share.

Chunks keep the *source's* memory layout (zarr3 with a transpose codec), so a unit is written
from the HF rows one ``pread`` brought in, with a plain copy, and read back in HF layout the same
way; numpy transposes of every weight cost more than the disk. Reading opens the arrays with
TensorStore through Orbax's read spec; a slice read touches only the chunks it covers.

Orbax has no public API for either (its TensorStore spec builders live in ``_src``), hence the
pinned orbax-checkpoint minor version; the round-trip and restore tests guard the format.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from covenant_jax import storage

# Largest slice read, converted and written at once (a chunk of the stored array). Small on
# purpose: TensorStore commits the (two) writes in flight together, one OCDBT data file a commit;
# ext4 writes a file over 16 MB back as several bios whose unwritten-extent conversions grow its
# extent tree past the inode and shrink it again, freeing a block. Under ``-o discard`` each freed
# block is a discard, which stalled a GCE persistent disk's queue for up to 2 s. 1B fp32, 4 pairs:
# 64 MB units ~80 discards, 24.3-25.1 s; 8 MB units 2 discards, 22.0-23.0 s (4 MB: slower).
UNIT_BYTES = 8 << 20

Index = tuple[slice, ...]


def row_ranges(shape: Sequence[int], itemsize: int, axis: int, shards: int = 1) -> list[Index]:
    """Cuts ``shape`` along ``axis`` into equal ranges of at most ``UNIT_BYTES`` (at least one
    index each; the last may be shorter) that never cross a boundary between ``shards`` equal
    shards, so every range is one whole chunk of the stored array."""
    if not shape:
        return [()]
    rows = shape[axis]
    row_bytes = math.prod(shape) // max(rows, 1) * itemsize
    step = max(1, min(rows, UNIT_BYTES // max(row_bytes, 1)))
    if shards > 1 and rows % shards == 0:
        block = rows // shards
        step = next(d for d in range(min(step, block), 0, -1) if block % d == 0)
    ranges = []
    for start in range(0, rows, step):
        index = [slice(None)] * len(shape)
        index[axis] = slice(start, min(start + step, rows))
        ranges.append(tuple(index))
    return ranges


@dataclasses.dataclass(frozen=True)
class StreamedParam:
    """A parameter to be saved unit by unit.

    ``read(index)`` gives that slice as numpy in ``read_dtype`` (any strides, in a buffer
    nobody writes to again: TensorStore keeps it rather than copying), stored as ``dtype``.
    ``storage_order``: the axis order the chunks keep in memory (a zarr3 transpose codec); chosen
    to match the source's layout, the write is a plain copy instead of a transpose, and readers
    get the source layout back as cheaply.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    units: tuple[Index, ...]
    read: Callable[[Index], np.ndarray]
    read_dtype: np.dtype
    storage_order: tuple[int, ...] | None = None

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        """The stored chunk: the first (largest) unit."""
        return tuple(len(range(*s.indices(d))) for s, d in zip(self.units[0], self.shape))


def _zarr(spec: dict) -> dict:
    return spec["base"] if spec.get("driver") == "cast" else spec


def _add_transpose_codec(spec: dict, order: Sequence[int]) -> None:
    inner = _zarr(spec)["metadata"]["codecs"][0]["configuration"]["codecs"]  # zarr3 sharding_indexed
    inner.insert(0, {"name": "transpose", "configuration": {"order": list(order)}})


def _manifest_in_memory(spec: dict, on_disk: dict[str, dict]) -> None:
    """Points an OCDBT array spec's manifest at a TensorStore ``memory`` kvstore, recording the
    on-disk manifest kvstore it replaces in ``on_disk`` (by path) for :func:`_persist_manifests`.

    Every unit write is an OCDBT commit, and each commit replaces ``manifest.ocdbt`` (a new file
    renamed over the old one). On ext4 mounted with ``discard`` (GCE's advice for persistent
    disks) each replaced file frees a block, and a discard can hold
    the disk's whole queue for a second or two. In memory, the manifest reaches disk once, at the
    end; data files and B-tree nodes are written as before."""
    kvstore = _zarr(spec)["kvstore"]
    if kvstore.get("driver") != "ocdbt":
        return
    disk = kvstore.get("manifest", kvstore["base"])
    on_disk[disk["path"]] = disk
    kvstore["manifest"] = {"driver": "memory", "path": disk["path"]}


async def _persist_manifests(on_disk: dict[str, dict], context: ts.Context | None) -> None:
    """Writes each database's final manifest from memory (see :func:`_manifest_in_memory`) to disk."""
    for path, disk_spec in on_disk.items():
        memory = await ts.KvStore.open({"driver": "memory", "path": path}, context=context)
        disk = await ts.KvStore.open(disk_spec, context=context)
        for key in await memory.list():
            await disk.write(key, (await memory.read(key)).value)


class StreamedParamHandler(ocp.type_handlers.ArrayHandler):
    """Saves :class:`StreamedParam` leaves as the ``jax.Array`` entries Orbax restores.

    Only ``serialize`` differs from Orbax's ArrayHandler: instead of copying whole device
    arrays to host and writing them inside one transaction, it reads and writes one unit at a
    time, reading the next units while the last ones are written. Sharding files are not
    written (restores always pass target shardings).
    """

    # Units being read (one thread, in order) and written (TensorStore's threads) at once: the
    # disk reads the next units while it writes the last ones.
    READ_AHEAD = 2
    IN_FLIGHT = 2

    def __init__(self):
        super().__init__(enable_write_sharding_file=False)

    async def _open(
        self, value: StreamedParam, info, process: int, context: ts.Context, manifests: dict[str, dict]
    ):
        await info.await_path_creation()
        spec = ts_utils.build_array_write_spec(
            info=info,
            arg=ocp.SaveArgs(dtype=value.dtype),
            global_shape=value.shape,
            local_shape=value.chunk_shape,
            dtype=value.read_dtype,
            use_ocdbt=info.is_ocdbt_checkpoint,
            process_index=ocdbt_utils.get_process_index_for_subdir(info.is_ocdbt_checkpoint),
        ).json
        if value.storage_order is not None and list(value.storage_order) != sorted(value.storage_order):
            if not info.use_zarr3:
                raise ValueError("a storage order needs zarr3 (PyTreeCheckpointHandler(use_zarr3=True))")
            _add_transpose_codec(spec, value.storage_order)
        _manifest_in_memory(spec, manifests)
        if process == 0:
            await ts.open(ts.Spec(spec), create=True, open=True, context=context)
        return await ts.open(ts.Spec(spec), open=True, assume_metadata=True, context=context)

    async def serialize(self, values: Sequence[StreamedParam], infos, args=None):
        process, processes = jax.process_index(), jax.process_count()
        # Files are not fsynced one by one (see save_streamed), so the kernel writes them back in
        # large, deep batches, as it does for cp, instead of one small file at a time.
        context = (
            ts.Context(ts.Context.Spec({"file_io_sync": False}), parent=infos[0].ts_context)
            if infos
            else None
        )
        manifests: dict[str, dict] = {}
        stores = [
            await self._open(value, info, process, context, manifests) for value, info in zip(values, infos)
        ]
        units = [(store, value, index) for store, value in zip(stores, values) for index in value.units]
        mine = units[process::processes]
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="unit-read") as reader:
            reads = collections.deque(
                loop.run_in_executor(reader, value.read, index) for _, value, index in mine[: self.READ_AHEAD]
            )
            writes: collections.deque = collections.deque()
            for k, (store, _, index) in enumerate(mine):
                data = await reads.popleft()  # never written to again: TensorStore keeps it, no copy
                if k + self.READ_AHEAD < len(mine):
                    _, value, ahead = mine[k + self.READ_AHEAD]
                    reads.append(loop.run_in_executor(reader, value.read, ahead))
                writes.append(store[index].write(data, can_reference_source_data_indefinitely=True))
                if len(writes) >= self.IN_FLIGHT:
                    await writes.popleft()
            for write in writes:
                await write
        await _persist_manifests(manifests, context)
        return []


def save_streamed(directory: Path, tree: dict) -> None:
    """Writes a nested dict of :class:`StreamedParam` as an Orbax PyTree checkpoint (zarr3,
    uncompressed: conversion is bound by the disk, and weights barely compress). The data files
    are written without an fsync each: write ``directory`` inside ``io.atomic_output_dir``, which
    fsyncs the whole folder once before publishing it."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler()), (StreamedParam, StreamedParamHandler())
    )
    handler = ocp.PyTreeCheckpointHandler(
        use_zarr3=True, use_compression=False, type_handler_registry=registry
    )
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(directory, args=ocp.args.PyTreeSave(tree))


class ParamReader:
    """Sliced reads of one stored parameter: ``reader[index]`` -> numpy in our axis order, laid
    out in memory in ``memory_order`` (a view of a C-contiguous array transposed that way).

    The stored files are memory-mapped (TensorStore's ``memmap`` file mode): a chunk is copied
    once, from the page cache into the result, instead of through a read buffer first.
    """

    def __init__(self, params_dir: Path, name: str, memory_order: Sequence[int] | None = None):
        layout = json.loads((params_dir / "_METADATA").read_text())
        spec = ts_utils.ArrayReadSpec(
            str(storage.path(params_dir)), name, use_zarr3=layout["use_zarr3"], use_ocdbt=layout["use_ocdbt"]
        )
        context = ts_utils.get_ts_context(use_ocdbt=layout["use_ocdbt"]).spec.to_json()
        context = ts.Context(ts.Context.Spec({**context, "file_io_mode": {"mode": "memmap"}}))
        self._store = ts.open(spec.json, open=True, read=True, context=context).result()
        self.shape = tuple(self._store.shape)
        self.dtype = np.dtype(self._store.dtype.numpy_dtype)
        self.chunk_shape = tuple(self._store.chunk_layout.write_chunk.shape)
        self._order = list(memory_order) if memory_order is not None else list(range(len(self.shape)))

    def read(
        self, index: Index, buffer: Callable[[int], np.ndarray] | None = None
    ) -> Callable[[], np.ndarray]:
        """Starts reading ``index``; the returned call waits for it. ``buffer(nbytes)``: a flat
        uint8 array of at least ``nbytes`` to read into, the result being a view of it (reused
        buffers skip the page faults and zeroing of fresh memory, a large part of the cost on a
        VM); without it, a fresh array."""
        view = self._store[index].transpose(self._order)
        undo = np.argsort(self._order)
        if buffer is None:
            future = view.read()
            return lambda: future.result().transpose(undo)
        nbytes = math.prod(view.shape) * self.dtype.itemsize
        target = buffer(nbytes)[:nbytes].view(self.dtype).reshape(view.shape)
        future = ts.array(target, copy=False, write=True).write(view)

        def wait() -> np.ndarray:
            future.result()
            return target.transpose(undo)

        return wait

    def __getitem__(self, index: Index) -> np.ndarray:
        return self.read(index)()
