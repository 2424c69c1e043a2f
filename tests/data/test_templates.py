"""Loss masks: exactly each assistant content plus its end-of-turn marker is trained, for every
template and every chat format, checked against spans found independently by regex."""

import numpy as np
import pytest

from covenant_jax.data import formats, templates
from tests.data import common

TEMPLATES = ["chatml", "llama3", "gemma", "tokenizer"]

ROWS = {  # One conversation per format, with system text, two assistant turns where possible.
    "messages": {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "w1 w2 w3"},
            {"role": "user", "content": "w4"},
            {"role": "assistant", "content": "w5 assistant w6"},
        ]
    },
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "hello"},
            {"from": "gpt", "value": "model w7"},
            {"from": "human", "value": "w8 w9"},
            {"from": "gpt", "value": "w10"},
        ]
    },
    "instruct": {
        "system": "be brief",
        "instruction": "w11 w12",
        "input": "w13",
        "output": "w14 w15",
    },
    "prompt_completion": {"prompt": "hello w16", "completion": "w17 user w18"},
}


def _trained_tokens(template_name, fmt, loss_on="assistant", tok=None):
    tok = tok or common.word_tokenizer(bos=common.BOS[template_name])
    messages = formats.RowFormat.create(fmt).to_example(ROWS[fmt])
    tpl = templates.ChatTemplate(tok, template_name)
    ids, trained = templates.encode_chat(tpl, messages, loss_on)
    text = tpl.render(messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(ids) == enc["input_ids"]
    return messages, text, np.asarray(enc["offset_mapping"]), trained


def _overlapping(offsets, spans):
    return np.array([any(s < se and e > ss for ss, se in spans) for s, e in offsets])


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("template_name", TEMPLATES)
def test_assistant_content_and_end_of_turn_trained(template_name, fmt):
    messages, text, offsets, trained = _trained_tokens(template_name, fmt)
    spans = common.expected_spans(template_name, text)
    assistants = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(spans) == len(assistants)
    for (s, e), content in zip(spans, assistants):  # The regex spans are content + marker.
        assert text[s:e].startswith(content.strip())
    np.testing.assert_array_equal(trained, _overlapping(offsets, spans))
    tok = common.word_tokenizer(bos=common.BOS[template_name])
    eot = {"tokenizer": "<eos>", **templates.END_OF_TURN}[template_name]
    want = [
        t
        for c in assistants
        for t in tok(c, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(eot)]
    ]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert [i for i, t in zip(ids, trained) if t] == want


@pytest.mark.parametrize("template_name", TEMPLATES)
def test_last_assistant_and_all(template_name):
    messages, text, offsets, trained = _trained_tokens(template_name, "messages", "last_assistant")
    last = common.expected_spans(template_name, text)[-1:]
    np.testing.assert_array_equal(trained, _overlapping(offsets, last))
    _, _, _, everything = _trained_tokens(template_name, "messages", "all")
    assert everything.all()


def test_gemma_folds_system_into_first_user_turn():
    tok = common.word_tokenizer(bos="<bos>")
    messages = formats.RowFormat.create("messages").to_example(ROWS["messages"])
    text = templates.ChatTemplate(tok, "gemma").render(messages)
    assert text.startswith(
        "<bos><start_of_turn>user\nbe brief\n\nhello world<end_of_turn>\n"
        "<start_of_turn>model\nw1 w2 w3<end_of_turn>\n"
    )
    assert "system" not in text


def test_named_template_renders_exact_text():
    tok = common.word_tokenizer(bos="<|begin_of_text|>")
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": " w1 "}]
    assert templates.ChatTemplate(tok, "llama3").render(msgs) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nw1<|eot_id|>"
    )
    assert templates.ChatTemplate(tok, "chatml").render(msgs, add_generation_prompt=False) == (
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n w1 <|im_end|>\n"
    )


@pytest.mark.parametrize("template_name", ["chatml", "llama3", "gemma"])
def test_byte_level_bpe_trains_content_and_marker_only(template_name):
    """Merging BPE and multi-byte characters: offsets are still exact."""
    tok = common.bpe_tokenizer()
    msgs = [
        {"role": "system", "content": "sé"},
        {"role": "user", "content": "héllo 🌍"},
        {"role": "assistant", "content": "how are you, wörld 🌍? fine thanks."},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "日本語 the answer"},
    ]
    ids, trained = templates.encode_chat(templates.ChatTemplate(tok, template_name), msgs)
    eot = templates.END_OF_TURN[template_name]
    assert tok.decode(ids[trained]) == f"how are you, wörld 🌍? fine thanks.{eot}日本語 the answer{eot}"


def test_template_errors():
    tok = common.word_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="no chat_template"):
        templates.ChatTemplate(tok, "tokenizer")
    with pytest.raises(ValueError, match="Unknown chat template"):
        templates.ChatTemplate(tok, "vicuna")


def test_text_is_bos_text_eos_all_trained():
    tok = common.word_tokenizer()
    ids, trained = templates.encode_text(tok, "hello world")
    assert tok.convert_ids_to_tokens(list(ids)) == ["<bos>", "hello", "world", "<eos>"]
    assert trained.all()


def test_named_template_warns_when_its_marker_is_not_a_token():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>")),
        unk_token="<unk>",
    )
    with pytest.warns(UserWarning, match="<end_of_turn> is not a token"):
        templates.ChatTemplate(tok, "gemma")
