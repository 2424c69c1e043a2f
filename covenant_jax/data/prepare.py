"""Rows -> tokenised training samples: in parallel processes, and cached on disk once per source.

Why: rendering chat templates and tokenising (milliseconds a ShareGPT row on one core) is the
whole cost of the input pipeline. So rows go, TASK_ROWS at a time, to a pool of spawned
processes (`data.workers`; results come back in order, so the samples do not depend on the
number of processes), and with a cache folder the result is written once (cache.py) and reused
by every restart, stage and eval with the same source and settings. In a job of several hosts
the rows are cut into shards of `data.shard_rows`; shard s of source j is prepared by process
(s + j) % process_count (the shards are the same whatever the process count, so the entry is
too), then process 0 joins the shards' indexes.

A sample is one training sequence: a row's tokens and trained flags after the overlength policy
(one per row, or a row's pieces with "split"). Each carries the ordinal of its row among the
source's valid rows (the eval split is drawn over those, as before caching) and whether that
row was longer than seq_len (the trainer eval mode drops such rows).

Without a cache folder (tests, benchmarks, in-memory `dataset` sources) the samples are
prepared the same way and kept in memory, concatenated (5 bytes a token).

A preference pair (format "dpo") is one sample, its chosen then its rejected sequence, with the
chosen sequence's length (`firsts`) to tell them apart (`pairs.unit` gives the packing unit).
Pairs are always prepared in memory: the cache's records hold tokens and flags only.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
from concurrent.futures.process import BrokenProcessPool
import dataclasses
import functools
import hashlib
import multiprocessing
import os
import pickle
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from covenant_jax.data import cache, formats, pairs, sources, templates
from covenant_jax.errors import CacheError, UserError

TASK_ROWS = 64  # Rows a process renders and tokenises at once.
CHECK_ROWS = 1024  # Rows a source's columns are checked on before any work.
SHOW_SKIPPED = 3  # Skipped rows located in the report, per reason.
MAX_AUTO_WORKERS = 32  # `data.workers = 0`: one per idle core, at most this many.
# CPU seconds this process prepares before starting helper processes (Pool._helpers).
SPAWN_AFTER_S = 4.0
# `data` keys that do not change a source's samples, so not in its cache key (a new key is in
# it by default: at worst an entry is prepared again).
NOT_IN_KEY = frozenset({
    "sources", "batch_size", "seed", "eval_fraction", "eval_count", "epochs", "packing_bins",
    "max_samples_per_row", "pad_id", "cache_dir", "workers", "eval_mode", "eval_batch_size",
    "template",  # The key holds the template each source resolves to (cache_spec).
})  # fmt: skip
_COUNTS = ("rows", "valid", "truncated", "split", "pieces", "pieces_dropped", "tokens",
           "trained_tokens")  # fmt: skip


@dataclasses.dataclass
class Tally:
    """What happened to a set of rows; the tallies of disjoint sets add up (tasks, shards)."""

    rows: int = 0
    valid: int = 0  # Well-formed rows: the eval split is drawn among them.
    truncated: int = 0
    split: int = 0  # Rows cut into pieces (overlength="split").
    pieces: int = 0  # Pieces kept from those rows.
    pieces_dropped: int = 0  # Pieces without a trained target.
    tokens: int = 0
    trained_tokens: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    located: dict = dataclasses.field(default_factory=dict)  # reason -> first "file:line: ..."

    def skip(self, error: formats.InvalidRow, where: str) -> None:
        """Counts a skipped row; the first few per reason keep where they are and why."""
        self.skipped[error.reason] += 1
        first = self.located.setdefault(error.reason, [])
        if len(first) < SHOW_SKIPPED:
            detail = f" ({error.detail})" if error.detail else ""
            first.append(f"{where}: {error.reason}{detail}")

    def add(self, other: Tally) -> None:
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped.update(other.skipped)
        for reason, lines in other.located.items():
            first = self.located.setdefault(reason, [])
            first.extend(lines[: SHOW_SKIPPED - len(first)])

    def to_json(self) -> dict:
        return {**{n: getattr(self, n) for n in _COUNTS}, "skipped": dict(self.skipped),
                "located": self.located}  # fmt: skip

    @classmethod
    def from_json(cls, d: Mapping) -> Tally:
        return cls(**{n: d[n] for n in _COUNTS}, skipped=collections.Counter(d["skipped"]),
                   located={k: list(v) for k, v in d["located"].items()})  # fmt: skip


@dataclasses.dataclass
class Samples:
    """Consecutive rows' samples, concatenated: sample i is tokens[offsets[i]:offsets[i + 1]]."""

    tokens: np.ndarray  # int32 [N]
    weights: np.ndarray  # bool [N]: trained
    offsets: np.ndarray  # int64 [S + 1]
    valid_ordinal: np.ndarray  # int64 [S]: its row among these rows' valid rows
    overlong: np.ndarray  # bool [S]: its row had more than seq_len tokens
    tally: Tally
    firsts: np.ndarray | None = None  # int64 [S]: a preference pair's chosen length; None: no pairs

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s, e = self.offsets[i], self.offsets[i + 1]
        if self.firsts is not None:
            return pairs.unit(self.tokens[s:e], self.weights[s:e], int(self.firsts[i]))
        return {"tokens": self.tokens[s:e], "weights": self.weights[s:e]}

    def records(self) -> Iterator[bytes]:
        for i in range(len(self)):
            yield cache.encode_record(**self[i])

    @classmethod
    def of(
        cls,
        pieces: list[tuple[np.ndarray, np.ndarray, int, bool]],
        tally: Tally,
        firsts: Sequence[int] | None = None,
    ) -> Samples:
        """From (tokens, trained, valid ordinal, overlong) per sample (and, for pairs, each
        one's chosen length)."""
        lengths = np.asarray([len(p[0]) for p in pieces], np.int64)
        return cls(
            np.concatenate([p[0] for p in pieces] or [np.zeros(0, np.int32)]).astype(np.int32),
            np.concatenate([p[1] for p in pieces] or [np.zeros(0, bool)]).astype(bool),
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            np.asarray([p[2] for p in pieces], np.int64),
            np.asarray([p[3] for p in pieces], bool),
            tally,
            None if firsts is None else np.asarray(firsts, np.int64),
        )

    @classmethod
    def join(cls, parts: Sequence[Samples]) -> Samples:
        """The samples of consecutive row ranges: offsets and valid ordinals shifted."""
        tally = Tally()
        ordinals, offsets, base = [], [np.zeros(1, np.int64)], 0
        for p in parts:
            ordinals.append(p.valid_ordinal + tally.valid)
            offsets.append(p.offsets[1:] + base)
            base += p.offsets[-1]
            tally.add(p.tally)
        return cls(
            np.concatenate([p.tokens for p in parts] or [np.zeros(0, np.int32)]),
            np.concatenate([p.weights for p in parts] or [np.zeros(0, bool)]),
            np.concatenate(offsets),
            np.concatenate(ordinals or [np.zeros(0, np.int64)]),
            np.concatenate([p.overlong for p in parts] or [np.zeros(0, bool)]),
            tally,
            np.concatenate([p.firsts for p in parts]) if parts and parts[0].firsts is not None else None,
        )


@dataclasses.dataclass
class PreparedSource:
    """A source's samples (`samples[i]` -> {"tokens", "weights"}) and their per-sample index."""

    samples: Sequence
    valid_ordinal: np.ndarray  # int64 [S]: the sample's row among the source's valid rows
    overlong: np.ndarray  # bool [S]
    tally: Tally
    location: str | None  # The cache entry it was read from; None: prepared in memory.


@dataclasses.dataclass(frozen=True)
class Reading:
    """How one source's rows become examples: its row format and the name of its chat template
    (a key of `Worker.templates`; None: rows rendered without one). Sent with every task."""

    fmt: formats.RowFormat
    template: str | None


def source_template(src: Mapping, cfg: Mapping) -> str | None:
    """The chat template a source's rows are rendered with: its own `template`, else
    data.template; None for formats that never use one, or template "none"."""
    name = src.get("template") or cfg["template"]
    if src_format(src) in formats.PLAIN_FORMATS or name == templates.NO_TEMPLATE:
        return None
    return name


def src_format(src: Mapping) -> str:
    return src.get("format", "messages")


def reading(src: Mapping, cfg: Mapping) -> Reading:
    """How a source's rows are read: format, field and role names, prompt format, role order."""
    template = source_template(src, cfg)
    fmt = formats.RowFormat.create(
        src_format(src), src.get("fields"), src.get("role_map"),
        prompt_format=src.get("prompt_format"), chat=template is not None,
        role_order=cfg["role_order"],
    )  # fmt: skip
    return Reading(fmt, template)


@dataclasses.dataclass(frozen=True)
class Worker:
    """Turns rows into samples; picklable, so each process of the pool gets one copy."""

    tokenizer: Any
    templates: Mapping[str, templates.ChatTemplate]  # By name: every source's template.
    mask: templates.MaskRule
    seq_len: int
    overlength: str

    @classmethod
    def create(cls, tokenizer, srcs: Sequence[Mapping], cfg: Mapping) -> Worker:
        """The worker for these sources under the `data` settings `cfg` (one ChatTemplate per
        distinct template, so layouts are shared)."""
        names = dict.fromkeys(source_template(s, cfg) for s in srcs)
        chat = {n: templates.ChatTemplate(tokenizer, n) for n in names if n is not None}
        mask = templates.MaskRule.create(cfg["loss_on"], cfg["roles_to_train"], cfg["train_on_eos"])
        return cls(tokenizer, chat, mask, cfg["seq_len"], cfg["overlength"])

    def samples(self, how: Reading, rows: Sequence[tuple[str, Any]]) -> Samples:
        """(location, raw row) pairs -> their samples; invalid rows counted by reason."""
        tally = Tally(rows=len(rows))
        examples = []
        for where, row in rows:
            try:
                if isinstance(row, sources.BadRow):
                    raise formats.InvalidRow(row.reason, row.detail)
                examples.append((where, how.fmt.to_example(row)))
            except formats.InvalidRow as e:
                tally.skip(e, where)
        tally.valid = len(examples)
        if how.fmt.format in formats.PAIR_FORMATS:
            return self._pair_samples(how, examples, tally)
        encoded = templates.encode_examples(
            self.tokenizer, self.templates.get(how.template), [e for _, e in examples],
            self.mask.loss_on, roles_to_train=self.mask.roles_to_train,
            train_on_eos=self.mask.train_on_eos,
        )  # fmt: skip
        pieces = [
            (ids, trained, ordinal, overlong)
            for ordinal, ((where, _), enc) in enumerate(zip(examples, encoded, strict=True))
            for ids, trained, overlong in self._fit(enc, where, tally)
        ]
        return Samples.of(pieces, tally)

    def _pair_samples(self, how: Reading, examples: list[tuple[str, formats.Pair]], tally: Tally) -> Samples:
        """Preference pairs -> one sample each (`pairs.pair_unit`); skipped ones counted."""
        encoded = pairs.encode_pairs(
            self.tokenizer, self.templates.get(how.template), [e for _, e in examples], self.mask.train_on_eos
        )
        pieces, firsts = [], []
        for ordinal, ((where, _), enc) in enumerate(zip(examples, encoded, strict=True)):
            try:
                if isinstance(enc, formats.InvalidRow):
                    raise enc
                unit, truncated = pairs.pair_unit(enc, self.seq_len, self.overlength)
            except formats.InvalidRow as e:
                tally.skip(e, where)
                continue
            tally.truncated += int(truncated)
            tally.tokens += len(unit["tokens"])
            tally.trained_tokens += pairs.scored_tokens(unit)
            pieces.append((unit["tokens"], unit["weights"], ordinal, truncated))
            firsts.append(int((unit["sub"] == 1).sum()))
        return Samples.of(pieces, tally, firsts)

    def _fit(self, encoded, where: str, tally: Tally) -> list[tuple]:
        """One tokenised row (or its InvalidRow) -> its (tokens, trained, overlong) samples under
        the overlength policy; none when skipped (the reason counted)."""
        try:
            if isinstance(encoded, formats.InvalidRow):
                raise encoded
            ids, trained = encoded
            pieces = fit_length(ids, trained, self.seq_len, self.overlength)
            kept = [(i, t) for i, t in pieces if t[1:].any()]  # Token 0 is never a target.
            if len(pieces) > 1:
                tally.split += 1
                tally.pieces += len(kept)
                tally.pieces_dropped += len(pieces) - len(kept)
            if not kept:
                raise formats.InvalidRow("no_trained_tokens")
        except formats.InvalidRow as e:
            tally.skip(e, where)
            return []
        overlong = len(ids) > self.seq_len
        tally.truncated += int(self.overlength == "truncate" and overlong)
        for i, t in kept:
            tally.tokens += len(i)
            tally.trained_tokens += int(t[1:].sum())
        return [(i, t, overlong) for i, t in kept]


def fit_length(ids, trained, seq_len: int, policy: str) -> list[tuple]:
    """[(ids, trained)] pieces of one sample; split pieces are views of the whole, a truncated
    sample a copy (so the long original can be freed)."""
    if len(ids) <= seq_len:
        return [(ids, trained)]
    if policy == "drop":
        raise formats.InvalidRow("overlength_dropped", f"{len(ids)} > {seq_len}")
    if policy == "split":
        starts = range(0, len(ids), seq_len)
        return [(ids[s : s + seq_len], trained[s : s + seq_len]) for s in starts]
    return [(ids[:seq_len].copy(), trained[:seq_len].copy())]


# --- the pool of processes ---------------------------------------------------------------------

_PROCESS_WORKER: Worker | None = None  # The Worker of a pool process.


def _start_process(worker: bytes) -> None:
    # One process a core: the tokenizer's own threads would only compete with the other processes.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _PROCESS_WORKER
    _PROCESS_WORKER = pickle.loads(worker)


def _run_task(task: tuple[Reading, list]) -> Samples:
    return _PROCESS_WORKER.samples(*task)


@contextlib.contextmanager
def _one_thread(helpers_running: bool):
    """While helpers run, this process's tokenizer calls use one thread too (the variable is
    read at each call), as the helpers' do; the setting is restored after."""
    if not helpers_running:
        yield
        return
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def auto_workers(workers: int) -> int:
    """`data.workers`: 0 = one process per usable core that the 1-minute load average leaves idle
    (this process's own core counts as idle; at least 1, at most MAX_AUTO_WORKERS). On a busy
    machine another process gains no speed and costs its start-up and contention (measured:
    README, Data pipeline)."""
    if workers > 0:
        return workers
    cores = _usable_cores()
    try:
        busy = max(0.0, os.getloadavg()[0] - 1.0)  # The load counts this process too.
    except OSError:  # No load average on this platform.
        busy = 0.0
    return max(1, min(cores - int(busy + 0.5), MAX_AUTO_WORKERS))


def _usable_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


class Pool:
    """Runs `Worker.samples` over tasks with `processes` processes: this one, and `processes - 1`
    spawned helpers once this one has prepared for SPAWN_AFTER_S (CPU) seconds. Results come
    in task order with a bounded number in flight; this process prepares every `processes`-th
    task itself while the helpers work on the others."""

    def __init__(self, worker: Worker, processes: int):
        self.worker, self.processes = worker, processes
        self._executor = None
        self._spent = 0.0  # CPU seconds this process has prepared for.

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None

    def map(self, tasks: Iterable[tuple[Any, Reading, list]]) -> Iterator[tuple]:
        """(meta, how, rows) tasks -> (meta, Samples), in order."""
        pending = collections.deque()  # (meta, a helper's future | (how, rows) to do here)
        for i, (meta, how, rows) in enumerate(tasks):
            executor = self._helpers()
            if executor is not None and i % self.processes:
                pending.append((meta, executor.submit(_run_task, (how, rows))))
            else:
                pending.append((meta, (how, rows)))
            while len(pending) > (2 * self.processes if executor is not None else 0):
                yield self._next(pending)
        while pending:
            yield self._next(pending)

    def _next(self, pending: collections.deque) -> tuple:
        meta, job = pending.popleft()
        if isinstance(job, concurrent.futures.Future):
            return meta, self._result(job)
        started = time.process_time()
        with _one_thread(self._executor is not None):
            samples = self.worker.samples(*job)
        self._spent += time.process_time() - started
        return meta, samples

    def _helpers(self):
        """The helpers' executor, started once preparing here has cost SPAWN_AFTER_S: a helper
        costs about 2 CPU seconds to start (interpreter, transformers, the tokenizer), which a
        small source would not win back."""
        if self._executor is None and self.processes > 1 and self._spent >= SPAWN_AFTER_S:
            self._start()
        return self._executor

    def _start(self) -> None:
        self._executor = concurrent.futures.ProcessPoolExecutor(
            self.processes - 1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_process, initargs=(pickle.dumps(self.worker),),
        )  # fmt: skip

    def _result(self, future):
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise RuntimeError(
                "a data preparation process died: out of memory (lower data.workers), or the "
                "program's main script starts work without `if __name__ == '__main__':` (the "
                "processes are spawned and import it)"
            ) from e


# --- sources: plan, check, prepare, load -------------------------------------------------------


def prepare_sources(
    srcs: Sequence[Mapping], cfg: Mapping, worker: Worker, *,
    cache_dir, process_index: int, process_count: int,
    barrier: Callable[[str], None] = lambda name: None, local_root: str | None = None,
) -> list[PreparedSource]:  # fmt: skip
    """Every source's samples. With `cache_dir`, file sources are read from their cache entry,
    which is first written where missing: each process writes its shards, `barrier`, process 0
    joins them, `barrier`. Other sources (and all without a cache) are prepared in memory, all
    rows in every process. Columns are checked before any work."""
    plans = [plan_source(s, i, cfg, worker, cache_dir) for i, s in enumerate(srcs)]
    todo = [p for p in plans if p.entry is not None and not p.entry.complete()]
    for p in plans:
        if p.entry is None or p in todo:
            check_columns(p)
    in_memory = {}
    with Pool(worker, auto_workers(cfg["workers"])) as pool:
        for p in todo:
            prepare_shards(p, pool, cfg["shard_rows"], process_index, process_count)
        for p in plans:
            if p.entry is None:
                in_memory[p.index] = prepare_in_memory(p, pool)
    if any(p.entry is not None for p in plans):  # Every process, so the barriers match.
        barrier("shards written")
        if process_index == 0:
            for p in todo:
                finalize(p, cfg["shard_rows"])
        barrier("entries complete")
    return [in_memory[p.index] if p.entry is None else load(p, local_root) for p in plans]


@dataclasses.dataclass(eq=False)  # Compared by identity.
class _Plan:
    """One source: how to read it and, when it is cached, its entry."""

    index: int
    name: str
    data: Any  # A path or an in-memory dataset.
    max_rows: int
    how: Reading
    entry: cache.Entry | None
    spec: dict | None  # What the entry's key is made of.
    rows: int = 0  # Counted while streaming.


def plan_source(src: Mapping, index: int, cfg: Mapping, worker: Worker, cache_dir) -> _Plan:
    data = src.get("path", src.get("dataset"))
    name = source_name(src, index)
    how = reading(src, cfg)
    entry = spec = None
    if cache_dir and "path" in src and how.fmt.format not in formats.PAIR_FORMATS:
        spec = cache_spec(src, cfg, worker, how.template)
        entry = cache.Entry(cache_dir, cache.entry_name(src["path"], cache.key(spec)))
    return _Plan(index, name, data, int(src.get("max_rows") or 0), how, entry, spec)


def source_name(src: Mapping, index: int) -> str:
    """How reports name a source: its `name`, else its path, else its place in the list."""
    return src.get("name") or (str(src["path"]) if "path" in src else f"sources[{index}]")


def cache_spec(src: Mapping, cfg: Mapping, worker: Worker, template: str | None) -> dict:
    """Everything a source's samples depend on: the file (identity, not content), how rows are
    read, the tokenizer, the template the source resolves to (`template`, a key of
    worker.templates), the settings (masks and role order included), and the code and libraries
    that prepare."""
    template = worker.templates.get(template)
    return {
        "layout": cache.VERSION,
        "code": _code_digest(),
        "libraries": _library_versions(),
        "source": {
            **{k: v for k, v in src.items() if k not in ("weight", "name", "path", "template")},  # fmt: skip
            "file": cache.file_identity(src["path"]),
        },  # fmt: skip
        "tokenizer": tokenizer_digest(worker.tokenizer),
        "template": None if template is None else [template.name, template.source],
        "settings": {k: v for k, v in cfg.items() if k not in NOT_IN_KEY},
    }


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """The data modules that turn rows into samples (all but the Grain side, pipeline.py)."""
    folder = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.py")):
        if f.name != "pipeline.py":
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _library_versions() -> dict:
    import importlib.metadata  # pylint: disable=g-import-not-at-top

    out = {}
    for name in ("tokenizers", "transformers", "jinja2"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h = hashlib.sha256(backend.to_str().encode() if backend is not None else b"")
    for part in (
        type(tokenizer).__name__,
        tokenizer.special_tokens_map,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        sorted(getattr(tokenizer, "added_tokens_encoder", {})),
    ):
        h.update(repr(part).encode())  # fmt: skip
    return h.hexdigest()[:16]


def check_columns(plan: _Plan) -> None:
    """The configured fields exist in the data, checked on the first CHECK_ROWS rows (all rows
    only when those lack one), before any work."""
    head = [row for _, row in sources.iter_rows(plan.data, min(plan.max_rows or CHECK_ROWS,
                                                               CHECK_ROWS))]  # fmt: skip
    try:
        plan.how.fmt.check_columns(head, plan.name)
    except UserError:
        if len(head) < CHECK_ROWS:
            raise
        plan.how.fmt.check_columns([r for _, r in sources.iter_rows(plan.data, plan.max_rows)], plan.name)


def _tasks(rows: Iterator[tuple[str, Any]], plan: _Plan, shard_rows: int,
           mine: Callable[[int], bool]) -> Iterator[tuple[int, Reading, list]]:  # fmt: skip
    """(shard, how, rows) tasks of at most TASK_ROWS rows of this process's shards; a task never
    spans two shards. Counts every row in plan.rows."""
    task, task_shard = [], None
    for i, (where, row) in enumerate(rows):
        plan.rows = i + 1
        shard = i // shard_rows
        if task and (shard != task_shard or len(task) == TASK_ROWS):
            yield task_shard, plan.how, task
            task = []
        if mine(shard):
            task.append((where, row))
            task_shard = shard
    if task:
        yield task_shard, plan.how, task


def prepare_in_memory(plan: _Plan, pool: Pool) -> PreparedSource:
    rows = sources.iter_rows(plan.data, plan.max_rows)
    parts = [s for _, s in pool.map(_tasks(rows, plan, TASK_ROWS, lambda _: True))]
    samples = Samples.join(parts)
    return PreparedSource(samples, samples.valid_ordinal, samples.overlong, samples.tally, None)


def prepare_shards(plan: _Plan, pool: Pool, shard_rows: int, process_index: int,
                   process_count: int) -> None:  # fmt: skip
    """Writes this process's shards of a cached source that are not written yet."""

    @functools.lru_cache(maxsize=None)
    def mine(shard: int) -> bool:
        return (shard + plan.index) % process_count == process_index and not plan.entry.shard_done(shard)

    rows = sources.iter_rows(plan.data, plan.max_rows, select=lambda i: mine(i // shard_rows))
    current, parts = None, []
    for shard, samples in pool.map(_tasks(rows, plan, shard_rows, mine)):
        if parts and shard != current:
            _write_shard(plan.entry, current, Samples.join(parts))
            parts = []
        current = shard
        parts.append(samples)
    if parts:
        _write_shard(plan.entry, current, Samples.join(parts))


def _write_shard(entry: cache.Entry, shard: int, samples: Samples) -> None:
    meta = {"samples": len(samples), "tally": samples.tally.to_json(),
            "valid_ordinal": samples.valid_ordinal.tolist(),
            "overlong": np.flatnonzero(samples.overlong).tolist()}  # fmt: skip
    entry.write_shard(shard, samples.records(), meta)


def finalize(plan: _Plan, shard_rows: int) -> None:
    """Joins the shards' indexes and tallies and writes the manifest (process 0, once every
    process has written its shards)."""
    shards = -(-plan.rows // shard_rows)
    metas = [plan.entry.read_shard_meta(s) for s in range(shards)]
    tally, ordinals, overlong = Tally(), [], []
    for meta in metas:
        ordinals.append(np.asarray(meta["valid_ordinal"], np.int64) + tally.valid)
        flags = np.zeros(meta["samples"], bool)
        flags[meta["overlong"]] = True
        overlong.append(flags)
        tally.add(Tally.from_json(meta["tally"]))
    index = {
        "valid_ordinal": np.concatenate(ordinals or [np.zeros(0, np.int64)]),
        "overlong": np.concatenate(overlong or [np.zeros(0, bool)]),
        "shard_samples": np.asarray([m["samples"] for m in metas], np.int64),
    }
    manifest = {"version": cache.VERSION, "spec": plan.spec, "rows": plan.rows,
                "samples": int(len(index["valid_ordinal"])), "tally": tally.to_json()}  # fmt: skip
    plan.entry.finalize(shards, index, manifest)


def load(plan: _Plan, local_root: str | None = None) -> PreparedSource:
    if not plan.entry.complete():
        raise CacheError(f"data cache {plan.entry.dir} is incomplete: process 0 completes it "
                               "once every process has written its shards")  # fmt: skip
    manifest, index = plan.entry.read()
    store = cache.ShardStore(cache.local_copy(plan.entry, manifest["shards"], local_root))
    if len(store) != manifest["samples"]:
        raise CacheError(f"data cache {plan.entry.dir}: {len(store)} samples in its shards, "
                               f"{manifest['samples']} in its manifest")  # fmt: skip
    return PreparedSource(store, index["valid_ordinal"], index["overlong"],
                          Tally.from_json(manifest["tally"]), os.fspath(plan.entry.dir))  # fmt: skip
