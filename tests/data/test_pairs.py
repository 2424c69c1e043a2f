"""Preference pairs (format "dpo"): rows -> pairs (strings, conversations, renamed fields,
system), masks on the answers only (checked against character spans the template's text puts
them at), bad rows skipped and counted by reason, overlength, and packing (a pair's two
sequences in one row, their own segments and positions, at most K pairs a row)."""

import json
import re

import numpy as np
import pytest

from covenant_jax.data import formats, pairs, pipeline, templates
from covenant_jax.errors import UserError
from tests.data import common

SEQ = 64


def _pair_row(i, n_prompt=3, n_chosen=3, n_rejected=2, **names):
    f = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", **names}
    return {
        f["prompt"]: common.words(i, n_prompt),
        f["chosen"]: common.words(i + 1, n_chosen),
        f["rejected"]: common.words(i + 2, n_rejected, "B"),
    }


def _chat_pair_row(i):
    """TRL's conversational form: a two-turn prompt (an assistant turn inside it, never scored)
    and answers of one or two assistant messages."""
    prompt = [
        {"role": "user", "content": common.words(i, 2)},
        {"role": "assistant", "content": common.words(i + 3, 2, "A")},
        {"role": "user", "content": common.words(i + 4, 2)},
    ]
    chosen = [{"role": "assistant", "content": common.words(i + 1, 3)}]
    rejected = [{"role": "assistant", "content": common.words(i + 2, 2, "B")}]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _build(sources, tokenizer=None, **kw):
    cfg = pipeline.default_config()
    cfg.update(dict(sources=sources, template="chatml", seq_len=SEQ, batch_size=4, epochs=1), **kw)
    return pipeline.build_pipeline(
        cfg, tokenizer or common.word_tokenizer(), process_index=0, process_count=1
    )


def _units(sources, tokenizer=None, **kw):
    """The packing units a source becomes (its train split, in row order)."""
    cfg = {**dict(sources=sources, template="chatml", seq_len=SEQ), **kw}
    train, _, report = common.source_samples(cfg, tokenizer or common.word_tokenizer())
    return train, report


# ---- masks against character spans --------------------------------------------------------------


def _answer_spans(text: str, answers: int) -> list[tuple[int, int]]:
    """Independently of the code under test: the last `answers` assistant turns' content and
    their <|im_end|> in a ChatML text (the prompt's own assistant turns are not scored)."""
    spans = [m.span(1) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.S)]
    return spans[-answers:]


@pytest.mark.parametrize("form", ["strings", "conversations"])
def test_chat_masks_cover_the_answers_and_their_end_of_turn_only(form):
    """BPE (tokens merge across spaces): each sequence's trained tokens are exactly the tokens
    overlapping the answer's characters and its closing <|im_end|>, never the prompt."""
    tok = common.bpe_tokenizer(corpus=("w1 w2 w3 w4 B A",))
    rows = [_pair_row(i) for i in range(6)] if form == "strings" else [_chat_pair_row(i) for i in range(6)]
    units, report = _units([dict(dataset=rows, format="dpo")], tok, seq_len=256)
    assert len(units) == 6 and not report.skipped and not report.truncated
    template = templates.ChatTemplate(tok, "chatml")
    fmt = formats.RowFormat.create("dpo")
    for row, unit in zip(rows, units):
        pair = fmt.to_example(row)
        for sub, answer in ((1, pair.chosen), (2, pair.rejected)):
            text = template.render(pair.prompt + answer)
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            expected = templates.tokens_in_spans(
                np.asarray(enc["offset_mapping"]), _answer_spans(text, len(answer))
            )
            seq = unit["sub"] == sub
            np.testing.assert_array_equal(unit["tokens"][seq], enc["input_ids"])
            np.testing.assert_array_equal(unit["weights"][seq], expected)
            np.testing.assert_array_equal(unit["pos"][seq], np.arange(seq.sum()))
            scored = "".join(text[s:e] for s, e in _answer_spans(text, len(answer)))
            assert scored == "".join(m["content"] + "<|im_end|>" for m in answer)


def test_multi_message_answers_score_every_answer_message():
    row = _chat_pair_row(0)
    row["chosen"] = [{"role": "assistant", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    (unit,), _ = _units([dict(dataset=[row], format="dpo", template="chatml")], role_order="any")
    tok = common.word_tokenizer()
    chosen = unit["tokens"][unit["sub"] == 1][unit["weights"][unit["sub"] == 1]]
    assert tok.decode(chosen) == "w1 w2 <|im_end|> w3 <|im_end|>"


def test_template_none_strings_are_prompt_then_answer_and_eos():
    """Without a template a pair is two Completions: prompt (BOS, not scored), answer + EOS."""
    tok = common.word_tokenizer()
    (unit,), _ = _units([dict(dataset=[_pair_row(0)], format="dpo", template="none")])
    for sub, key in ((1, "chosen"), (2, "rejected")):
        seq = unit["sub"] == sub
        prompt = tok(_pair_row(0)["prompt"])["input_ids"]
        answer = tok(_pair_row(0)[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        np.testing.assert_array_equal(unit["tokens"][seq], prompt + answer)
        np.testing.assert_array_equal(unit["weights"][seq], [False] * len(prompt) + [True] * len(answer))


def test_field_names_and_system_are_configurable():
    rows = [
        {**_pair_row(i, prompt="question", chosen="good", rejected="bad"), "sys": "be brief"}
        for i in range(3)
    ]
    fields = dict(prompt="question", chosen="good", rejected="bad", system="sys")
    units, _ = _units([dict(dataset=rows, format="dpo", fields=fields)])
    text = common.word_tokenizer().decode(units[0]["tokens"][units[0]["sub"] == 1])
    assert text.startswith("<|im_start|> system be brief <|im_end|>")


# ---- bad rows, overlength -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"prompt": "w1", "chosen": "w2", "rejected": "w2"}, "same_answers"),
        ({"prompt": "w1", "chosen": " ", "rejected": "w2"}, "empty_content"),
        ({"prompt": "w1", "chosen": "w2"}, "missing_field"),
        ({"prompt": "w1", "chosen": [], "rejected": "w2"}, "empty_content"),
        (
            {
                "prompt": [{"role": "user", "content": "w1"}],
                "chosen": [{"role": "user", "content": "w2"}],
                "rejected": "w3",
            },
            "role_order",
        ),
        ({"prompt": "w1", "chosen": 3, "rejected": "w2"}, "not_a_list"),
        ({"prompt": [{"role": "robot", "content": "w1"}], "chosen": "w2", "rejected": "w3"}, "unknown_role"),
    ],
)
def test_bad_rows_are_skipped_and_counted(row, reason):
    good = [_pair_row(i) for i in range(3)]
    units, report = _units([dict(dataset=good + [row], format="dpo")])
    assert len(units) == 3 and dict(report.skipped) == {reason: 1}


def test_a_field_no_row_has_is_an_error():
    with pytest.raises(UserError, match="field 'good' .*does not exist in any row"):
        _units([dict(dataset=[_pair_row(0)], format="dpo", fields=dict(chosen="good"))])


def test_overlength_truncates_the_prompt_from_the_left_or_drops_the_pair():
    long_prompt = _pair_row(0, n_prompt=30)
    rows = [long_prompt, _pair_row(1)]
    (cut, _), report = _units([dict(dataset=rows, format="dpo")], overlength="truncate")
    assert report.truncated == 1 and len(cut["tokens"]) <= SEQ and not report.skipped
    (whole, _), _ = _units([dict(dataset=rows, format="dpo")], seq_len=4 * SEQ)
    lost = {sub: (whole["sub"] == sub).sum() - (cut["sub"] == sub).sum() for sub in (1, 2)}
    assert lost[1] == lost[2] > 0  # the same prompt tokens from both sequences, from the left
    for sub in (1, 2):
        np.testing.assert_array_equal(
            cut["tokens"][cut["sub"] == sub], whole["tokens"][whole["sub"] == sub][lost[sub] :]
        )
        np.testing.assert_array_equal(
            cut["weights"][cut["sub"] == sub], whole["weights"][whole["sub"] == sub][lost[sub] :]
        )
        assert not cut["weights"][cut["sub"] == sub][0]  # a prompt token is left before the answer
    units, report = _units([dict(dataset=rows, format="dpo")], overlength="drop")
    assert len(units) == 1 and dict(report.skipped) == {"overlength_dropped": 1}
    huge_answer = _pair_row(2, n_chosen=60)
    units, report = _units([dict(dataset=[huge_answer, _pair_row(1)], format="dpo")], overlength="truncate")
    assert len(units) == 1 and dict(report.skipped) == {"overlength_dropped": 1}


def test_split_trainer_eval_and_mixtures_are_refused():
    with pytest.raises(UserError, match="'split' cannot keep a preference pair"):
        _build([dict(dataset=[_pair_row(0)], format="dpo")], overlength="split")
    with pytest.raises(UserError, match="eval_mode='trainer' is the SFT loss"):
        _build([dict(dataset=[_pair_row(0)], format="dpo")], eval_mode="trainer")
    with pytest.raises(UserError, match="mixes preference pairs"):
        _build([dict(dataset=[_pair_row(0)], format="dpo"), dict(dataset=[common.chat_row(0)])])


# ---- packing ------------------------------------------------------------------------------------


def test_packing_keeps_pairs_whole_in_their_own_segments():
    rows = [
        _pair_row(i, n_prompt=1 + i % 4, n_chosen=1 + i % 3, n_rejected=1 + (i * 2) % 5) for i in range(40)
    ]
    units, _ = _units([dict(dataset=rows, format="dpo")])
    data = _build([dict(dataset=rows, format="dpo")], max_samples_per_row=6)
    assert data.pairs
    k = pairs.pairs_per_row(SEQ, 6)
    seen = []
    for batch in data.train:
        for r in range(batch["tokens"].shape[0]):
            row = {key: v[r] for key, v in batch.items()}
            assert row["pair_slot"].max() < k
            for slot in range(row["pair_slot"].max() + 1):
                here = row["pair_slot"] == slot
                segs = np.unique(row["segment_ids"][here])
                np.testing.assert_array_equal(segs, [2 * slot + 1, 2 * slot + 2])
                chosen = here & (row["chosen"] == 1)
                assert (row["segment_ids"][chosen] == 2 * slot + 1).all()
                seqs = [np.flatnonzero(row["segment_ids"] == s) for s in segs]
                for idx in seqs:
                    np.testing.assert_array_equal(row["positions"][idx], np.arange(len(idx)))
                    assert row["loss_mask"][idx[-1]] == 0  # a target never crosses sequences
                seen.append(tuple(np.concatenate([row["tokens"][i] for i in seqs])))
            assert (row["loss_mask"][row["pair_slot"] < 0] == 0).all()
    assert sorted(seen) == sorted(tuple(u["tokens"]) for u in units)
