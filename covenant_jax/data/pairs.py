"""Preference pairs (format "dpo") for the DPO objective: a `formats.Pair` -> one packing unit
-> packed rows with pair fields.

A pair is ONE unit for the packer: its two sequences, [prompt + chosen | prompt + rejected],
each tokenised whole (the chat template renders the prompt, with the generation prompt the
next assistant turn brings, and the answer; template "none" tokenises prompt and answer as a
`Completion`), with per-token fields: `weights` (the answer's tokens and the end-of-turn marker
closing each answer message, as SFT's masks: never the prompt), `sub` (1 chosen, 2 rejected)
and `pos` (positions restarting per sequence). So a pair's two sequences always land in the
same packed row, hence in the same micro-batch and process, and the step sums log-probs per
sequence within a row (`covenant_jax.train.preference`); no answer is padded to the longer one.

Overlength (the unit longer than seq_len): "truncate" cuts the same number of tokens from the
left of both sequences' prompts (at least one prompt token stays before the answer), "drop"
skips the pair; both counted. "split" cannot keep a pair together and is refused.

After packing (`to_pair_batch`): `segment_ids` 2k+1 / 2k+2 for the k-th pair of a row's
chosen / rejected sequence (attention never crosses), `positions` from `pos`, `pair_slot` k
(-1 on padding), `chosen` 1 / 0, and, when the reference log-probs were precomputed, `ref_logp`
per target as `loss_mask` is. The packer holds at most `pairs_per_row` pairs a row, the bound the
step's per-row sums are sized by.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from covenant_jax.data import formats, templates
from covenant_jax.data.formats import Completion, InvalidRow, Pair
from covenant_jax.errors import UserError

if TYPE_CHECKING:  # Imported where used: the preparation processes load this module, not Grain.
    import grain

UNIT_FIELDS = ("tokens", "weights", "sub", "pos")
REF_FIELD = "ref_logp"  # per token (its log-prob under the reference), with precomputed references
_PADDING = {"weights": False, "sub": 0, "pos": 0, REF_FIELD: 0.0, "unit": -1}


def pairs_per_row(seq_len: int, max_samples_per_row: int) -> int:
    """K, the most pairs a packed row holds: each pair is two samples, so half the sample bound
    (`data.max_samples_per_row`, which also sizes cudnn's per-row table), else as many as fit
    (a pair has at least 4 tokens: a prompt and an answer token per sequence)."""
    if max_samples_per_row:
        return max(max_samples_per_row // 2, 1)
    return max(seq_len // 4, 1)


def is_pair_data(sources: Sequence[Mapping]) -> bool:
    """Whether the sources are preference pairs; a mixture with other formats is refused."""
    kinds = {s.get("format", "messages") in formats.PAIR_FORMATS for s in sources}
    if len(kinds) > 1:
        raise UserError(
            "data.sources mixes preference pairs (format 'dpo') with other formats: "
            "train.objective='dpo' reads only pairs, 'sft' none"
        )
    return kinds == {True}


# ---- rows -> units ------------------------------------------------------------------------------


def encode_pairs(
    tokenizer, template: templates.ChatTemplate | None, pairs: list[Pair], train_on_eos: str = "turn"
) -> list[tuple | InvalidRow]:
    """Per pair (chosen ids, chosen trained, rejected ids, rejected trained), or its InvalidRow."""
    if template is None:
        items = [Completion(p.prompt, a) for p in pairs for a in (p.chosen, p.rejected)]
        encoded = templates.encode_completions(tokenizer, items)
        return [(*encoded[2 * i], *encoded[2 * i + 1]) for i in range(len(pairs))]
    rule = templates.MaskRule.create("assistant", ("assistant",), train_on_eos)
    out: list = [None] * len(pairs)
    rendered = []  # (pair index, text, spans) for its chosen, then its rejected sequence
    for i, pair in enumerate(pairs):
        try:
            both = [
                template.trained_spans(pair.prompt + answer, rule, answer_from=len(pair.prompt))
                for answer in (pair.chosen, pair.rejected)
            ]
        except InvalidRow as e:
            out[i] = e
            continue
        rendered += [(i, *both[0]), (i, *both[1])]
    encoded = templates._encode_batch(
        tokenizer, [t for _, t, _ in rendered], spans=[s for _, _, s in rendered]
    )
    for k in range(0, len(rendered), 2):
        out[rendered[k][0]] = (*encoded[k], *encoded[k + 1])
    return out


def pair_unit(encoded: tuple, seq_len: int, overlength: str) -> tuple[dict[str, np.ndarray], bool]:
    """(the pair's packing unit, whether its prompts were truncated); raises InvalidRow when the
    pair cannot be trained (an answer without a scored token, or too long for `overlength`)."""
    ids_c, trained_c, ids_r, trained_r = encoded
    for trained in (trained_c, trained_r):
        if not trained[1:].any():  # A sequence's first token is never a target.
            raise InvalidRow("no_trained_tokens", "an answer has no scored token")
    excess = len(ids_c) + len(ids_r) - seq_len
    cut = 0
    if excess > 0:
        if overlength == "drop":
            raise InvalidRow("overlength_dropped", f"{len(ids_c)} + {len(ids_r)} > {seq_len}")
        cut = -(-excess // 2)  # the same from both prompts, which are the same tokens
        room = min(int(np.argmax(trained_c)), int(np.argmax(trained_r))) - 1  # keep one prompt token
        if cut > room:
            raise InvalidRow(
                "overlength_dropped",
                f"the answers alone take {len(ids_c) + len(ids_r) - 2 * room} > {seq_len} tokens",
            )
    tokens = np.concatenate([ids_c[cut:], ids_r[cut:]]).astype(np.int32)
    weights = np.concatenate([trained_c[cut:], trained_r[cut:]]).astype(bool)
    return unit(tokens, weights, len(ids_c) - cut), cut > 0


def unit(tokens: np.ndarray, weights: np.ndarray, first: int) -> dict[str, np.ndarray]:
    """The packing unit of a pair's tokens and trained flags, its chosen sequence the `first`
    tokens: `sub` 1 / 2 and `pos` restarting at the rejected sequence."""
    n = len(tokens)
    sub = np.where(np.arange(n) < first, 1, 2).astype(np.int32)
    pos = np.concatenate([np.arange(first), np.arange(n - first)]).astype(np.int32)
    return {"tokens": tokens, "weights": weights, "sub": sub, "pos": pos}


def scored_tokens(pair: Mapping[str, np.ndarray]) -> int:
    """Targets the step scores: trained tokens that are not a sequence's first."""
    return int((pair["weights"] & (pair["pos"] > 0)).sum())


# ---- units -> batches ---------------------------------------------------------------------------


def pack_pairs(
    ds: grain.IterDataset,
    *,
    seq_len: int,
    rows: int,
    pad_id: int,
    bins: int,
    seed: int,
    shuffle_bins: bool,
    pairs_per_row: int,
    fields: Sequence[str] = UNIT_FIELDS,
) -> grain.IterDataset:
    """Grain first-fit packing of whole units (at most `pairs_per_row` a row), then batching;
    `fields`: the units' per-token fields (with `ref_logp` once precomputed)."""
    import grain  # pylint: disable=g-import-not-at-top

    packed = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={k: seq_len for k in fields},
        num_packing_bins=bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
        padding_struct={k: pad_id if k == "tokens" else _PADDING[k] for k in fields},
        max_sequences_per_bin=pairs_per_row,
    )
    return packed.batch(rows).map(functools.partial(to_pair_batch, rows=rows, pad_id=pad_id))


def to_pair_batch(packed: Mapping[str, np.ndarray], *, rows: int, pad_id: int) -> dict[str, np.ndarray]:
    """Packed units -> the DPO batch (see the module docstring); missing rows are padding."""
    from covenant_jax.data.pipeline import to_batch  # pylint: disable=g-import-not-at-top

    unit_BxL = packed["tokens_segment_ids"].astype(np.int32)
    real = unit_BxL > 0
    sub_BxL = packed["sub"].astype(np.int32)
    segments = np.where(real, 2 * (unit_BxL - 1) + sub_BxL, 0)
    batch = to_batch(
        {
            "tokens": packed["tokens"],
            "weights": packed["weights"],
            "tokens_segment_ids": segments,
            "tokens_positions": packed["pos"],
        },
        rows=len(unit_BxL),
        pad_id=pad_id,
    )
    batch["pair_slot"] = np.where(real, unit_BxL - 1, -1).astype(np.int32)
    batch["chosen"] = (real & (sub_BxL == 1)).astype(np.int32)
    if REF_FIELD in packed:
        ref_BxL = np.zeros(unit_BxL.shape, np.float32)
        ref_BxL[:, :-1] = packed[REF_FIELD][:, 1:]
        batch[REF_FIELD] = ref_BxL * batch["loss_mask"]
    if "unit" in packed:
        batch["unit"] = packed["unit"].astype(np.int32)
    missing = rows - len(unit_BxL)
    if missing:
        fill = {"tokens": pad_id, "targets": pad_id, "pair_slot": -1, "unit": -1}
        batch = {
            k: np.concatenate([v, np.full((missing,) + v.shape[1:], fill.get(k, 0), v.dtype)])
            for k, v in batch.items()
        }
    return batch
