"""The SFT / long-document input pipeline: files -> validated, tokenised examples -> Grain
mixture -> first-fit packing -> fixed-shape batches with resumable iterator state.

Build it with `build_pipeline(cfg, tokenizer)` where `cfg` is the `data` ConfigDict section
(`default_config()` lists every key; sources are dicts):

  sources        list of {path | dataset, format, weight=1.0, fields={}, role_map={}, name=,
                 max_rows=0 (0: all; else the first N rows of the file), template=,
                 prompt_format={}}
                 path: .jsonl / .json / .csv / .parquet file, local or gs:// (or a
                 `datasets.save_to_disk` folder); dataset: an in-memory list of dicts or HF
                 `datasets.Dataset`; format, fields, role_map and prompt_format (instruct:
                 axolotl's format strings): see formats.py; template: this source's, instead
                 of data.template ("none": instruct rows without a chat template)
  template       "tokenizer" (tokenizer.chat_template) | "chatml" | "llama3" | "gemma" |
                 a Jinja template (any string with "{{" or "{%")
  loss_on        "assistant" (default) | "all" | "last_assistant"   (text rows: all tokens)
  roles_to_train the roles whose turns "assistant" trains (axolotl's name), ["assistant"]
  train_on_eos   the end-of-turn marker after: "turn" each trained turn (default) | "all" every
                 turn | "last" the last trained turn | "none" (axolotl's names; templates.py)
  role_order     "alternate" (default): a conversation whose turns after an optional system
                 message are not user, assistant, user, ... is skipped (role_order) | "any"
  seq_len        tokens per packed row
  batch_size     GLOBAL rows per step; each process yields batch_size // process_count rows
  overlength     what to do with a sample longer than seq_len; every case is counted:
                 "truncate" keep its first seq_len tokens | "drop" skip it |
                 "split" cut it into consecutive pieces of at most seq_len tokens, each its
                 own packed sample (positions restart at 0; the first token of a piece is
                 input only, never a target). Meant for long documents (format text: every
                 token trained); chat rows keep each piece's trained mask, and pieces with no
                 trained target are dropped (counted as pieces_dropped)
  seed           shuffling, eval split and bin order
  eval_fraction  fraction of each source's valid rows held out for eval (deterministic)
  eval_count     or a fixed number of rows per source (wins when > 0)
  epochs         passes over the training data; 0 = repeat forever (stop by step count).
                 With several sources the mixture draws epochs * (all train rows) examples
                 by weight, repeating (reshuffled) any source that runs out.
  packing_bins   rows packed at once (first-fit); 0 = rows per process
  max_samples_per_row  the most samples packed into one row; 0 = no bound. The cudnn attention
                 backend attends a fixed number per row: the recipe sets this for it
                 (train.recipe.bound_samples_per_row) and the kernel reads the same number
  pad_id         -1 = tokenizer.pad_token_id (or 0 when it has none)
  cache_dir      where file sources' prepared samples are cached ("": nowhere, in memory;
                 training uses RUN_DIR/data_cache unless set; local or gs://)
  workers        processes that render and tokenise (0: one per core the load average leaves
                 idle, at most 32; 1: this one); helpers start once this process has
                 prepared for a few seconds (prepare.SPAWN_AFTER_S)
  shard_rows     rows per cache shard: the unit the hosts of a job divide (part of the key)
  eval_mode      "token_mean" (default): eval loss = summed token loss / trained tokens over
                 all eval rows | "trainer": what transformers' Trainer.evaluate() reports (the
                 platform's validator): eval rows over seq_len left out, each batch of
                 `eval_batch_size` rows (in row order) scored by its token mean, and those
                 means averaged weighted by the batches' rows
  eval_batch_size  rows per eval batch in eval_mode "trainer" (per_device_eval_batch_size)

Every row is validated and tokenised before step 0 (prepare.py: in parallel processes), so the
skip report is complete, the eval split exact, and the Grain graph holds only index-addressable
samples (its iterator state is a few integers). With a cache folder the samples are prepared
once per source and settings (cache.py: ArrayRecord read by index, shards divided among the
hosts of a job) and a host holds only per-sample index arrays, not tokens. A long raw document
is tokenised in pieces cut where its tokens cannot change (templates.encode_texts).
`tools/bench_data.py` measures preparation, warm starts and steady-state speed on real data.

Preference pairs (sources of format "dpo", for train.objective "dpo") are one packing unit
each and come out with pair fields (`covenant_jax.data.pairs`); a source mixture of pairs and
other formats is refused, and so are overlength "split" and eval_mode "trainer" for pairs.
Pairs are prepared in memory, never cached (the cache's records hold tokens and flags only).
`build_pipeline(..., annotate=f)` lets the trainer add a per-token field to every pair before
packing (the precomputed reference log-probs): `f(lists of units)` adds it in place.

Batches (numpy, each [batch_size // process_count, seq_len]): `tokens` int32, `targets`
int32 (tokens[t+1] in the same sample, else pad), `loss_mask` float32 (1 where targets[t] is
a trained token of the same sample), `segment_ids` int32 (1, 2, ... per sample; 0 = padding),
`positions` int32 (restart at 0 per sample). Iterators from `iter(pipeline.train)` have
`get_state()` / `set_state()` and save through Orbax with `grain.checkpoint.CheckpointSave`.
With finite epochs on several hosts, hosts may end one batch apart: train by step count.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from typing import Any, Iterator, Mapping, Sequence

import grain
import ml_collections
import numpy as np

from covenant_jax import fields
from covenant_jax.data import formats, pairs, prepare, templates
from covenant_jax.data.tokenizer import load_tokenizer
from covenant_jax.errors import UserError

OVERLENGTH = ("truncate", "drop", "split")
EVAL_MODES = ("token_mean", "trainer")
_SOURCE_KEYS = {
    "path", "dataset", "format", "weight", "fields", "role_map", "name", "max_rows", "template",
    "prompt_format",
}  # fmt: skip
RULES = {
    "seq_len": fields.at_least(2),
    "batch_size": fields.at_least(1),
    "overlength": fields.one_of(OVERLENGTH),
    "loss_on": fields.one_of(templates.LOSS_ON),
    "eval_fraction": fields.within(0, 1, high_open=True),
    "eval_count": fields.at_least(0),
    "epochs": fields.at_least(0),
    "packing_bins": fields.at_least(0),
    "max_samples_per_row": fields.at_least(0),
    "workers": fields.at_least(0),
    "shard_rows": fields.at_least(1),
    "eval_mode": fields.one_of(EVAL_MODES),
    "eval_batch_size": fields.at_least(1),
    "roles_to_train": (
        lambda v: isinstance(v, (list, tuple)) and bool(v) and set(v) <= set(formats.ROLES),
        f"must be a non-empty list of {list(formats.ROLES)}",
    ),
    "train_on_eos": fields.one_of(templates.TRAIN_ON_EOS),
    "role_order": fields.one_of(formats.ROLE_ORDERS),
}
# How long a process waits for the others to prepare their shards of a cache entry.
PREPARE_TIMEOUT_S = 48 * 3600


def default_config() -> ml_collections.ConfigDict:
    """The `data` section with every key and its default (sources must be filled in)."""
    return ml_collections.ConfigDict(
        dict(
            sources=[],
            template="tokenizer",
            loss_on="assistant",
            roles_to_train=["assistant"],
            train_on_eos="turn",
            role_order="alternate",
            seq_len=2048,
            batch_size=8,
            overlength="truncate",
            seed=0,
            eval_fraction=0.0,
            eval_count=0,
            epochs=0,
            packing_bins=0,
            max_samples_per_row=0,
            pad_id=-1,
            cache_dir="",
            workers=0,
            shard_rows=16384,
            eval_mode="token_mean",
            eval_batch_size=8,
        )
    )


@dataclasses.dataclass
class SourceReport:
    """What happened to one source's rows."""

    name: str
    rows: int = 0
    train: int = 0
    eval: int = 0
    truncated: int = 0
    split: int = 0  # Rows cut into pieces (overlength="split").
    pieces: int = 0  # Pieces kept from those rows (each a training sample).
    pieces_dropped: int = 0  # Pieces without a trained target.
    tokens: int = 0
    trained_tokens: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    located: dict = dataclasses.field(default_factory=dict)  # reason -> first "file:line: ..."
    eval_dropped: int = 0  # Eval rows over seq_len left out (eval_mode="trainer").

    @classmethod
    def of(cls, name: str, tally: prepare.Tally) -> SourceReport:
        counts = ("rows", "truncated", "split", "pieces", "pieces_dropped", "tokens", "trained_tokens")
        return cls(
            name,
            **{k: getattr(tally, k) for k in counts},
            skipped=collections.Counter(tally.skipped),
            located=dict(tally.located),
        )

    def __str__(self) -> str:
        skipped = (
            ", ".join(f"{r}={self.skipped[r]}" for r in formats.SKIP_REASONS if self.skipped[r]) or "none"
        )
        split = (
            f"split {self.split} into {self.pieces} pieces ({self.pieces_dropped} dropped); "
            if self.split
            else ""
        )
        dropped = f" ({self.eval_dropped} over seq_len left out)" if self.eval_dropped else ""
        where = [w for r in formats.SKIP_REASONS for w in self.located.get(r, [])]
        return "\n    ".join([
            f"{self.name}: {self.rows} rows -> {self.train} train + {self.eval} eval samples"
            f"{dropped}; skipped {sum(self.skipped.values())} ({skipped}); truncated "
            f"{self.truncated}; {split}{self.tokens} tokens, {self.trained_tokens} trained"
        ] + where)  # fmt: skip


@dataclasses.dataclass
class DataReport:
    """Per-source validation counts; print it at start."""

    sources: list[SourceReport]

    @property
    def skipped(self) -> collections.Counter:
        return sum((s.skipped for s in self.sources), collections.Counter())

    def __str__(self) -> str:
        return "\n".join(["data report:"] + [f"  {s}" for s in self.sources])


@dataclasses.dataclass
class DataPipeline:
    """`train` yields batches forever (or for `epochs`); `eval` one pass (None if no split):
    Grain batches (eval_mode "token_mean"), or a `TrainerEval` ("trainer")."""

    train: grain.IterDataset
    eval: Any
    report: DataReport
    rows_per_process: int
    seq_len: int
    pad_id: int
    eval_mode: str = "token_mean"
    cache_locations: list = dataclasses.field(default_factory=list)  # Per source; None: memory.
    pairs: bool = False  # preference pairs (batches carry the pair fields)


def build_pipeline(
    cfg: Mapping[str, Any],
    tokenizer,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    cache_dir: str | None = None,
    local_cache_dir: str | None = None,
    annotate=None,
) -> DataPipeline:
    """The whole pipeline from the `data` config section. `tokenizer`: a fast HF tokenizer or
    a local path to one. Shards by jax.process_index() / process_count() unless both given.
    `cache_dir` (default: data.cache_dir; empty: none) holds the prepared samples of file
    sources (prepare.py, cache.py); `local_cache_dir` where a remote cache is copied to.
    `annotate(unit_lists)`, when given, adds a per-token field to every preference pair (train
    and eval, in place) before packing."""
    cfg = _with_defaults(cfg)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if process_index is None or process_count is None:
        process_index, process_count = this_process()
    if cfg["batch_size"] % process_count:
        raise UserError(
            f"data.batch_size={cfg['batch_size']} is not divisible by process_count={process_count}"
        )
    rows = cfg["batch_size"] // process_count
    pad_id = cfg["pad_id"] if cfg["pad_id"] >= 0 else (tokenizer.pad_token_id or 0)
    worker = prepare.Worker.create(tokenizer, cfg["sources"], cfg)
    prepared = prepare.prepare_sources(
        cfg["sources"], cfg, worker,
        cache_dir=cfg["cache_dir"] if cache_dir is None else cache_dir,
        process_index=process_index, process_count=process_count, barrier=_barrier,
        local_root=local_cache_dir,
    )  # fmt: skip
    splits = [split_source(p, i, cfg) for i, p in enumerate(prepared)]
    is_pairs = pairs.is_pair_data(cfg["sources"])
    pack = functools.partial(
        pack_and_batch, seq_len=cfg["seq_len"], rows=rows, pad_id=pad_id,
        bins=cfg["packing_bins"] or rows, seed=cfg["seed"],
        max_samples_per_row=cfg["max_samples_per_row"],
    )  # fmt: skip
    weights = [float(s.get("weight", 1.0)) for s in cfg["sources"]]
    train_sets = [SampleView([(p.samples, s.train)]) for p, s in zip(prepared, splits)]
    evals = SampleView([(p.samples, s.eval) for p, s in zip(prepared, splits) if len(s.eval)])
    if is_pairs:
        train_sets, evals, pack = _pair_sets(train_sets, evals, cfg, rows, pad_id, annotate)
    train = mix_sources(train_sets, weights, epochs=cfg["epochs"], seed=cfg["seed"])
    train = pack(_shard(train, process_index, process_count), shuffle_bins=True)
    eval_ds = None
    if len(evals) and cfg["eval_mode"] == "trainer":
        eval_ds = TrainerEval(
            evals,
            cfg["eval_batch_size"],
            cfg["batch_size"],
            cfg["seq_len"],
            pad_id,
            cfg["max_samples_per_row"],
            process_index,
            process_count,
        )
    elif len(evals):
        eval_ds = pack(_shard(grain.MapDataset.source(evals), process_index, process_count),
                       shuffle_bins=False)  # fmt: skip
    report = DataReport([s.report for s in splits])
    return DataPipeline(train, eval_ds, report, rows, cfg["seq_len"], pad_id, cfg["eval_mode"],
                        [p.location for p in prepared], is_pairs)  # fmt: skip


def _pair_sets(train_sets, evals, cfg, rows: int, pad_id: int, annotate):
    """(train sets, eval set, packer) for preference pairs: the units listed in memory (so
    `annotate` can add its field to them) and packed whole by `pairs.pack_pairs`."""
    train_sets = [list(s) for s in train_sets]
    evals = list(evals)
    if annotate is not None:
        annotate([*train_sets, evals])
    first = train_sets[0][0]
    pack = functools.partial(
        pairs.pack_pairs, seq_len=cfg["seq_len"], rows=rows, pad_id=pad_id,
        bins=cfg["packing_bins"] or rows, seed=cfg["seed"], fields=tuple(first),
        pairs_per_row=pairs.pairs_per_row(cfg["seq_len"], cfg["max_samples_per_row"]),
    )  # fmt: skip
    return train_sets, evals, pack


def this_process() -> tuple[int, int]:
    """(index, count) of this process in a joined JAX job; (0, 1) alone, without starting JAX."""
    from covenant_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

    if not distributed.is_multiprocess():
        return 0, 1
    import jax  # pylint: disable=g-import-not-at-top

    return jax.process_index(), jax.process_count()


_BARRIERS = itertools.count()  # Unique barrier names: every process builds the same pipelines.


def _barrier(name: str) -> None:
    from covenant_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

    if distributed.is_multiprocess():
        distributed.barrier(f"covenant-data-{next(_BARRIERS)}: {name}", PREPARE_TIMEOUT_S)


def _shard(ds: grain.MapDataset, index: int, count: int) -> grain.IterDataset:
    # Examples are pre-tokenised, so reading them in threads buys nothing: read in the caller.
    return ds[index::count].to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def _with_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    out = default_config().to_dict()
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    unknown = set(cfg) - set(out)
    if unknown:
        raise UserError(f"Unknown data config key(s) {sorted(unknown)}; known: {sorted(out)}")
    out.update(cfg)
    if not out["sources"]:
        raise UserError("data.sources is empty")
    out["sources"] = [_plain(s) for s in out["sources"]]
    for i, src in enumerate(out["sources"]):
        if set(src) - _SOURCE_KEYS:
            raise UserError(
                f"data.sources[{i}]: unknown key(s) {sorted(set(src) - _SOURCE_KEYS)}; "
                f"known: {sorted(_SOURCE_KEYS)}"
            )
        if src.get("path", src.get("dataset")) is None:
            raise UserError(f"data.sources[{i}] needs `path` or `dataset`")
    fields.check("data", out, RULES)
    if pairs.is_pair_data(out["sources"]):
        if out["overlength"] == "split":
            raise UserError(
                "data.overlength='split' cannot keep a preference pair's sequences together: "
                "use 'truncate' (the prompt, from the left) or 'drop'"
            )
        if out["eval_mode"] == "trainer":
            raise UserError(
                "data.eval_mode='trainer' is the SFT loss transformers' Trainer reports; "
                "preference pairs are evaluated by the DPO loss: use 'token_mean'"
            )
    return out


def _plain(x: Any) -> Any:
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


@dataclasses.dataclass
class _Split:
    train: np.ndarray  # Sample ids of the training rows.
    eval: np.ndarray  # Sample ids of the held-out rows.
    report: SourceReport


def split_source(p: prepare.PreparedSource, index: int, cfg: Mapping[str, Any]) -> _Split:
    """The source's samples split by row into train and eval (split_eval over its valid rows);
    in eval_mode "trainer" eval rows over seq_len are left out, as the platform's validator does.
    Raises (naming the source) when no valid or no trainable row remains."""
    name = prepare.source_name(cfg["sources"][index], index)
    report = SourceReport.of(name, p.tally)
    if not p.tally.valid:
        _raise_empty(name, report, "valid")
    _, eval_rows = split_eval(
        p.tally.valid, cfg["eval_fraction"], cfg["eval_count"], seed=(cfg["seed"], index)
    )
    held_out = np.zeros(p.tally.valid, bool)
    held_out[eval_rows] = True
    in_eval = held_out[p.valid_ordinal]
    train, evals = np.flatnonzero(~in_eval), np.flatnonzero(in_eval)
    if cfg["eval_mode"] == "trainer":
        report.eval_dropped = len(np.unique(p.valid_ordinal[evals[p.overlong[evals]]]))
        evals = evals[~p.overlong[evals]]
    report.train, report.eval = len(train), len(evals)
    if not len(train):
        _raise_empty(name, report, "trainable")
    return _Split(train, evals, report)


def _raise_empty(name: str, report: SourceReport, what: str):
    raise UserError(
        f"{name}: no {what} rows remain out of {report.rows}; skipped by reason: {dict(report.skipped)}"
    )


def split_eval(n: int, fraction: float, count: int, seed) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, eval) index split of n rows: eval is `count` rows when count > 0,
    else round(fraction * n). Both sorted, disjoint, covering range(n)."""
    k = int(count) if count > 0 else int(round(fraction * n))
    if k >= n and k > 0:
        raise UserError(f"eval split of {k} rows leaves no training rows (source has {n})")
    perm = np.random.default_rng(np.random.SeedSequence(list(np.atleast_1d(seed)))).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


class SampleView:
    """Samples picked by id from prepared sources, in order: a sequence Grain reads by index."""

    def __init__(self, parts: Sequence[tuple[Sequence, np.ndarray]]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(ids) for _, ids in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        samples, ids = self.parts[k]
        return samples[int(ids[i - self.starts[k]])]


@dataclasses.dataclass
class TrainerEval:
    """Eval batches as transformers' `Trainer.evaluate()` forms them, so the loss can be averaged
    as it does (the mean of per-batch token means): the eval samples in order, `batch_size` at a
    time. A Trainer batch's samples are packed into rows (packing changes no token's loss) and
    cut into device batches of `rows` global rows; every process packs the same rows and feeds
    its slice. Iterating yields, per Trainer batch, (its samples, this process's batches)."""

    samples: Sequence
    batch_size: int  # Samples per Trainer batch (per_device_eval_batch_size).
    rows: int  # Global rows per device batch.
    seq_len: int
    pad_id: int
    max_samples_per_row: int
    process_index: int
    process_count: int

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, list[dict[str, np.ndarray]]]]:
        local = self.rows // self.process_count
        mine = slice(self.process_index * local, (self.process_index + 1) * local)
        for start in range(0, len(self.samples), self.batch_size):
            group = [self.samples[i] for i in range(start, min(start + self.batch_size, len(self.samples)))]
            ds = grain.MapDataset.source(group).to_iter_dataset(
                grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
            )
            batches = pack_and_batch(
                ds, seq_len=self.seq_len, rows=self.rows, pad_id=self.pad_id, bins=self.rows, seed=0,
                shuffle_bins=False, max_samples_per_row=self.max_samples_per_row,
            )  # fmt: skip
            yield len(group), [{k: v[mine] for k, v in b.items()} for b in batches]


def mix_sources(
    datasets: Sequence[Sequence], weights: Sequence[float], *, epochs: int, seed: int
) -> grain.MapDataset:
    """Each source shuffled (reshuffled every pass) and repeated, mixed by weight with Grain;
    cut to epochs * (total rows) when epochs > 0."""
    if len(weights) != len(datasets) or min(weights) <= 0:
        raise UserError(f"source weights must be positive, one per source; got {weights}")
    parts = [
        grain.MapDataset.source(d).shuffle(seed=seed + 7919 * i).repeat(None) for i, d in enumerate(datasets)
    ]
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, list(weights))
    return mixed[: epochs * sum(map(len, datasets))] if epochs > 0 else mixed


def pack_and_batch(
    ds: grain.IterDataset,
    *,
    seq_len: int,
    rows: int,
    pad_id: int,
    bins: int,
    seed: int,
    shuffle_bins: bool,
    max_samples_per_row: int = 0,
) -> grain.IterDataset:
    """Grain first-fit packing (at most `max_samples_per_row` samples a row when > 0), then
    batching; `to_batch` derives what Grain cannot (targets and a loss mask that never crosses
    a sample boundary) and pads the last batch to `rows`."""
    packed = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={"tokens": seq_len, "weights": seq_len},
        num_packing_bins=bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
        padding_struct={"tokens": pad_id, "weights": False},
        max_sequences_per_bin=max_samples_per_row or None,
    )
    return packed.batch(rows).map(functools.partial(to_batch, rows=rows, pad_id=pad_id))


def to_batch(packed: Mapping[str, np.ndarray], *, rows: int, pad_id: int) -> dict:
    """Packed rows -> the trainer's batch contract (see the module docstring)."""
    tokens_BxL = packed["tokens"].astype(np.int32)
    seg_BxL = packed["tokens_segment_ids"].astype(np.int32)
    same_next = np.zeros(seg_BxL.shape, bool)
    same_next[:, :-1] = (seg_BxL[:, 1:] == seg_BxL[:, :-1]) & (seg_BxL[:, :-1] > 0)
    targets_BxL = np.full_like(tokens_BxL, pad_id)
    targets_BxL[:, :-1] = np.where(same_next[:, :-1], tokens_BxL[:, 1:], pad_id)
    loss_BxL = np.zeros(seg_BxL.shape, np.float32)
    loss_BxL[:, :-1] = same_next[:, :-1] & packed["weights"][:, 1:].astype(bool)
    batch = {
        "tokens": tokens_BxL,
        "targets": targets_BxL,
        "loss_mask": loss_BxL,
        "segment_ids": seg_BxL,
        "positions": packed["tokens_positions"].astype(np.int32),
    }
    missing = rows - tokens_BxL.shape[0]
    if missing:
        fill = {"tokens": pad_id, "targets": pad_id}
        batch = {
            k: np.concatenate([v, np.full((missing,) + v.shape[1:], fill.get(k, 0), v.dtype)])
            for k, v in batch.items()
        }
    return batch
