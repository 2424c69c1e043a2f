"""Row formats -> messages, readers, and every kind of bad row counted by its reason."""

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from covenant_jax.data import formats, pipeline, sources
from tests.data import common

U, A = "user", "assistant"


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_sharegpt_with_custom_names_and_role_map():
    fmt = formats.RowFormat.create(
        "sharegpt",
        {"messages": "dialog", "role": "speaker", "content": "text"},
        {"customer": "user", "agent": "assistant"},
    )
    row = {
        "dialog": [
            {"speaker": "customer", "text": "hi"},
            {"speaker": "agent", "text": "yo"},
            {"speaker": "human", "text": "again"},
            {"speaker": "gpt", "text": "ok"},
        ]
    }
    assert fmt.to_example(row) == _msgs((U, "hi"), (A, "yo"), (U, "again"), (A, "ok"))


def test_instruct_prompt_completion_text():
    fmt = formats.RowFormat.create("instruct", {"instruction": "q", "output": "a"})
    assert fmt.to_example({"q": "do", "input": "this", "a": "done", "system": "sys"}) == _msgs(
        ("system", "sys"), (U, "do\n\nthis"), (A, "done")
    )
    assert fmt.to_example({"q": "do", "a": "done", "input": ""}) == _msgs((U, "do"), (A, "done"))
    pc = formats.RowFormat.create("prompt_completion")
    assert pc.to_example({"prompt": "p", "completion": "c"}) == _msgs((U, "p"), (A, "c"))
    assert formats.RowFormat.create("text").to_example({"text": "doc"}) == "doc"


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "no_assistant"),
        ({"messages": []}, "empty_conversation"),
        ({"messages": [{"role": "system", "content": ""}]}, "empty_conversation"),
        ({"other": 1}, "missing_field"),
        ({"messages": [{"content": "x"}]}, "missing_field"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "missing_field"),
        ({"messages": "hi"}, "not_a_list"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "unknown_role"),
        ({"messages": _msgs((U, "x"), (A, 5))}, "non_string_content"),
        ({"messages": _msgs((U, "x"), (A, [{"type": "text", "text": "y"}]))}, "non_string_content"),
        ({"messages": _msgs((U, "\ud800"), (A, "y"))}, "non_utf8"),
        ({"messages": _msgs((U, b"\xff\xfe"), (A, "y"))}, "non_utf8"),
        ({"messages": _msgs((U, "x"), (A, "  "))}, "empty_content"),
        ({"messages": _msgs((U, "x"), ("system", "s"), (A, "y"))}, "misplaced_system"),
        ({"messages": _msgs((A, "x"), (U, "y"))}, "role_order"),  # An answer to no question.
        ({"messages": _msgs((U, "x"), (U, "y"), (A, "z"))}, "role_order"),
        ({"messages": _msgs(("system", "s"), (A, "x"))}, "role_order"),
        ({"messages": _msgs((U, "x"), (A, "y"), (A, "z"))}, "role_order"),
    ],
)
def test_bad_rows_raise_their_reason(row, reason):
    with pytest.raises(formats.InvalidRow) as e:
        formats.RowFormat.create("messages").to_example(row)
    assert e.value.reason == reason


def test_invalid_rows_pickle():
    """Worker processes hand skipped rows back pickled."""
    e = pickle.loads(pickle.dumps(formats.InvalidRow("template_error", "roles must alternate")))
    assert (e.reason, e.detail, str(e)) == (
        "template_error",
        "roles must alternate",
        "template_error: roles must alternate",
    )


def test_role_order_any_takes_what_the_template_renders():
    msgs = _msgs(("system", "s"), (A, "x"), (U, "y"), (U, "z"), (A, "w"))
    fmt = formats.RowFormat.create("messages", role_order="any")
    assert fmt.to_example({"messages": msgs}) == msgs
    with pytest.raises(ValueError, match="role_order='random'"):
        formats.RowFormat.create("messages", role_order="random")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("roles_to_train", ["tool"], r"data.roles_to_train=\['tool'\]: must be a non-empty list"),
        ("roles_to_train", [], "must be a non-empty list"),
        ("train_on_eos", "sometimes", r"data.train_on_eos='sometimes': must be one of 'turn'"),
        ("role_order", "random", "data.role_order='random': must be one of 'alternate', 'any'"),
    ],
)
def test_mask_and_role_order_settings_are_checked_first(key, value, message):
    with pytest.raises(ValueError, match=message):
        pipeline.build_pipeline(
            _cfg(sources=[{"dataset": [common.chat_row(0)]}], **{key: value}),
            common.word_tokenizer(), process_index=0, process_count=1,
        )  # fmt: skip


def _write_jsonl(path, rows, raw_lines=()):
    with open(path, "wb") as f:
        for r in rows:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return str(path)


def _cfg(**kw):
    return dict(dict(template="chatml", seq_len=24, batch_size=2, epochs=1), **kw)


def test_every_bad_input_is_counted_by_reason(tmp_path):
    good = [common.chat_row(i) for i in range(5)]
    bad = [
        {"messages": [{"role": "user", "content": "w1"}]},  # no_assistant
        {"messages": []},  # empty_conversation
        {"messages": [{"role": "robot", "content": "w1"}]},  # unknown_role
        {"messages": _msgs((U, "w1"), (A, 3))},  # non_string_content
        {"messages": _msgs((U, "\ud83d"), (A, "w2"))},  # non_utf8 (lone surrogate)
        {"nothing": 1},  # missing_field
        {"messages": _msgs((U, "w1"), (A, common.words(0, 40)))},  # overlength_dropped
    ]
    raw = [b'{"messages": [{"role": "user", "content": "\xff"}]}', b"{not json"]
    path = _write_jsonl(tmp_path / "d.jsonl", good + bad, raw)
    src = [{"path": path, "format": "messages"}]
    report = pipeline.build_pipeline(
        _cfg(sources=src, overlength="drop"),
        common.word_tokenizer(),
        process_index=0,
        process_count=1,
    ).report
    s = report.sources[0]
    assert s.rows == 14 and s.train == 5
    assert dict(s.skipped) == {
        "no_assistant": 1,
        "empty_conversation": 1,
        "unknown_role": 1,
        "non_string_content": 1,
        "non_utf8": 2,
        "missing_field": 1,
        "overlength_dropped": 1,
        "invalid_json": 1,
    }
    assert "overlength_dropped=1" in str(report) and path in str(report)


def test_max_rows_reads_only_the_first_rows_of_a_jsonl_file(tmp_path):
    rows = [common.chat_row(i) for i in range(4)]
    path = tmp_path / "d.jsonl"
    # Blank lines are not rows; an undecodable line is one (it is counted as skipped).
    lines = [rows[0], b"", b"{bad", b""] + rows[1:] + [b"{truncated"]
    encoded = [x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines]
    path.write_bytes(b"\n".join(encoded))
    got = sources.read_rows(path, max_rows=3)
    assert got[0] == rows[0] and got[1].reason == "invalid_json" and got[2] == rows[1]
    assert len(sources.read_rows(path)) == 6
    report = pipeline.build_pipeline(
        _cfg(sources=[{"path": str(path), "max_rows": 4}]),
        common.word_tokenizer(),
        process_index=0,
        process_count=1,
    ).report.sources[0]
    assert (report.rows, report.train, dict(report.skipped)) == (4, 3, {"invalid_json": 1})


def test_nothing_valid_raises_naming_the_file(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": _msgs((U, "w1"))}] * 3)
    with pytest.raises(ValueError, match=r"bad\.jsonl.*no valid rows.*no_assistant"):
        pipeline.build_pipeline(
            _cfg(sources=[{"path": path}]),
            common.word_tokenizer(),
            process_index=0,
            process_count=1,
        )


def test_zero_trained_tokens_is_a_skip_reason_and_can_empty_a_source():
    # Truncation to 8 tokens cuts off every assistant token.
    rows = [{"messages": _msgs((U, common.words(i, 10)), (A, "w1"))} for i in range(3)]
    with pytest.raises(ValueError, match="no trainable rows.*no_trained_tokens"):
        pipeline.build_pipeline(
            _cfg(sources=[{"dataset": rows}], seq_len=8),
            common.word_tokenizer(),
            process_index=0,
            process_count=1,
        )


@pytest.mark.parametrize(
    "fmt, fields, missing",
    [
        ("sharegpt", {}, "conversations"),
        ("messages", {"messages": "msgs"}, "msgs"),
        ("messages", {"role": "speaker"}, "speaker"),
        ("instruct", {"system": "sys_prompt"}, "sys_prompt"),
    ],
)
def test_configured_field_absent_everywhere_raises(tmp_path, fmt, fields, missing):
    path = _write_jsonl(tmp_path / "d.jsonl", [common.chat_row(i) for i in range(3)])
    with pytest.raises(ValueError, match=rf"d\.jsonl.*'{missing}'.*does not exist"):
        pipeline.build_pipeline(
            _cfg(sources=[{"path": path, "format": fmt, "fields": fields}]),
            common.word_tokenizer(),
            process_index=0,
            process_count=1,
        )


def test_readers_json_parquet_and_dataset_objects(tmp_path):
    rows = [common.chat_row(i) for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "b.json").write_text("\n".join(json.dumps(r) for r in rows))  # JSONL as .json
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    assert sources.read_rows(tmp_path / "a.json") == rows
    assert sources.read_rows(str(tmp_path / "b.json")) == rows
    assert sources.read_rows(str(tmp_path / "c.parquet")) == rows

    class FakeHFDataset(list):  # datasets is optional: readers duck-type `column_names`.
        column_names = ["messages"]

    assert sources.read_rows(FakeHFDataset(rows)) == rows
    for src in (tmp_path / "a.json", tmp_path / "c.parquet", rows, FakeHFDataset(rows)):
        assert sources.read_rows(src, max_rows=2) == rows[:2]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        sources.read_rows(tmp_path / "nope.jsonl")


def test_template_rejections_and_mismatches_are_counted():
    """A template that raises on a row, or that rewrites the assistant content so it cannot
    be located, skips that row with a reason instead of guessing a mask."""
    strict = (
        "{% if messages|length > 2 %}{{ raise_exception('roles must alternate') }}{% endif %}"
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}"
        "{{ m['content'] if m['content'] != 'w9' else 'REWRITTEN' }}{{ eos_token }}{% endfor %}"
    )
    rows = [common.chat_row(i) for i in range(3)] + [
        {"messages": _msgs((U, "w1"), (A, "w2"), (U, "w3"), (A, "w4"))},
        {"messages": _msgs((U, "w1"), (A, "w9"))},
    ]
    cfg = _cfg(sources=[{"dataset": rows}], template="tokenizer")
    data = pipeline.build_pipeline(
        cfg, common.word_tokenizer(chat_template=strict), process_index=0, process_count=1
    )
    s = data.report.sources[0]
    assert s.train == 3 and dict(s.skipped) == {"template_error": 1, "template_mismatch": 1}
