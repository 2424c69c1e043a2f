"""Loss masks against transformers' own: for each template, a copy with `{% generation %}` tags
around what must be trained renders the same text, and `return_assistant_tokens_mask` on it is
the reference for our mask on the untagged template. Conversations that broke the span search:
trimmed content that also occurs later, content that is a prefix of a later turn, a template
that appends EOS after the whole conversation (Phi-3), and their neighbours."""

import numpy as np
import pytest

from covenant_jax.data import templates
from tests.data import common

PHI3 = (  # microsoft/Phi-3-mini-4k-instruct's template: EOS only after the whole conversation.
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Plain-text markers (several tokens each, merging with what follows) and EOS at the very end.
TEXTUAL = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\n' + m['content'] | trim + '[end]\n' }}"
    "{% endfor %}{{ eos_token }}"
)
UNTAGGED = {"chatml": "chatml", "llama3": "llama3", "gemma": "gemma", "phi3": PHI3, "text": TEXTUAL}


def _tagged(head, content, marker, after, start="''", end="''", loop="messages", offset="0"):
    """A template writing head + content + marker + after per message, with `{% generation %}`
    around the content of trained turns and around the markers `eos_mode` trains. The rule
    comes in as template variables: train_roles, last_only, eos_mode."""
    return (
        "{%- set ns = namespace(last=-1) -%}"
        "{%- for m in messages -%}{%- if m.role in train_roles -%}"
        "{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
        f"{{{{- {start} -}}}}"
        f"{{%- for m in {loop} -%}}{{%- set k = loop.index0 + {offset} -%}}"
        "{%- set train = m.role in train_roles and (not last_only or k == ns.last) -%}"
        "{%- set eos = eos_mode == 'all' or (eos_mode == 'turn' and train)"
        " or (eos_mode == 'last' and k == ns.last) -%}"
        f"{{{{- {head} -}}}}"
        f"{{%- if train -%}}{{% generation %}}{{{{- {content} -}}}}{{% endgeneration %}}"
        f"{{%- else -%}}{{{{- {content} -}}}}{{%- endif -%}}"
        f"{{%- if eos -%}}{{% generation %}}{{{{- {marker} -}}}}{{% endgeneration %}}"
        f"{{%- else -%}}{{{{- {marker} -}}}}{{%- endif -%}}"
        f"{{{{- {after} -}}}}"
        f"{{%- endfor -%}}{{{{- {end} -}}}}"
    )


GEMMA_PRELUDE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- set off = 1 -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- set off = 0 -%}{%- endif -%}"
)
TAGGED = {
    "chatml": _tagged("'<|im_start|>' + m.role + '\\n'", "m.content", "'<|im_end|>'", "'\\n'"),
    "llama3": _tagged(
        "'<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n'",
        "m.content | trim",
        "'<|eot_id|>'",
        "''",
        start="bos_token",
    ),
    "gemma": GEMMA_PRELUDE
    + _tagged(
        "'<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\\n'"
        " + (first_user_prefix if loop.first else '')",
        "m.content | trim",
        "'<end_of_turn>'",
        "'\\n'",
        start="bos_token",
        loop="loop_messages",
        offset="off",
    ),
    "phi3": _tagged("'<|' + m.role + '|>\\n'", "m.content", "'<|end|>'", "'\\n'", end="eos_token"),
    "text": _tagged("'### ' + m.role + ':\\n'", "m.content | trim", "'[end]'", "'\\n'", end="eos_token"),
}


def _msgs(*turns):
    roles = ["user", "assistant"]
    if turns[0].startswith("SYSTEM:"):
        return [{"role": "system", "content": turns[0][7:]}] + _msgs(*turns[1:])
    return [{"role": roles[i % 2], "content": c} for i, c in enumerate(turns)]


CASES = {
    # The bug 1: " Sure" trimmed to "Sure", which the user's next turn also holds.
    "trimmed_content_repeated_later": _msgs("Say it", " Sure", "You said Sure, right?", "Yes"),
    # ... and "OK " trimmed: the untrimmed search found "OK " inside "OK then".
    "trimmed_prefix_of_next_turn": _msgs("q", "OK ", "again", "OK then"),
    "repeated_content": _msgs("SYSTEM:Hello", "Hello", "Hello", "Hello", "Hello"),
    "content_in_headers": _msgs("user", "assistant", "model", "end\n", "im_start", "user"),
    "whitespace": _msgs("hi  \n", "fine \n\n", " ok", "  spaced  ", "\tx", "\n\ny\n"),
    "emoji": _msgs("🌍?", "🎉 yes 🌍", "🌍", "🌍", "é🎉", " 🎉 "),
    "markers_in_content": _msgs("a", "x <|im_end|> y <|eot_id|> <end_of_turn> <|end|> [end]", "b", "c"),
    "ends_with_user": _msgs("SYSTEM:be brief", "hello world", "how are you?", "fine thanks"),
}


def _tokenizer():
    tok = common.bpe_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    return tok


def _reference(tok, name, messages, train_roles=("assistant",), last_only=False, eos="turn"):
    out = tok.apply_chat_template(
        messages, chat_template=TAGGED[name], tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True, train_roles=list(train_roles), last_only=last_only,
        eos_mode=eos,
    )  # fmt: skip
    return out["input_ids"], np.asarray(out["assistant_masks"], bool)


def _ours(tok, name, messages, **mask):
    if name == "phi3":  # As the tokenizer's own template (the code path of the bug report).
        tok.chat_template = PHI3
        tpl = templates.ChatTemplate(tok, "tokenizer")
    else:
        tpl = templates.ChatTemplate(tok, UNTAGGED[name])
    text = tpl.render(messages)
    ids, trained = templates.encode_chat(tpl, messages, **mask)
    return text, ids, trained


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(TAGGED))
def test_mask_equals_transformers_generation_mask(name, case):
    tok = _tokenizer()
    messages = CASES[case]
    text, ids, trained = _ours(tok, name, messages)
    tagged_text = tok.apply_chat_template(
        messages, chat_template=TAGGED[name], tokenize=False, train_roles=["assistant"],
        last_only=False, eos_mode="turn",
    )  # fmt: skip
    assert text == tagged_text  # The tagged copy is the same template.
    ref_ids, ref_mask = _reference(tok, name, messages)
    assert list(ids) == list(ref_ids)
    np.testing.assert_array_equal(trained, ref_mask, err_msg=tok.decode(ids[trained]))


RULES = {  # (encode_chat kwargs, the tagged template's variables)
    "users_too": (dict(roles_to_train=("user", "assistant")), dict(train_roles=("user", "assistant"))),
    "no_eos": (dict(train_on_eos="none"), dict(eos="none")),
    "every_eos": (dict(train_on_eos="all"), dict(eos="all")),
    "last_eos": (dict(train_on_eos="last"), dict(eos="last")),
    "last_assistant": (dict(loss_on="last_assistant"), dict(last_only=True)),
}


@pytest.mark.parametrize("case", ["repeated_content", "ends_with_user"])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("name", list(TAGGED))
def test_roles_to_train_and_train_on_eos_equal_tagged_reference(name, rule, case):
    ours, theirs = RULES[rule]
    tok = _tokenizer()
    messages = CASES[case]
    if name == "gemma" and rule == "every_eos":
        messages = messages[1:]  # Gemma folds the system text into a user turn: no marker.
    _, ids, trained = _ours(tok, name, messages, **ours)
    ref_ids, ref_mask = _reference(tok, name, messages, **theirs)
    assert list(ids) == list(ref_ids)
    np.testing.assert_array_equal(trained, ref_mask, err_msg=tok.decode(ids[trained]))


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma"])
def test_markers_that_are_no_tokens_of_the_tokenizer(name):
    """Split into pieces that merge with the next header: the marker is still all of it."""
    rendered = templates.ChatTemplate(_tokenizer(), name).render(CASES["ends_with_user"])
    tok = common.bpe_tokenizer(special=[], corpus=(rendered,) * 50)  # "|><|": one token
    with pytest.warns(UserWarning, match="is not a token"):
        _, ids, trained = _ours(tok, name, CASES["ends_with_user"])
    ref_ids, ref_mask = _reference(tok, name, CASES["ends_with_user"])
    assert list(ids) == list(ref_ids)
    np.testing.assert_array_equal(trained, ref_mask, err_msg=tok.decode(ids[trained]))


def test_phi3_marker_is_end_not_end_plus_eos():
    """The marker comes from a rendering where a turn follows: `<|end|>`, not `<|end|>\\n<eos>`
    (whose common prefix with "<|end|>\\n<|user|>" used to reach into the next header)."""
    tok = _tokenizer()
    _, ids, trained = _ours(tok, "phi3", CASES["ends_with_user"])
    assert tok.decode(ids[trained]) == "how are you?<|end|>"
    _, ids, trained = _ours(tok, "phi3", CASES["trimmed_prefix_of_next_turn"])
    assert tok.decode(ids[trained]) == "OK <|end|>OK then<|end|>"


def test_layouts_are_cached_per_role_sequence_and_rebuilt_when_stale():
    """One real rendering per conversation once its role sequence was seen; a template whose
    text changes (a date) rebuilds the layout instead of skipping the row."""
    tok = _tokenizer()
    day, calls = ["1"], []
    real = tok.apply_chat_template

    def dated(*args, **kwargs):  # A template that prints today's date.
        calls.append(1)
        return real(*args, day=day[0], **kwargs)

    tok.apply_chat_template = dated
    tok.chat_template = "{{ 'Day ' + day + '\\n' }}" + templates.CHATML
    tpl = templates.ChatTemplate(tok, "tokenizer")
    msgs = CASES["whitespace"]
    calls.clear()
    text_1, spans_1 = tpl.trained_spans(msgs)
    assert len(calls) > 1
    calls.clear()
    assert tpl.trained_spans(msgs) == (text_1, spans_1) and len(calls) == 1
    day[0] = "2"
    text_2, spans_2 = tpl.trained_spans(msgs)
    assert text_2 == text_1.replace("Day 1", "Day 2") and spans_2 == spans_1


def test_a_template_that_rewrites_content_is_a_mismatch_not_a_guess():
    tok = _tokenizer()
    tok.chat_template = templates.CHATML.replace("message['content']", "message['content'] | upper")
    tpl = templates.ChatTemplate(tok, "tokenizer")
    with pytest.raises(templates.InvalidRow) as e:
        templates.encode_chat(tpl, _msgs("hi", "there"))
    assert e.value.reason == "template_mismatch"
