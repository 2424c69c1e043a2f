"""G.O.D's dataset specs (rayonlabs/G.O.D core/models/utility_models.py), mapped to sources as the
README says, give exactly the text axolotl's rule gives for that spec: expected strings written
by hand from the rule (axolotl prompt_strategies/user_defined.py + alpaca_w_system.py for
instruct, prompt_tokenizers._tokenize for tokenising, chat_template for chat)."""

import json

import numpy as np
import pytest
from tokenizers import processors

from covenant_jax.data import formats, pipeline, templates
from tests.data import common

BOM = b"\xef\xbb\xbf"


def _tokenizer():
    """Byte-level BPE whose own encoding adds BOS (as Llama's and Gemma's do), so axolotl's
    "strip the completion's BOS" step is visible."""
    tok = common.bpe_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    return tok


def _samples(cfg, tok):
    data = pipeline.build_pipeline(
        dict(cfg, seq_len=256, batch_size=1, epochs=1), tok, process_index=0, process_count=1
    )
    rows = [b for b in data.train]
    # Each batch row holds one packed sample or more; unpack by segment.
    out = []
    for b in rows:
        for seg in sorted(set(b["segment_ids"][0]) - {0}):
            at = b["segment_ids"][0] == seg
            ids = b["tokens"][0][at]
            trained = np.concatenate([[False], b["loss_mask"][0][at][:-1] > 0])
            out.append((ids, trained))
    return data.report, out


def _decode(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=False)


# A G.O.D InstructTextDatasetType with custom column names and every format string.
INSTRUCT_SPEC = dict(
    field_system="sys", field_instruction="question", field_input="context",
    field_output="answer", format="### Q:\n{instruction}\n### Context:\n{input}\n### A:\n",
    no_input_format="### Q:\n{instruction}\n### A:\n", system_format="<<{system}>>\n",
    system_prompt="You are terse.",
)  # fmt: skip


def instruct_source(path, spec):
    """The README's mapping of a G.O.D instruct task with field_output (axolotl format: custom)."""
    fields = {"instruction": spec["field_instruction"], "output": spec["field_output"]}
    fields.update({k: spec[f"field_{k}"] for k in ("system", "input") if spec.get(f"field_{k}")})
    strings = ("format", "no_input_format", "system_format", "system_prompt")
    return dict(
        path=str(path), format="instruct", template="none", fields=fields,
        prompt_format={k: spec.get(k) for k in strings},
    )  # fmt: skip


def test_god_instruct_spec_from_csv_renders_axolotls_text(tmp_path):
    (tmp_path / "task.csv").write_bytes(
        BOM + b"sys,question,context,answer\n"
        b"Be kind.,What is 2+2?,math,4\n"
        b',"Name a color",,"Blue, or red."\n'  # Empty system and input cells.
    )
    (tmp_path / "task.jsonl").write_text(json.dumps({"question": "Hi", "answer": "Hello"}))
    other_task = {k: v for k, v in INSTRUCT_SPEC.items() if k not in ("field_system", "field_input")}
    tok = _tokenizer()
    report, samples = _samples(
        dict(sources=[
            instruct_source(tmp_path / "task.csv", INSTRUCT_SPEC),
            instruct_source(tmp_path / "task.jsonl", other_task),
        ]),
        tok,
    )  # fmt: skip
    assert [s.train for s in report.sources] == [2, 1] and not report.skipped
    want = {  # prompt, completion: axolotl's rule for each row, by hand.
        ("<<Be kind.>>\n### Q:\nWhat is 2+2?\n### Context:\nmath\n### A:\n", "4"),
        ("### Q:\nName a color\n### A:\n", "Blue, or red."),  # A system cell exists: no prompt.
        ("<<You are terse.>>\n### Q:\nHi\n### A:\n", "Hello"),  # No system field: system_prompt.
    }
    got = set()
    for ids, trained in samples:
        assert trained.any() and not trained[: np.argmax(trained)].any()  # Prompt, then answer.
        start = int(np.argmax(trained))
        prompt, answer = ids[:start], ids[start:]
        # Each part tokenised on its own with the tokenizer's specials; the answer's BOS dropped.
        assert prompt[0] == tok.bos_token_id and answer[-1] == tok.eos_token_id
        text_p, text_a = _decode(tok, prompt[1:]), _decode(tok, answer[:-1])
        assert list(prompt) == tok(text_p)["input_ids"]
        assert list(answer) == tok(text_a)["input_ids"][1:] + [tok.eos_token_id]
        got.add((text_p, text_a))
    assert got == want


def test_god_instruct_spec_with_a_chat_template_formats_the_user_turn():
    fmt = formats.RowFormat.create(
        "instruct", {"system": "sys", "instruction": "question", "input": "context",
                     "output": "answer"},
        prompt_format={k: INSTRUCT_SPEC[k] for k in ("format", "no_input_format",
                                                      "system_format", "system_prompt")},
    )  # fmt: skip
    row = {"sys": "Be kind.", "question": "What is 2+2?", "context": "math", "answer": "4"}
    tpl = templates.ChatTemplate(_tokenizer(), "chatml")
    assert tpl.render(fmt.to_example(row)) == (
        "<|im_start|>system\n<<Be kind.>>\n<|im_end|>\n"
        "<|im_start|>user\n### Q:\nWhat is 2+2?\n### Context:\nmath\n### A:\n<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )


def test_god_instruct_without_output_is_axolotl_completion():
    """G.O.D maps an instruct task without field_output to axolotl `type: completion`: the
    tokenizer's own encoding of the text (BOS here) + EOS, every token trained."""
    tok = _tokenizer()
    example = formats.RowFormat.create("completion", {"text": "question"}).to_example(
        {"question": "Once upon a time"}
    )
    ((ids, trained),) = templates.encode_examples(tok, None, [example])
    assert list(ids) == tok("Once upon a time")["input_ids"] + [tok.eos_token_id]
    assert trained.all()


# A G.O.D ChatTemplateDatasetType with custom names (axolotl type: chat_template).
CHAT_SPEC = dict(
    chat_template="chatml", chat_column="dialogue", chat_role_field="speaker",
    chat_content_field="text", chat_user_reference="customer", chat_assistant_reference="agent",
)  # fmt: skip


def chat_source(path, spec):
    """The README's mapping of a G.O.D chat task."""
    return dict(
        path=str(path), format="sharegpt", template=spec["chat_template"],
        fields=dict(messages=spec["chat_column"], role=spec["chat_role_field"],
                    content=spec["chat_content_field"]),
        role_map={spec["chat_user_reference"]: "user",
                  spec["chat_assistant_reference"]: "assistant"},
    )  # fmt: skip


def test_god_chat_spec_from_json_renders_chatml(tmp_path):
    turns = [("customer", "Hi there"), ("agent", "Hello! How can I help?"),
             ("customer", "Nothing."), ("agent", " OK. ")]  # fmt: skip
    # axolotl's chat_template takes the row's `system` column as the system turn.
    row = {"dialogue": [{"speaker": s, "text": t} for s, t in turns], "system": "Be nice."}
    (tmp_path / "task.json").write_bytes(BOM + json.dumps([row]).encode())
    tok = _tokenizer()
    source = chat_source(tmp_path / "task.json", CHAT_SPEC)
    report, [(ids, trained)] = _samples(dict(sources=[source]), tok)
    assert report.sources[0].train == 1
    assert _decode(tok, ids) == (
        "<|im_start|>system\nBe nice.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nNothing.<|im_end|>\n"
        "<|im_start|>assistant\n OK. <|im_end|>\n"
    )
    assert _decode(tok, ids[trained]) == "Hello! How can I help?<|im_end|> OK. <|im_end|>"


def test_custom_jinja_template_from_the_recipe():
    jinja = (
        "{% for m in messages %}{{ '[' + m['role'] + ']: ' + m['content'] | trim + '</turn>\\n' }}"
        "{% endfor %}"
    )
    tok = _tokenizer()
    _, [(ids, trained)] = _samples(
        dict(sources=[{"dataset": [{"messages": [{"role": "user", "content": "hello"},
                                                 {"role": "assistant", "content": " fine "}]}]}],
             template=jinja),
        tok,
    )  # fmt: skip
    assert _decode(tok, ids) == "[user]: hello</turn>\n[assistant]: fine</turn>\n"
    assert _decode(tok, ids[trained]) == " fine</turn>"  # "Ġfine" overlaps the content.
    with pytest.raises(ValueError, match="chat template 'custom': .*unexpected"):
        templates.ChatTemplate(tok, "{% for m in messages %}{{ m['content'] }}{% endfor")


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(format="{instruction} {output}"), r"placeholder \{output\} is not one of"),
        (dict(no_input_format="{instruction} {input}"), r"\{input\} is not one of \{instruction\}"),
        (dict(format="{system}: {instruction}"), r"\{system\} is not one of"),
        (dict(format="{instruction"), "write a literal brace"),
        (dict(fromat="{instruction}"), r"no key\(s\) \['fromat'\]"),
        (dict(system_prompt=3), "must be a string"),
    ],
)
def test_bad_format_strings_are_refused_before_reading(spec, message):
    with pytest.raises(ValueError, match=message):
        formats.RowFormat.create("instruct", prompt_format=spec)


def test_template_none_is_for_instruct_only_and_needs_no_chat_template():
    with pytest.raises(ValueError, match="format 'sharegpt' needs a chat template"):
        formats.RowFormat.create("sharegpt", chat=False)
    tok = common.word_tokenizer(chat_template=None)  # template "tokenizer" would refuse it
    report, _ = _samples(
        dict(sources=[{"dataset": [{"instruction": "hello", "output": "world"}],
                       "format": "instruct", "template": "none"}]),
        tok,
    )  # fmt: skip
    assert report.sources[0].train == 1
