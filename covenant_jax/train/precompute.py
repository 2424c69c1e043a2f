"""DPO's reference log-probs computed in one pass before training (``dpo.precompute_ref_log_probs``),
so the train step holds one model.

Every pair (train and eval) gets a per-token field ``ref_logp``: the log-prob of each scored token
under the reference, 0 elsewhere; the packer carries it like the tokens and the step sums it per
sequence as it sums the policy's. The pass packs the pairs as training does (first-fit, whole
pairs), runs the reference's forward on the mesh in eval-sized batches, and reads each pair's
values back from its rows. With several processes each computes its share of the pairs (every
process holds every pair: the data layer prepares them all on each host) and the shares are
all-gathered, so every process ends with every pair's values whatever order its training draws.

The values are cached on disk (``cache_dir``: the run's data cache) so that a restart (a
preempted job) reads them instead of running the pass again: one file,
``ref_logp-<key>.npz``, written whole (beside, then renamed) by process 0. Its key is a digest
of the pairs themselves (their tokens, masks and order: exact, whatever sources and settings made
them) and of :func:`reference_identity`. A process reads the file only when every process can,
else all run the pass (it is collective).

Axes: B rows, T sequence.
"""

from __future__ import annotations

import functools
import hashlib
import io
import time
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import grain
import jax
import numpy as np

from covenant_jax import storage
from covenant_jax.data import cache, pairs
from covenant_jax.parallel.sharding import activation_sharding
from covenant_jax.train import preference, program

CACHE_VERSION = 1  # Of the cache file's layout; part of its key.


def _at_tokens(per_target_BT: np.ndarray) -> np.ndarray:
    """Target t is token t + 1 of the same sequence: the value moves to that token."""
    return np.pad(per_target_BT[:, :-1], ((0, 0), (1, 0)))


def annotate_fn(
    cfg,
    reference: preference.Reference,
    params: dict,
    frozen: dict,
    mesh,
    rows: int,
    pad_id: int,
    log: Callable[[str], None] = print,
    cache_dir: str | None = None,
) -> Callable[[Sequence[list]], None]:
    """``annotate(example_lists)`` for ``build_pipeline``: adds ``ref_logp`` to every pair, from
    ``reference`` (:func:`program.reference_forward`) on ``params`` and ``frozen`` (on ``mesh``),
    or from the cache in ``cache_dir`` (None: not cached) when it holds them."""
    identity = None if cache_dir is None else reference_identity(cfg)
    eval_sharding = program.batch_sharding(mesh, cfg.data.batch_size, cfg.data.seq_len, micro_batched=False)
    shardings = jax.tree.map(lambda x: x.sharding, (params, frozen))
    fn = jax.jit(
        lambda params, frozen, batch: reference(params, frozen, batch) * batch["loss_mask"],
        in_shardings=(*shardings, eval_sharding),
    )

    def annotate(example_lists: Sequence[list]) -> None:
        started = time.time()
        units = [u for examples in example_lists for u in examples]
        path = None if cache_dir is None else _cache_path(cache_dir, identity, units)
        values = _read_everywhere(path, units, log)
        if values is not None:
            log(f"reference log-probs read from cache {path} ({len(units)} pairs)")
        else:
            values = _all_processes(
                units, _my_values(units, fn, (params, frozen), mesh, eval_sharding, cfg, rows, pad_id)
            )
            if path is not None and jax.process_index() == 0:
                _write(path, values)
            log(
                f"reference log-probs precomputed for {len(units)} pairs in {time.time() - started:.1f}s"
                + ("" if path is None else f"; cached in {path}")
            )
        for unit, v in zip(units, values, strict=True):
            unit[pairs.REF_FIELD] = v

    return annotate


def _my_values(
    units: list[dict], fn, weights: tuple, mesh, sharding, cfg, rows: int, pad_id: int
) -> dict[int, np.ndarray]:
    """{index: per-token values} of this process's share of ``units`` (indices p, p + n, ...)."""
    mine = range(jax.process_index(), len(units), jax.process_count())
    tagged = [
        {**{k: units[i][k] for k in pairs.UNIT_FIELDS}, "unit": np.full(len(units[i]["tokens"]), i, np.int32)}
        for i in mine
    ]
    ds = grain.MapDataset.source(tagged).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    )
    batches = iter(
        pairs.pack_pairs(
            ds,
            seq_len=cfg.data.seq_len,
            rows=rows,
            pad_id=pad_id,
            bins=rows,
            seed=0,
            shuffle_bins=False,
            pairs_per_row=program.pairs_per_row(cfg),
            fields=pairs.UNIT_FIELDS + ("unit",),
        )
    )
    values: dict[int, np.ndarray] = {}
    while True:
        batch = next(batches, None)
        if not _any_process(batch is not None):  # all processes run the same (collective) steps
            break
        if batch is None:
            batch = {
                **program.padding_batch(rows, cfg.data.seq_len, pad_id),
                "unit": np.full((rows, cfg.data.seq_len), -1, np.int32),
            }
        host = program.host_layout(cfg, mesh, {k: batch[k] for k in program.BATCH_FIELDS})
        with activation_sharding(mesh):
            out = fn(*weights, program.device_batch(host, sharding, None))
        local = _at_tokens(program.token_order(cfg, mesh, _local_rows(out, mesh, sharding)))
        for row_units, row_values in zip(batch["unit"], local):
            for u in np.unique(row_units[row_units >= 0]):
                values[int(u)] = row_values[row_units == u].astype(np.float32)
    return values


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def _local_rows(out: jax.Array, mesh, sharding) -> np.ndarray:
    """This process's rows of a row-sharded global array, in the order it fed them."""
    if jax.process_count() == 1:
        return np.asarray(out)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.global_array_to_host_local_array(out, mesh, sharding.spec))


def _all_processes(units: list[dict], mine: dict[int, np.ndarray]) -> list[np.ndarray]:
    """Every unit's values: each process's share all-gathered (every process knows every unit's
    length, so one flat padded array per process is enough)."""
    if jax.process_count() == 1:
        return [mine[i] for i in range(len(units))]
    from jax.experimental import multihost_utils

    n = jax.process_count()
    shares = [range(p, len(units), n) for p in range(n)]
    sizes = [sum(len(units[i]["tokens"]) for i in share) for share in shares]
    flat = np.zeros(max(sizes), np.float32)
    flat[: sizes[jax.process_index()]] = np.concatenate(
        [mine[i] for i in shares[jax.process_index()]] or [np.zeros(0, np.float32)]
    )
    gathered = np.asarray(multihost_utils.process_allgather(flat)).reshape(n, -1)
    out: list = [None] * len(units)
    for p, share in enumerate(shares):
        offset = 0
        for i in share:
            length = len(units[i]["tokens"])
            out[i] = gathered[p, offset : offset + length]
            offset += length
    return out


def reference_identity(cfg) -> dict:
    """What the reference's log-probs depend on besides the pairs: the reference's weights (its
    folder's config and weight files, :func:`cache.folder_identity`), how the model runs them
    (``model.*``: dtypes, attention, RoPE; with LoRA only the base's dtype: the reference is the
    base with the adapters off), the packed rows (length, pair bound), and the code and JAX
    that compute them. Not the loss chunk size, batch or mesh: they change rounding only."""
    model = {k: v for k, v in cfg.model.to_dict().items() if k not in ("path", "lora")}
    return {
        "version": CACHE_VERSION,
        "reference": cache.folder_identity(cfg.dpo.ref_model_path or cfg.model.path),
        "model": model,
        "base_dtype": cfg.model.lora.base_dtype if cfg.model.lora.enabled else None,
        "rows": [cfg.data.seq_len, program.pairs_per_row(cfg)],
        "code": _code_digest(),
        "jax": jax.__version__,
    }


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """The modules that load and run the reference: the model, the converters, this pass."""
    root = Path(__file__).parents[1]
    files = [*sorted((root / "model").glob("*.py")), *sorted((root / "convert").glob("*.py"))]
    files += [root / "train" / f for f in ("model_io.py", "precompute.py", "preference.py", "program.py")]
    h = hashlib.sha256()
    for f in [*files, root / "data" / "pairs.py"]:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _cache_path(cache_dir: str, identity: dict, units: list[dict]) -> storage.Path:
    key = cache.key({**identity, "pairs": _pairs_digest(units)})
    return storage.path(cache_dir) / f"ref_logp-{_process0(key)}.npz"


def _pairs_digest(units: list[dict]) -> str:
    """The pairs' tokens, masks and order (a data set's tokens hash at ~1 GB/s)."""
    h = hashlib.sha256()
    for unit in units:
        for field in pairs.UNIT_FIELDS:
            x = np.ascontiguousarray(unit[field])
            h.update(f"{field}{x.dtype}{x.shape}".encode() + x.tobytes())
    return h.hexdigest()


def _process0(key: str) -> str:
    """Process 0's key on every process: hosts that hold their own copy of the model folder see
    other mtimes, but read the one file process 0 wrote."""
    if jax.process_count() == 1:
        return key
    from jax.experimental import multihost_utils

    chars = multihost_utils.broadcast_one_to_all(np.frombuffer(key.encode(), np.uint8).astype(np.int32))
    return np.asarray(chars).astype(np.uint8).tobytes().decode()


def _read_everywhere(path, units: list[dict], log) -> list[np.ndarray] | None:
    """The cached values when every process could read them, else None on every process."""
    values = None if path is None else _read(path, units, log)
    return None if _any_process(values is None) else values


def _read(path: storage.Path, units: list[dict], log) -> list[np.ndarray] | None:
    """The file's per-pair values, or None when it is absent or does not fit ``units``."""
    if not path.exists():
        return None
    try:
        with np.load(io.BytesIO(path.read_bytes())) as z:
            lengths, flat = z["lengths"], z["values"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        log(f"reference log-probs cache {path} is unreadable ({e}): computing them again")
        return None
    if not np.array_equal(lengths, [len(u["tokens"]) for u in units]):
        log(f"reference log-probs cache {path} does not match the pairs: computing them again")
        return None
    return np.split(flat, np.cumsum(lengths)[:-1])


def _write(path: storage.Path, values: list[np.ndarray]) -> None:
    """One file, whole or absent (cache.write_bytes: written beside, then renamed)."""
    buf = io.BytesIO()
    lengths = np.array([len(v) for v in values], np.int64)
    np.savez(buf, lengths=lengths, values=np.concatenate(values).astype(np.float32))
    storage.makedirs(path.parent)
    cache.write_bytes(path, buf.getvalue())
