"""Sliding-window perplexity against a naive full-logits reference (HF perplexity-guide loop)."""

import json
import math

import numpy as np
import pytest
from flax import nnx

from covenant_jax.eval import perplexity as ppl_lib
from covenant_jax.eval.common import with_rope, yarn_rope
from covenant_jax.errors import EvalInputError
from tests.eval.common import tiny_model, tiny_tokenizer

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    return tiny_model(VOCAB)


def documents(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


@nnx.jit
def _logits(model, tokens_BT):
    return model(tokens_BT)


def full_logits(model, tokens_BT):
    """Naive reference: whole [B, T, V] logits on the host (jitted once per model and shape)."""
    return np.asarray(_logits(model, np.asarray(tokens_BT, np.int32)))


# Every call uses these so the tests share a handful of compilations.
LENGTHS = [16, 32]
KW = dict(batch_size=3, chunk=5)


def reference(model, docs, length, stride):
    """HF guide: windows [begin, begin + L) every S; score tokens past the previous window's end."""
    windows, firsts, skipped = [], [], 0
    for doc in docs:
        if len(doc) < length:
            skipped += 1
            continue
        prev_end = 0
        for begin in range(0, len(doc), stride):
            end = begin + length
            if end > len(doc):
                break
            windows.append(doc[begin:end])
            firsts.append(max(1, length - (end - prev_end)))
            prev_end = end
    nll, count = 0.0, 0
    for window, first in zip(windows, firsts):
        logits_TV = full_logits(model, [window])[0].astype(np.float64)
        logp_TV = logits_TV - np.logaddexp.reduce(logits_TV, axis=-1, keepdims=True)
        for j in range(first, length):
            nll -= logp_TV[j - 1, window[j]]
            count += 1
    return nll, count, skipped


@pytest.mark.parametrize("stride", [None, 8])
def test_matches_naive_reference(model, stride):
    docs = documents([70, 40, 12, 33])  # the 12-token one is too short for both lengths
    # chunk 5 and batch 3: both padded, so padding must not leak into the sums
    result = ppl_lib.perplexity(model, docs, LENGTHS, stride=stride, **KW)
    for length, row in zip(LENGTHS, result.rows):
        nll, count, skipped = reference(model, docs, length, stride or length)
        assert row.tokens == count and row.skipped_documents == skipped
        assert row.nll_sum == pytest.approx(nll, rel=1e-5)
        assert row.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
        assert row.documents == len(docs) - skipped


def test_token_coverage():
    """Non-overlapping: L - 1 per window. Overlapping: every token after the first, up to the
    last full window's end, exactly once."""
    for n, length, stride in [(70, 16, 16), (70, 16, 5), (16, 16, 3), (100, 32, 1)]:
        plan = ppl_lib.window_plan(n, length, stride)
        scored = [s + j for s, first in plan for j in range(first, length)]
        if stride == length:
            assert len(scored) == len(plan) * (length - 1)
        else:
            assert sorted(scored) == list(range(1, plan[-1][0] + length))
        assert all(s + length <= n for s, _ in plan)
    assert ppl_lib.window_plan(15, 16, 16) == []
    with pytest.raises(EvalInputError):
        ppl_lib.window_plan(50, 16, 17)


def test_short_documents_skipped_and_common_documents(model):
    docs = documents([40, 20, 10])
    rows = ppl_lib.perplexity(model, docs, LENGTHS, **KW).by_length()
    assert (rows[16].documents, rows[16].skipped_documents) == (2, 1)
    assert (rows[32].documents, rows[32].skipped_documents) == (1, 2)
    assert rows[16].tokens == (2 + 1) * 15 and rows[32].tokens == 31
    common = ppl_lib.perplexity(model, docs, LENGTHS, common_documents=True, **KW).by_length()
    assert (common[16].documents, common[16].skipped_documents) == (1, 2)
    assert common[16].tokens == 2 * 15  # only the 40-token document: 2 windows of 16
    capped = ppl_lib.perplexity(model, docs, [16], max_windows_per_document=1, **KW).by_length()
    assert capped[16].windows == 2 and capped[16].tokens == 2 * 15


def test_a_length_no_document_reaches_is_an_error_before_computing(model):
    """(It used to be a NaN row and exit 0: a silent non-result.)"""
    with pytest.raises(EvalInputError, match="length 16: no document has 16 tokens; the longest has 12"):
        ppl_lib.perplexity(model, documents([5, 12]), [8, 16], **KW)


def test_result_table_and_json_round_trip(model):
    result = ppl_lib.perplexity(model, documents([40]), LENGTHS, stride=4, **KW)
    back = ppl_lib.PerplexityResult.from_dict(json.loads(result.to_json()))
    assert back.rows == result.rows
    lines = result.table().splitlines()
    assert len(lines) == 3
    for line, row in zip(lines[1:], result.rows):
        fields = line.split()
        assert int(fields[0]) == row.length and int(fields[1]) == min(4, row.length)
        assert float(fields[-1]) == pytest.approx(row.ppl, abs=1e-3)


def test_from_jsonl_tokenises_and_concatenates(model, tmp_path):
    tok = tiny_tokenizer()
    assert len(tok) <= VOCAB
    texts = ["The grass is green . " * 7, "The sky is blue . " * 3, "Here we go . " * 2]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    per_doc = ppl_lib.perplexity_from_jsonl(model, tok, path, [16], **KW)
    expected_docs = [tok(t)["input_ids"] for t in texts]
    expected = ppl_lib.perplexity(model, expected_docs, [16], **KW)
    assert per_doc.rows == expected.rows
    assert per_doc.rows[0].skipped_documents == 1  # "Here we go ." x2 + BOS = 9 tokens
    joined = ppl_lib.perplexity_from_jsonl(model, tok, path, [16], concatenate=True, **KW)
    picked = ppl_lib.perplexity_from_jsonl(
        model, tok, path, LENGTHS, max_documents=1, common_documents=True, **KW
    )
    assert picked.rows == ppl_lib.perplexity(model, expected_docs[:1], LENGTHS, **KW).rows
    assert picked.meta["rows_too_short"] == 2  # only the first row has 32 tokens
    assert joined.rows[0].documents == 1 and joined.meta["input_tokens"] == 1 + sum(
        len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts
    )


def test_with_rope_equals_model_built_with_that_rope(model):
    rope, max_pos = yarn_rope(model.config, 4.0)
    assert (max_pos, rope.original_max_position_embeddings) == (1024, 256)
    tokens = np.asarray(documents([16])[0], np.int32)[None]
    swapped = with_rope(model, rope, max_pos)
    built = tiny_model(cfg=model.config.with_rope(rope, max_pos))  # same seed: same params
    np.testing.assert_allclose(full_logits(swapped, tokens), full_logits(built, tokens), atol=1e-5)
    assert not np.allclose(full_logits(swapped, tokens), full_logits(model, tokens), atol=1e-3)
    assert swapped.config.max_position_embeddings == 1024 and model.config.rope.rope_type == "default"
