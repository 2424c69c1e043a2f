"""Perplexity by context length with a sliding window (the YaRN paper's long-context tables).

For each context length L, every document with at least L tokens is cut into full windows of
L tokens starting at 0, S, 2S, ... (S = stride, default L; a stride above L is clamped to L).
As in the Hugging Face perplexity guide, a document's first window scores all its L - 1
predictions and each later window only its last S tokens (those the previous window did not
reach), so every token from 1 up to the end of the last full window is scored exactly once; a
tail shorter than S after it is not scored (shapes stay static). With S = L the windows are
independent chunks and each scores its L - 1 predictions.

One jitted forward per length (batches padded to ``batch_size`` windows) returns per-token
float32 NLL [B, L - 1]; logits exist only ``chunk`` positions at a time inside the jit. The host
masks and sums in float64: ``nll`` is the mean NLL per scored token, ``ppl = exp(nll)``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from covenant_jax.eval.common import (
    EvalInputError,
    batches,
    jit_model_fn,
    load_texts,
    pad_rows,
    token_nll,
)
from covenant_jax.model.llama import Llama


@dataclasses.dataclass(frozen=True)
class Window:
    document: int
    start: int  # first token of the window in the document
    score_from: int  # first window index whose token is scored (>= 1)


@dataclasses.dataclass(frozen=True)
class LengthPerplexity:
    length: int
    stride: int
    ppl: float
    nll: float  # mean NLL per scored token (nats)
    nll_sum: float
    tokens: int  # scored tokens
    windows: int
    documents: int  # documents with at least one window
    skipped_documents: int  # documents shorter than the length (or than the longest, if common)


@dataclasses.dataclass
class PerplexityResult:
    rows: list[LengthPerplexity]
    meta: dict = dataclasses.field(default_factory=dict)

    def by_length(self) -> dict[int, LengthPerplexity]:
        return {row.length: row for row in self.rows}

    def table(self) -> str:
        header = ("length", "stride", "docs", "skipped", "windows", "tokens", "nll", "ppl")
        lines = ["{:>7} {:>7} {:>6} {:>8} {:>8} {:>9} {:>8} {:>10}".format(*header)]
        for r in self.rows:
            lines.append(
                f"{r.length:>7} {r.stride:>7} {r.documents:>6} {r.skipped_documents:>8} "
                f"{r.windows:>8} {r.tokens:>9} {r.nll:>8.4f} {r.ppl:>10.3f}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": [dataclasses.asdict(r) for r in self.rows]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "PerplexityResult":
        return cls([LengthPerplexity(**r) for r in d["rows"]], dict(d.get("meta", {})))


def window_plan(num_tokens: int, length: int, stride: int) -> list[tuple[int, int]]:
    """(start, score_from) of each full window of a ``num_tokens`` document (see module doc)."""
    if not 1 <= stride <= length:
        raise EvalInputError(f"stride {stride} must be in [1, length={length}]")
    starts = range(0, num_tokens - length + 1, stride)
    return [(start, 1 if start == 0 else max(1, length - stride)) for start in starts]


@functools.lru_cache(maxsize=None)
def _window_nll(chunk: int):
    """One function object per chunk size, so repeated calls reuse the jit cache."""

    def fn(model: Llama, tokens_BL):
        hidden_BLD = model.hidden_states(tokens_BL)
        return token_nll(model, hidden_BLD[:, :-1], tokens_BL[:, 1:], chunk)

    return fn


def _plan_windows(
    documents, length: int, stride: int, min_tokens: int, max_windows: int | None
) -> tuple[list[Window], int]:
    """(windows, documents skipped as too short) for one length; an error when none is left."""
    windows: list[Window] = []
    skipped = 0
    for d, doc in enumerate(documents):
        if len(doc) < max(length, min_tokens):
            skipped += 1
            continue
        windows += [
            Window(d, start, score_from)
            for start, score_from in window_plan(len(doc), length, stride)[:max_windows]
        ]
    if not windows:
        longest = max((len(doc) for doc in documents), default=0)
        need = f"{max(length, min_tokens)} tokens" + (
            " (--common-documents: the longest length)" if min_tokens > length else ""
        )
        raise EvalInputError(
            f"length {length}: no document has {need}; the longest has {longest}. "
            "Use shorter --lengths, longer documents, or --concatenate"
        )
    return windows, skipped


def _score_batch(forward, docs, batch: Sequence[Window], length: int, batch_size: int):
    """(float64 NLL sum, scored token count) of one batch of windows."""
    tokens_BL = np.stack([np.asarray(docs[w.document][w.start : w.start + length]) for w in batch])
    score_from_B = np.array([w.score_from for w in batch])
    nll_BL1 = np.asarray(forward(jnp.asarray(pad_rows(tokens_BL.astype(np.int32), batch_size, 0))))
    nll_BL1 = nll_BL1[: len(batch)].astype(np.float64)
    mask_BL1 = np.arange(1, length)[None, :] >= score_from_B[:, None]
    return float(np.sum(nll_BL1 * mask_BL1)), int(mask_BL1.sum())


def perplexity(
    model: Llama,
    documents: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    stride: int | None = None,
    batch_size: int = 1,
    chunk: int = 1024,
    max_windows_per_document: int | None = None,
    common_documents: bool = False,
    mesh: Mesh | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on token-id ``documents`` at each context length.

    ``stride`` None means non-overlapping windows; ``common_documents`` evaluates every length
    on the same documents (those long enough for the longest length).
    """
    if not lengths or min(lengths) < 2:
        raise EvalInputError(f"lengths must be at least 2 tokens, got {list(lengths)}")
    for name, value in (
        ("stride", stride),
        ("batch_size", batch_size),
        ("chunk", chunk),
        ("max_windows_per_document", max_windows_per_document),
    ):
        if value is not None and value < 1:
            raise EvalInputError(f"{name}={value} must be >= 1")
    plans = {
        length: _plan_windows(
            documents,
            length,
            min(stride or length, length),
            max(lengths) if common_documents else 0,
            max_windows_per_document,
        )
        for length in lengths
    }  # every length checked before anything is computed
    forward = jit_model_fn(model, _window_nll(chunk), mesh)
    rows = []
    for length, (windows, skipped) in plans.items():
        nll_sum, count = 0.0, 0
        for batch in batches(windows, batch_size):
            batch_sum, batch_count = _score_batch(forward, documents, batch, length, batch_size)
            nll_sum, count = nll_sum + batch_sum, count + batch_count
        nll = nll_sum / count
        rows.append(
            LengthPerplexity(
                length=length,
                stride=min(stride or length, length),
                ppl=math.exp(nll),
                nll=nll,
                nll_sum=nll_sum,
                tokens=count,
                windows=len(windows),
                documents=len({w.document for w in windows}),
                skipped_documents=skipped,
            )
        )
    return PerplexityResult(rows)


def tokenize_documents(
    tokenizer, texts: Sequence[str], concatenate: bool = False, separator: str = "\n\n"
) -> list[list[int]]:
    """Token ids per text (with the tokenizer's own special tokens, e.g. a BOS), or of all texts
    joined by ``separator`` into one stream when ``concatenate``."""
    if concatenate:
        texts = [separator.join(texts)]
    return [list(ids) for ids in tokenizer(list(texts))["input_ids"]]


def perplexity_from_jsonl(
    model: Llama,
    tokenizer,
    path: str | Path,
    lengths: Sequence[int],
    *,
    field: str = "text",
    max_rows: int | None = None,
    max_documents: int | None = None,
    concatenate: bool = False,
    **kwargs,
) -> PerplexityResult:
    """:func:`perplexity` on a ``{"text": ...}`` JSONL file; ``kwargs`` go to :func:`perplexity`.

    Reads at most ``max_rows`` rows. Without ``concatenate``, ``max_documents`` keeps the first
    documents long enough to be evaluated (at least min(lengths) tokens, or max(lengths) with
    ``common_documents``); shorter rows passed over are counted in ``meta["rows_too_short"]``.
    """
    texts = load_texts(path, field, max_rows)
    documents = tokenize_documents(tokenizer, texts, concatenate)
    too_short = 0
    if max_documents is not None and not concatenate:
        needed = max(lengths) if kwargs.get("common_documents") else min(lengths)
        long_enough = [d for d in documents if len(d) >= needed]
        too_short = len(documents) - len(long_enough)
        documents = long_enough[:max_documents]
    result = perplexity(model, documents, lengths, **kwargs)
    result.meta.update(
        data=str(path),
        rows=len(texts),
        rows_too_short=too_short,
        concatenate=concatenate,
        input_tokens=sum(len(d) for d in documents),
        rope=dataclasses.asdict(model.config.rope),
        max_position_embeddings=model.config.max_position_embeddings,
        **{k: v for k, v in kwargs.items() if k != "mesh"},
    )
    return result
