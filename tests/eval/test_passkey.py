"""Passkey prompts (length, depth, needle) and teacher-forced greedy scoring."""

import json

import numpy as np
import pytest
from flax import nnx

from covenant_jax.eval import passkey as pk
from covenant_jax.eval.common import encode
from covenant_jax.errors import EvalInputError
from tests.eval.common import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def max_sentence(tok):
    return max(len(encode(tok, " " + s)) for s in pk.FILLER)


@pytest.mark.parametrize("length", [80, 157, 400])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_length_depth_and_needle(tok, length, depth):
    p = pk.build_prompt(tok, length, depth, "40213")
    sentence = max_sentence(tok)
    assert abs(p.prompt_length - length) <= sentence // 2 + 1
    needle = encode(tok, " " + pk.NEEDLE.format(key="40213"))
    assert list(p.tokens[p.needle_start : p.needle_start + p.needle_length]) == needle
    question = encode(tok, " " + pk.QUESTION)
    assert list(p.tokens[p.prompt_length - len(question) : p.prompt_length]) == question
    assert (
        list(p.tokens[p.prompt_length :])
        == list(p.answer)
        == [int(tok.convert_tokens_to_ids(c)) for c in "40213"]
    )
    head = 1 + len(encode(tok, pk.TASK))  # BOS + task
    assert p.tokens[0] == tok.bos_token_id
    filler = p.prompt_length - head - len(needle) - len(question)
    assert p.needle_start - head == round(p.actual_depth * filler)
    assert abs(p.actual_depth - depth) <= sentence / filler
    if depth == 0.0:
        assert p.needle_start == head
    if depth == 1.0:
        assert p.needle_start + p.needle_length == p.prompt_length - len(question)
    # the needle occurs once; the key text appears only in the needle and the answer
    text = tok.decode(list(p.tokens))
    assert text.count("pass key is 4 0 2 1 3") == 2 and text.count("4 0 2 1 3") == 3


def test_too_short_or_bad_depth(tok):
    with pytest.raises(EvalInputError, match="too short"):
        pk.build_prompt(tok, 20, 0.5, "12345")
    with pytest.raises(EvalInputError, match="depth"):
        pk.build_prompt(tok, 200, 1.5, "12345")


def oracle(tokens_BT, positions_BA):
    """Always 'predicts' the key: reads the teacher-forced next token."""
    return np.take_along_axis(tokens_BT, positions_BA + 1, axis=1)


def last_digit_wrong(tokens_BT, positions_BA):
    out = oracle(tokens_BT, positions_BA).copy()
    out[:, -1] = (out[:, -1] + 1) % 100
    return out


def test_scoring_with_stub_models(tok):
    lengths, depths = [90, 150], [0.0, 0.5, 1.0]
    good = pk.passkey_eval(oracle, tok, lengths, depths, keys_per_cell=3, batch_size=4)
    assert len(good.samples) == 2 * 3 * 3
    assert all(s.correct and s.predicted == s.answer for s in good.samples)
    assert good.accuracy() == 1.0
    bad = pk.passkey_eval(last_digit_wrong, tok, lengths, depths, keys_per_cell=3, batch_size=4)
    assert bad.accuracy() == 0.0  # four of five digits right is still wrong
    for s in bad.samples:
        assert s.predicted[:-1] == s.answer[:-1] and s.predicted[-1] != s.answer[-1]
    zeros = pk.passkey_eval(lambda t, p: np.zeros(p.shape, np.int32), tok, lengths, depths)
    assert zeros.accuracy() == 0.0 and all(len(s.predicted) == 1 for s in zeros.samples)
    # same seed: same keys regardless of the predictor
    assert [s.key for s in good.samples] == [s.key for s in bad.samples]
    assert len({s.key for s in good.samples}) > 1 and all(len(s.key) == 5 for s in good.samples)


def test_accuracy_table_and_json(tok):
    def half(tokens_BT, positions_BA):  # right only when the key's first digit is even
        out = oracle(tokens_BT, positions_BA)
        first_digit = tok.convert_ids_to_tokens([int(t) for t in out[:, 0]])
        return np.where(np.array([d.isdigit() and int(d) % 2 == 0 for d in first_digit])[:, None], out, -1)

    result = pk.passkey_eval(half, tok, [90, 150], [0.0, 1.0], keys_per_cell=4)
    for s in result.samples:
        assert s.correct == (int(s.key[0]) % 2 == 0)
    for length in (90, 150):
        cell = [s.correct for s in result.samples if s.length == length and s.depth == 1.0]
        assert result.accuracy(length, 1.0) == np.mean(cell)
    back = pk.PasskeyResult.from_dict(json.loads(result.to_json()))
    assert back.samples == result.samples and back.table() == result.table()
    row = result.table().splitlines()[1].split()
    assert int(row[0]) == 90 and float(row[-1]) == pytest.approx(result.accuracy(90), abs=0.005)
    assert json.loads(result.to_json())["accuracy"]["150"]["1"] == result.accuracy(150, 1.0)


def test_model_predictor_is_argmax_of_full_logits(tok):
    model = tiny_model(128)
    prompts = [pk.build_prompt(tok, 100, d, k) for d, k in [(0.0, "11111"), (0.7, "98765")]]
    width = max(len(p.tokens) for p in prompts)
    tokens = np.zeros((2, width), np.int32)
    positions = np.zeros((2, 5), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p.tokens)] = p.tokens
        positions[b] = np.arange(p.prompt_length - 1, len(p.tokens) - 1)
    got = pk.model_predictor(model)(tokens, positions)
    full = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens)).argmax(-1)
    np.testing.assert_array_equal(got, np.take_along_axis(full, positions, axis=1))
    result = pk.passkey_eval(model, tok, [100], [0.0, 0.7], keys_per_cell=1, batch_size=2)
    for s in result.samples:
        assert s.correct == (s.predicted == s.answer)
    assert result.meta["rope"]["rope_type"] == "default"
