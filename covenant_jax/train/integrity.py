"""Content digests of a checkpoint, taken at save and checked after restore.

Orbax and TensorStore do not verify array contents on read (zarr's chunk data carries no
checksum; only the shard index has a crc32c): a checkpoint with flipped bytes restores without
a word. So each save records, per state array, two 32-bit sums of a mixed hash of every
element's bits and index, computed on the devices where the array lives (one fused pass and a
reduction per array; no gather to a host), plus a SHA-256 of each process's data-iterator state.
Integer sums wrap exactly, so the digest does not depend on the mesh the state is sharded over:
a checkpoint verifies when restored onto another mesh. Any change to one element changes both
sums (the mix is a bijection of the element's bits for a given index).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

_GOLDEN, _C1, _C2 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: a bijection of uint32 that spreads every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(_C1)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(_C2)
    return h ^ (h >> 16)


def _as_uint32(x: jax.Array) -> jax.Array:
    """The element bits as uint32 words (an extra trailing axis for 8-byte types)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major index, modulo 2**32 (an iota: nothing materialised)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _leaf_digest(x: jax.Array) -> jax.Array:
    words = _as_uint32(x)
    index = _flat_index(words.shape)
    a = jnp.sum(_fmix32(words + index * jnp.uint32(_GOLDEN)), dtype=jnp.uint32)
    b = jnp.sum(_fmix32(words ^ (index * jnp.uint32(_C1) + jnp.uint32(_C2))), dtype=jnp.uint32)
    return jnp.stack([a, b])


@functools.lru_cache(maxsize=8)
def _digest_fn(out_sharding):
    """[n leaves, 2] sums, replicated so that every process can read them."""
    return jax.jit(lambda leaves: jnp.stack([_leaf_digest(x) for x in leaves]), out_shardings=out_sharding)


def _replicated(leaves: list[jax.Array]):
    named = [x.sharding for x in leaves if isinstance(x.sharding, NamedSharding)]
    return NamedSharding(named[0].mesh, P()) if named else leaves[0].sharding


def state_digests(state: Any) -> dict[str, str]:
    """``{leaf path: 16 hex digits}`` for every array of ``state``, computed where it lives."""
    paths_leaves = jax.tree_util.tree_leaves_with_path(state)
    leaves = [x for _, x in paths_leaves]
    sums = np.asarray(jax.device_get(_digest_fn(_replicated(leaves))(leaves)))
    return {
        jax.tree_util.keystr(path): f"{int(a):08x}{int(b):08x}"
        for (path, _), (a, b) in zip(paths_leaves, sums)
    }


def iterator_digest(iterator: Any) -> str:
    """SHA-256 of the iterator's state as Grain's checkpoint handler stores it."""
    state = iterator.get_state()
    data = state if isinstance(state, bytes) else json.dumps(state, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def iterator_digests(iterator: Any) -> list[str]:
    """Every process's :func:`iterator_digest`, in process order (a collective: all processes call it)."""
    mine = iterator_digest(iterator)
    if jax.process_count() == 1:
        return [mine]
    from jax.experimental import multihost_utils

    words = np.frombuffer(bytes.fromhex(mine), np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(words)).reshape(jax.process_count(), -1)
    return [row.astype(np.uint32).tobytes().hex() for row in gathered]


def record(state: Any, iterator: Any) -> dict:
    """What a save stores next to the state: the digests :func:`mismatches` checks."""
    return {"version": 1, "state": state_digests(state), "data": iterator_digests(iterator)}


def mismatches(saved: dict, state: Any, iterator: Any) -> list[str]:
    """The parts of a restored (state, iterator) whose digests differ from ``saved``."""
    now = state_digests(state)
    bad = [
        path
        for path in sorted(saved["state"].keys() | now.keys())
        if saved["state"].get(path) != now.get(path)
    ]
    if saved["data"][jax.process_index()] != iterator_digest(iterator):
        bad.append(f"data iterator of process {jax.process_index()}")
    return bad
