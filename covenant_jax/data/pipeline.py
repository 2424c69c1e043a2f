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

Why eager: each row is validated and tokenised once, up front, so the skip report is complete
before step 0, the eval split is exact, and the Grain graph holds only index-addressable
arrays (its iterator state is a few integers). Every host does the same work and so gets the
same report and split; tokens are kept as int32 in host memory. Tokenising goes through the
fast tokenizer's batch API (parallel in Rust), and a long raw document is cut at places where
its tokens cannot change, so the work stays linear in its length (templates.encode_texts).
`tools/bench_data.py` measures setup and steady-state speed on real data.

Preference pairs (sources of format "dpo", for train.objective "dpo") are one packing unit
each and come out with pair fields (`covenant_jax.data.pairs`); a source mixture of pairs and
other formats is refused, and so is overlength "split" for pairs. `build_pipeline(...,
annotate=f)` lets the trainer add a per-token field to every example before packing (the
precomputed reference log-probs): `f(lists of examples)` adds it in place.

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
from typing import Any, Mapping, Sequence

import grain
import ml_collections
import numpy as np

from covenant_jax import fields
from covenant_jax.data import formats, pairs, sources, templates
from covenant_jax.data.tokenizer import load_tokenizer
from covenant_jax.errors import UserError

OVERLENGTH = ("truncate", "drop", "split")
SHOW_SKIPPED = 3  # Skipped rows located in the report, per reason.
_SOURCE_KEYS = {
    "path", "dataset", "format", "weight", "fields", "role_map", "name", "max_rows", "template",
    "prompt_format",
}  # fmt: skip
RULES = {
    "seq_len": fields.at_least(2), "batch_size": fields.at_least(1),
    "overlength": fields.one_of(OVERLENGTH), "loss_on": fields.one_of(templates.LOSS_ON),
    "eval_fraction": fields.within(0, 1, high_open=True), "eval_count": fields.at_least(0),
    "epochs": fields.at_least(0), "packing_bins": fields.at_least(0),
    "max_samples_per_row": fields.at_least(0),
    "roles_to_train": (
        lambda v: isinstance(v, (list, tuple)) and bool(v) and set(v) <= set(formats.ROLES),
        f"must be a non-empty list of {list(formats.ROLES)}",
    ),
    "train_on_eos": fields.one_of(templates.TRAIN_ON_EOS),
    "role_order": fields.one_of(formats.ROLE_ORDERS),
}


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

    def skip(self, error: formats.InvalidRow, where: str) -> None:
        """Counts a skipped row; the first few per reason keep where they are and why."""
        self.skipped[error.reason] += 1
        first = self.located.setdefault(error.reason, [])
        if len(first) < SHOW_SKIPPED:
            detail = f" ({error.detail})" if error.detail else ""
            first.append(f"{where}: {error.reason}{detail}")

    def __str__(self) -> str:
        skipped = (
            ", ".join(f"{r}={self.skipped[r]}" for r in formats.SKIP_REASONS if self.skipped[r])
            or "none"
        )
        split = (
            f"split {self.split} into {self.pieces} pieces ({self.pieces_dropped} dropped); "
            if self.split
            else ""
        )
        where = [w for r in formats.SKIP_REASONS for w in self.located.get(r, [])]
        return "\n    ".join([
            f"{self.name}: {self.rows} rows -> {self.train} train + {self.eval} eval samples; "
            f"skipped {sum(self.skipped.values())} ({skipped}); truncated {self.truncated}; "
            f"{split}{self.tokens} tokens, {self.trained_tokens} trained"
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
    """`train` yields batches forever (or for `epochs`); `eval` one pass (None if no split)."""

    train: grain.IterDataset
    eval: grain.IterDataset | None
    report: DataReport
    rows_per_process: int
    seq_len: int
    pad_id: int
    pairs: bool = False  # preference pairs (batches carry the pair fields)


def build_pipeline(
    cfg: Mapping[str, Any],
    tokenizer,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    annotate=None,
) -> DataPipeline:
    """The whole pipeline from the `data` config section. `tokenizer`: a fast HF tokenizer or
    a local path to one. Shards by jax.process_index() / process_count() unless both given.
    `annotate(example_lists)`, when given, adds a per-token field to every example (train and
    eval, in place) before packing."""
    cfg = _with_defaults(cfg)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index, process_count = jax.process_index(), jax.process_count()
    if cfg["batch_size"] % process_count:
        raise UserError(
            f"data.batch_size={cfg['batch_size']} is not divisible by process_count={process_count}"
        )
    rows = cfg["batch_size"] // process_count
    pad_id = cfg["pad_id"] if cfg["pad_id"] >= 0 else (tokenizer.pad_token_id or 0)
    made: dict[str, templates.ChatTemplate] = {}
    loaded = [
        load_source(s, i, cfg, tokenizer, _source_template(s, cfg, tokenizer, made))
        for i, s in enumerate(cfg["sources"])
    ]
    train_sets, eval_sets, reports = zip(*loaded, strict=True)
    is_pairs = pairs.is_pair_data(cfg["sources"])
    if annotate is not None:
        annotate([*train_sets, *eval_sets])
    if is_pairs:
        first = train_sets[0][0]
        pack = functools.partial(
            pairs.pack_pairs, seq_len=cfg["seq_len"], rows=rows, pad_id=pad_id,
            bins=cfg["packing_bins"] or rows, seed=cfg["seed"], fields=tuple(first),
            pairs_per_row=pairs.pairs_per_row(cfg["seq_len"], cfg["max_samples_per_row"]),
        )  # fmt: skip
    else:
        pack = functools.partial(
            pack_and_batch, seq_len=cfg["seq_len"], rows=rows, pad_id=pad_id,
            bins=cfg["packing_bins"] or rows, seed=cfg["seed"],
            max_samples_per_row=cfg["max_samples_per_row"],
        )  # fmt: skip
    weights = [float(s.get("weight", 1.0)) for s in cfg["sources"]]
    train = mix_sources(train_sets, weights, epochs=cfg["epochs"], seed=cfg["seed"])
    train = pack(_shard(train, process_index, process_count), shuffle_bins=True)
    eval_examples = [e for es in eval_sets for e in es]
    eval_ds = None
    if eval_examples:
        eval_ds = _shard(grain.MapDataset.source(eval_examples), process_index, process_count)
        eval_ds = pack(eval_ds, shuffle_bins=False)
    return DataPipeline(train, eval_ds, DataReport(list(reports)), rows, cfg["seq_len"], pad_id, is_pairs)


def _shard(ds: grain.MapDataset, index: int, count: int) -> grain.IterDataset:
    # Examples are pre-tokenised, so reading them in threads buys nothing: read in the caller.
    return ds[index::count].to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    )


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
    fields.check("data", out, RULES)
    if out["overlength"] == "split" and pairs.is_pair_data(out["sources"]):
        raise UserError("data.overlength='split' cannot keep a preference pair's sequences together: "
                        "use 'truncate' (the prompt, from the left) or 'drop'")
    return out


def _plain(x: Any) -> Any:
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def _src_format(src: Mapping[str, Any]) -> str:
    return src.get("format", "messages")


def _source_template(src, cfg, tokenizer, made: dict) -> templates.ChatTemplate | None:
    """The source's chat template (one object per distinct template, so layouts are shared);
    None for formats that use none, or template "none"."""
    name = src.get("template") or cfg["template"]
    if _src_format(src) in formats.PLAIN_FORMATS or name == templates.NO_TEMPLATE:
        return None
    if name not in made:
        made[name] = templates.ChatTemplate(tokenizer, name)
    return made[name]


def load_source(
    src: Mapping[str, Any],
    index: int,
    cfg: Mapping[str, Any],
    tokenizer,
    template: templates.ChatTemplate | None,
):
    """Reads, validates, splits and tokenises one source -> (train, eval, SourceReport).

    Raises (naming the source) when a configured field is absent from every row or when no
    valid training row remains."""
    data = src.get("path", src.get("dataset"))
    if data is None:
        raise UserError(f"data.sources[{index}] needs `path` or `dataset`")
    name = src.get("name") or (str(data) if "path" in src else f"sources[{index}]")
    fmt = formats.RowFormat.create(
        _src_format(src), src.get("fields"), src.get("role_map"),
        prompt_format=src.get("prompt_format"), chat=template is not None,
        role_order=cfg["role_order"],
    )  # fmt: skip
    rows = sources.read_rows(data, src.get("max_rows") or 0)  # max_rows: a quick run
    fmt.check_columns(rows, name)
    report = SourceReport(name, rows=len(rows))
    examples, origin = _parse_rows(rows, fmt, report)
    if not examples:
        _raise_empty(name, report, "valid")
    train_idx, eval_idx = split_eval(
        len(examples), cfg["eval_fraction"], cfg["eval_count"], seed=(cfg["seed"], index)
    )
    if fmt.format in formats.PAIR_FORMATS:
        encoded = pairs.encode_pairs(tokenizer, template, examples, cfg["train_on_eos"])
        fit = functools.partial(_fit_pair, cfg=cfg, report=report)
    else:
        encoded = templates.encode_examples(
            tokenizer, template, examples, cfg["loss_on"],
            roles_to_train=cfg["roles_to_train"], train_on_eos=cfg["train_on_eos"],
        )  # fmt: skip
        fit = functools.partial(_fit, cfg=cfg, report=report)
    del examples
    train = [x for i in train_idx for x in fit(encoded[i], rows.where(origin[i]))]
    evals = [x for i in eval_idx for x in fit(encoded[i], rows.where(origin[i]))]
    report.train, report.eval = len(train), len(evals)
    if not train:
        _raise_empty(name, report, "trainable")
    return train, evals, report


def _parse_rows(
    rows: sources.Rows, fmt: formats.RowFormat, report: SourceReport
) -> tuple[list, list[int]]:
    """The valid rows' examples and, for each, its row's index (to locate later skips)."""
    examples, origin = [], []
    for i, row in enumerate(rows):
        try:
            if isinstance(row, sources.BadRow):
                raise formats.InvalidRow(row.reason, row.detail)
            examples.append(fmt.to_example(row))
            origin.append(i)
        except formats.InvalidRow as e:
            report.skip(e, rows.where(i))
    return examples, origin


def _raise_empty(name: str, report: SourceReport, what: str):
    raise UserError(
        f"{name}: no {what} rows remain out of {report.rows}; skipped by reason: "
        f"{dict(report.skipped)}"
    )


def split_eval(n: int, fraction: float, count: int, seed) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, eval) index split of n rows: eval is `count` rows when count > 0,
    else round(fraction * n). Both sorted, disjoint, covering range(n)."""
    k = int(count) if count > 0 else int(round(fraction * n))
    if k >= n and k > 0:
        raise UserError(f"eval split of {k} rows leaves no training rows (source has {n})")
    perm = np.random.default_rng(np.random.SeedSequence(list(np.atleast_1d(seed)))).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _fit(encoded, where: str, *, cfg, report: SourceReport) -> list[dict]:
    """One tokenised example (or its InvalidRow) -> its samples {"tokens", "weights"} under the
    overlength policy; none when skipped (the reason counted in report)."""
    try:
        if isinstance(encoded, formats.InvalidRow):
            raise encoded
        ids, trained = encoded
        pieces = _fit_length(ids, trained, cfg["seq_len"], cfg["overlength"])
        kept = [(i, t) for i, t in pieces if t[1:].any()]  # Token 0 is never a target.
        if len(pieces) > 1:
            report.split += 1
            report.pieces += len(kept)
            report.pieces_dropped += len(pieces) - len(kept)
        if not kept:
            raise formats.InvalidRow("no_trained_tokens")
    except formats.InvalidRow as e:
        report.skip(e, where)
        return []
    report.truncated += int(cfg["overlength"] == "truncate" and len(ids) > cfg["seq_len"])
    for i, t in kept:
        report.tokens += len(i)
        report.trained_tokens += int(t[1:].sum())
    return [{"tokens": i, "weights": t} for i, t in kept]


def _fit_pair(encoded, where: str, *, cfg, report: SourceReport) -> list[dict]:
    """One encoded pair (or its InvalidRow) -> [its packing unit], or none when skipped."""
    try:
        if isinstance(encoded, formats.InvalidRow):
            raise encoded
        unit, truncated = pairs.pair_unit(encoded, cfg["seq_len"], cfg["overlength"])
    except formats.InvalidRow as e:
        report.skip(e, where)
        return []
    report.truncated += int(truncated)
    report.tokens += len(unit["tokens"])
    report.trained_tokens += pairs.scored_tokens(unit)
    return [unit]


def _fit_length(ids, trained, seq_len: int, policy: str) -> list[tuple]:
    """[(ids, trained)] pieces of one sample; split pieces are views of the whole (kept in
    full anyway), a truncated sample a copy (so the long original can be freed)."""
    if len(ids) <= seq_len:
        return [(ids, trained)]
    if policy == "drop":
        raise formats.InvalidRow("overlength_dropped", f"{len(ids)} > {seq_len}")
    if policy == "split":
        starts = range(0, len(ids), seq_len)
        return [(ids[s : s + seq_len], trained[s : s + seq_len]) for s in starts]
    return [(ids[:seq_len].copy(), trained[:seq_len].copy())]


def mix_sources(
    datasets: Sequence[list], weights: Sequence[float], *, epochs: int, seed: int
) -> grain.MapDataset:
    """Each source shuffled (reshuffled every pass) and repeated, mixed by weight with Grain;
    cut to epochs * (total rows) when epochs > 0."""
    if len(weights) != len(datasets) or min(weights) <= 0:
        raise UserError(f"source weights must be positive, one per source; got {weights}")
    parts = [
        grain.MapDataset.source(d).shuffle(seed=seed + 7919 * i).repeat(None)
        for i, d in enumerate(datasets)
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
