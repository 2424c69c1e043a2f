"""The Grain pipeline: packing invariants, length policy, resumable state, mixing, splits."""

import collections
import itertools

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from covenant_jax.data import pipeline, templates
from tests.data import common

SEQ = 32
KEYS = {
    "tokens": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "segment_ids": np.int32,
    "positions": np.int32,
}


def _rows(n, tag="", start=0):
    return [
        common.chat_row(i, n_user=1 + i % 5, n_asst=1 + (i * 3) % 7, tag=tag) for i in range(start, start + n)
    ]


def _build(sources, process_index=0, process_count=1, **kw):
    cfg = pipeline.default_config()
    cfg.update(dict(sources=sources, template="chatml", seq_len=SEQ, batch_size=4, epochs=1), **kw)
    return pipeline.build_pipeline(
        cfg, common.word_tokenizer(), process_index=process_index, process_count=process_count
    )


def _samples(batches):
    """Unpacks batches into per-sample (tokens, trained-target flags) and checks invariants."""
    out = []
    for b in batches:
        for row in range(b["tokens"].shape[0]):
            out += _unpack_row({k: v[row] for k, v in b.items()})
    return out


def _unpack_row(r):
    seg, pos = r["segment_ids"], r["positions"]
    n_real = int((seg > 0).sum())
    assert (seg[:n_real] > 0).all() and (seg[n_real:] == 0).all(), "padding only at the end"
    assert (r["loss_mask"][n_real:] == 0).all() and (r["tokens"][n_real:] == 0).all()
    samples = []
    for sid in range(1, int(seg.max(initial=0)) + 1):
        idx = np.flatnonzero(seg == sid)
        assert len(idx) and (np.diff(idx) == 1).all(), "segments are contiguous and 1, 2, ..."
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
        toks = r["tokens"][idx]
        np.testing.assert_array_equal(r["targets"][idx[:-1]], toks[1:])
        assert r["loss_mask"][idx[-1]] == 0, "no target across a sample boundary"
        samples.append((tuple(toks.tolist()), tuple(r["loss_mask"][idx[:-1]].tolist())))
    return samples


def _expected(rows, seq_len=SEQ):
    tpl = templates.ChatTemplate(common.word_tokenizer(), "chatml")
    out = []
    for r in rows:
        ids, trained = templates.encode_chat(tpl, r["messages"])
        ids, trained = ids[:seq_len], trained[:seq_len]
        out.append((tuple(ids.tolist()), tuple(trained[1:].astype(float).tolist())))
    return out


def test_packed_batches_are_exactly_the_samples():
    rows = _rows(30)
    batches = list(_build([{"dataset": rows}]).train)
    for b in batches:
        assert set(b) == set(KEYS)
        for k, dtype in KEYS.items():
            assert b[k].dtype == dtype and b[k].shape == (4, SEQ)
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 30
    assert any((b["segment_ids"].max(axis=1) > 1).any() for b in batches), "rows really packed"
    assert collections.Counter(_samples(batches)) == collections.Counter(_expected(rows))


def test_epochs_repeat_with_a_new_order():
    rows = _rows(12)
    data = _build([{"dataset": rows}], epochs=2, packing_bins=1, batch_size=1)
    got = [s[0] for s in _samples(data.train)]
    assert collections.Counter(got) == collections.Counter([e[0] for e in _expected(rows)] * 2)
    assert got[:12] != got[12:]


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlength_policy_is_counted(policy):
    rows = _rows(6) + [common.chat_row(100, 10, 30), common.chat_row(101, 40, 3)]
    data = _build([{"dataset": rows}], overlength=policy)
    s = data.report.sources[0]
    samples = _samples(data.train)
    if policy == "truncate":
        # The second long row keeps no assistant token within SEQ: skipped, not truncated.
        assert s.truncated == 1 and s.train == 7 and s.skipped == {"no_trained_tokens": 1}
        assert sum(len(t) == SEQ for t, _ in samples) == 1
    else:
        assert s.truncated == 0 and s.train == 6 and s.skipped["overlength_dropped"] == 2
    assert len(samples) == s.train


def test_iterator_state_round_trip_and_orbax(tmp_path):
    data = _build([{"dataset": _rows(40)}, {"dataset": _rows(20, "A")}], epochs=0, packing_bins=8)
    it = iter(data.train)
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(6)]

    fresh = iter(data.train)
    fresh.set_state(state)
    _assert_same(want, [next(fresh) for _ in range(6)])

    it = iter(data.train)
    for _ in range(5):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        restored = iter(data.train)
        mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _assert_same(want, [next(restored) for _ in range(6)])


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k])


def test_mixture_weights_are_respected():
    tok = common.word_tokenizer()
    a_id, b_id = tok.convert_tokens_to_ids(["A", "B"])
    data = _build(
        [{"dataset": _rows(10, "A"), "weight": 3.0}, {"dataset": _rows(50, "B"), "weight": 1.0}],
        epochs=0,
    )
    counts = collections.Counter()
    for toks, _ in _samples(itertools.islice(data.train, 60)):
        counts[("A" if a_id in toks else "B") if (a_id in toks) != (b_id in toks) else "?"] += 1
    assert counts["?"] == 0
    share = counts["A"] / (counts["A"] + counts["B"])
    assert abs(share - 0.75) < 0.05, counts


def test_eval_split_is_disjoint_deterministic_and_complete():
    rows = _rows(40)
    data = _build([{"dataset": rows}], eval_fraction=0.25)
    assert (data.report.sources[0].train, data.report.sources[0].eval) == (30, 10)
    train = [s[0] for s in _samples(data.train)]
    evals = [s[0] for s in _samples(data.eval)]
    assert not set(train) & set(evals)
    assert collections.Counter(train + evals) == collections.Counter(e[0] for e in _expected(rows))
    again = [s[0] for s in _samples(_build([{"dataset": rows}], eval_fraction=0.25).eval)]
    assert again == evals
    by_count = _build([{"dataset": rows}], eval_count=7)
    assert (by_count.report.sources[0].train, by_count.report.sources[0].eval) == (33, 7)
    with pytest.raises(ValueError, match="no training rows"):
        _build([{"dataset": rows}], eval_count=40)


def test_processes_get_disjoint_shards_covering_the_data():
    rows = _rows(40)
    shards = [_build([{"dataset": rows}], i, 2) for i in range(2)]
    assert all(s.rows_per_process == 2 for s in shards)
    got = [[s[0] for s in _samples(d.train)] for d in shards]
    assert collections.Counter(got[0] + got[1]) == collections.Counter(e[0] for e in _expected(rows))
    assert len(got[0]) == len(got[1]) == 20
    with pytest.raises(ValueError, match="not divisible"):
        _build([{"dataset": rows}], 0, 3)


def test_text_source_trains_every_token_and_mixes_with_chat():
    docs = [{"body": common.words(i, 5 + i % 9)} for i in range(8)]
    chat = _rows(4)
    data = _build([{"dataset": docs, "format": "text", "fields": {"text": "body"}}, {"dataset": chat}])
    samples = _samples(data.train)
    text_samples = [s for s in samples if s[0][0] == 2 and s[0][-1] == 3]
    # One "epoch" of the mixture = 12 draws, half from each source at equal weights.
    assert len(text_samples) == 6 and len(samples) == 12
    for _, mask in text_samples:
        assert all(m == 1.0 for m in mask)
    assert all(0.0 in mask for toks, mask in samples if (toks, mask) not in text_samples)


def test_text_only_source_needs_no_chat_template():
    tok = common.word_tokenizer(chat_template=None)
    cfg = dict(
        sources=[{"dataset": [{"text": "hello world"}] * 3, "format": "text"}],
        seq_len=8,
        batch_size=1,
        epochs=1,
    )
    data = pipeline.build_pipeline(cfg, tok, process_index=0, process_count=1)
    samples = _samples(data.train)
    ids = tuple(tok.convert_tokens_to_ids(["<bos>", "hello", "world", "<eos>"]))
    assert samples == [(ids, (1.0, 1.0, 1.0))] * 3


def test_config_dict_and_errors():
    cfg = ml_collections.ConfigDict(
        dict(
            sources=[dict(dataset=_rows(5), format="messages", weight=1.0)],
            template="chatml",
            seq_len=SEQ,
            batch_size=2,
        )
    )
    data = pipeline.build_pipeline(cfg, common.word_tokenizer(), process_index=0, process_count=1)
    assert next(iter(data.train))["tokens"].shape == (2, SEQ)
    assert data.eval is None
    with pytest.raises(ValueError, match="Unknown data config key"):
        _build([{"dataset": _rows(5)}], seq_length=8)
    with pytest.raises(ValueError, match="overlength"):
        _build([{"dataset": _rows(5)}], overlength="wrap")
    with pytest.raises(ValueError, match=r"sources\[0\]: unknown key.*wieght"):
        _build([{"dataset": _rows(5), "wieght": 2.0}])


def _text_build(docs, **kw):
    return _build([{"dataset": [{"text": d} for d in docs], "format": "text"}], **kw)


def test_split_cuts_a_long_document_into_consecutive_pieces():
    tok = common.word_tokenizer()
    long_doc = common.words(1, 100)  # 102 tokens with <bos>/<eos>: pieces 32, 32, 32, 6.
    short = [common.words(200 + i, 5 + i) for i in range(3)]
    data = _text_build([long_doc] + short, overlength="split", batch_size=2)
    whole = templates.encode_text(tok, long_doc)[0].tolist()
    assert len(whole) == 102
    pieces = [tuple(whole[s : s + SEQ]) for s in range(0, len(whole), SEQ)]
    assert len(pieces) == -(-len(whole) // SEQ) == 4
    assert [t for p in pieces for t in p] == whole and max(map(len, pieces)) <= SEQ
    samples = _samples(data.train)  # Also checks positions, segments, targets per sample.
    want = pieces + [tuple(templates.encode_text(tok, d)[0].tolist()) for d in short]
    assert collections.Counter(t for t, _ in samples) == collections.Counter(want)
    assert all(mask and all(m == 1.0 for m in mask) for _, mask in samples), "all trained"
    s = data.report.sources[0]
    assert (s.split, s.pieces, s.pieces_dropped, s.train, s.truncated) == (1, 4, 0, 7, 0)
    assert s.tokens == sum(map(len, want)) and "split 1 into 4 pieces" in str(s)


def test_split_drops_and_counts_pieces_without_a_target():
    tok = common.word_tokenizer()
    doc = common.words(3, SEQ - 1)  # SEQ + 1 tokens: a piece of SEQ and one of a single token.
    data = _text_build([doc, common.words(9, 4)], overlength="split")
    s = data.report.sources[0]
    assert (s.split, s.pieces, s.pieces_dropped, s.train) == (1, 1, 1, 2)
    first = tuple(templates.encode_text(tok, doc)[0][:SEQ].tolist())
    assert first in [t for t, _ in _samples(data.train)]


def test_split_chat_rows_keep_each_pieces_trained_mask():
    long_user = common.chat_row(100, n_user=70, n_asst=5)
    rows = _rows(5) + [long_user]
    data = _build([{"dataset": rows}], overlength="split")
    tpl = templates.ChatTemplate(common.word_tokenizer(), "chatml")
    ids, trained = templates.encode_chat(tpl, long_user["messages"])
    pieces = [(ids[s : s + SEQ], trained[s : s + SEQ]) for s in range(0, len(ids), SEQ)]
    kept = [(tuple(i.tolist()), tuple(t[1:].astype(float).tolist())) for i, t in pieces if t[1:].any()]
    assert 0 < len(kept) < len(pieces)  # The user-only pieces are dropped.
    s = data.report.sources[0]
    assert (s.split, s.pieces, s.pieces_dropped) == (1, len(kept), len(pieces) - len(kept))
    assert collections.Counter(_samples(data.train)) == collections.Counter(_expected(_rows(5)) + kept)


@pytest.mark.parametrize("make", [common.bpe_tokenizer, common.word_tokenizer])
def test_long_text_is_tokenised_in_exact_chunks(make, monkeypatch):
    tok = make()
    text = (
        " ".join(
            f"hello world,  how are you?\n\nfine thanks {i}. the answer is forty two w{i % 300}"
            for i in range(60)
        )
        + " héllo  wörld 日本語"
    )
    whole = templates.encode_texts(tok, [text], chunk_chars=10**9)[0][0]
    parts = templates._cut_text(tok, text, 200)  # pylint: disable=protected-access
    assert len(parts) > 10 and "".join(parts) == text
    calls = []
    real = templates._encode_batch  # pylint: disable=protected-access
    monkeypatch.setattr(templates, "_encode_batch", lambda t, x, **k: calls.append(x) or real(t, x, **k))
    chunked, trained = templates.encode_texts(tok, [text, "hello"], chunk_chars=200)[0]
    assert len(calls[0]) > 10, "the pieces were encoded as a batch"
    np.testing.assert_array_equal(chunked, whole)
    assert trained.all() and chunked[0] == tok.bos_token_id and chunked[-1] == tok.eos_token_id


def _samples_per_row(batches):
    return [int(row.max(initial=0)) for b in batches for row in b["segment_ids"]]


def test_max_samples_per_row_caps_the_worst_case_and_loses_no_sample():
    """Three-token samples (<bos> word <eos>) would put seq_len // 3 of them in one row, past
    the cudnn backend's bound; with data.max_samples_per_row every row holds at most that many,
    and every sample still arrives exactly once."""
    tok = common.word_tokenizer()
    docs = [common.words(i, 1 + i % 2) for i in range(120)]  # 3 or 4 tokens each
    uncapped = _text_build(docs, seq_len=64, batch_size=2)
    assert max(_samples_per_row(uncapped.train)) > 16
    capped = _text_build(docs, seq_len=64, batch_size=2, max_samples_per_row=5)
    per_row = _samples_per_row(capped.train)
    assert max(per_row) == 5 and sum(per_row) == len(docs)
    want = [tuple(templates.encode_text(tok, d)[0].tolist()) for d in docs]
    assert collections.Counter(t for t, _ in _samples(capped.train)) == collections.Counter(want)


def test_max_samples_per_row_must_not_be_negative():
    with pytest.raises(ValueError, match="data.max_samples_per_row=-1"):
        _build([{"dataset": _rows(5)}], max_samples_per_row=-1)
