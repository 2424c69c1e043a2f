"""Readers: CSV, byte-order marks, where each row came from, and files that are not what their
extension says; the same rows from gs:// as from a local file."""

import json

import pytest

from covenant_jax import storage
from covenant_jax.data import pipeline, sources
from covenant_jax.errors import UserError
from tests.data import common
from tests.test_storage import gcs  # noqa: F401  (the GCS emulator fixture)

ROWS = [common.chat_row(i) for i in range(3)]
BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark


def _jsonl(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def test_byte_order_mark_is_dropped(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(BOM + _jsonl(ROWS))
    (tmp_path / "b.json").write_bytes(BOM + json.dumps(ROWS).encode())
    (tmp_path / "c.csv").write_bytes(BOM + b"instruction,output\nhello,world\n")
    assert sources.read_rows(tmp_path / "a.jsonl") == ROWS
    assert sources.read_rows(tmp_path / "b.json") == ROWS
    assert sources.read_rows(tmp_path / "c.csv") == [{"instruction": "hello", "output": "world"}]


def test_bom_json_trains_through_the_pipeline(tmp_path):
    """Before: the BOM made the array unparsable, every line an invalid JSON row, and the
    error claimed the `messages` field did not exist."""
    (tmp_path / "b.json").write_bytes(BOM + json.dumps(ROWS, indent=1).encode())
    data = pipeline.build_pipeline(
        dict(sources=[{"path": str(tmp_path / "b.json")}], template="chatml", seq_len=32,
             batch_size=1),
        common.word_tokenizer(), process_index=0, process_count=1,
    )  # fmt: skip
    assert data.report.sources[0].train == 3 and not data.report.skipped


def test_csv_quoting_empty_cells_extra_cells_and_bad_bytes(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(
        b"instruction,input,output\n"
        b'"two\nlines, quoted",,"say ""hi"""\n'  # Record on lines 2-3; an empty cell.
        b"\n"  # A blank line is no record.
        b"a,b,c,EXTRA\n"  # Line 5: more cells than the header.
        b"short\n"  # Line 6: missing cells are empty.
        b"bad \xff byte,x,y\n"  # Line 7: not UTF-8.
    )
    rows = sources.read_rows(path)
    assert rows[0] == {"instruction": "two\nlines, quoted", "input": None, "output": 'say "hi"'}
    assert rows[1] == sources.BadRow("invalid_csv", "4 cells, the header has 3")
    assert rows[2] == {"instruction": "short", "input": None, "output": None}
    assert [rows.where(i) for i in range(4)] == [f"{path}:{n}" for n in (2, 5, 6, 7)]
    assert sources.read_rows(path, max_rows=2) == rows[:2]
    report = pipeline.build_pipeline(
        dict(sources=[{"path": str(path), "format": "instruct"}], template="chatml", seq_len=64,
             batch_size=1),
        common.word_tokenizer(), process_index=0, process_count=1,
    ).report.sources[0]  # fmt: skip
    assert report.train == 1
    assert dict(report.skipped) == {"invalid_csv": 1, "missing_field": 1, "non_utf8": 1}
    assert report.located["non_utf8"][0].startswith(f"{path}:7: non_utf8 (instruction: ")


def test_rows_know_their_line_and_the_report_names_the_first_few(tmp_path):
    def chat(*roles):
        return {"messages": [{"role": r, "content": "w1"} for r in roles]}

    lines = [ROWS[0], b"", b"{bad"] + [chat("user")] * 5 + [chat("assistant", "user")]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines))
    rows = sources.read_rows(path)
    assert [rows.where(i) for i in (0, 1, 2)] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    report = pipeline.build_pipeline(
        dict(sources=[{"path": str(path)}], template="chatml", seq_len=32, batch_size=1),
        common.word_tokenizer(), process_index=0, process_count=1,
    ).report  # fmt: skip
    s = report.sources[0]
    assert dict(s.skipped) == {"invalid_json": 1, "no_assistant": 5, "role_order": 1}
    assert s.located["no_assistant"] == [f"{path}:{n}: no_assistant" for n in (4, 5, 6)]
    assert s.located["invalid_json"][0].startswith(f"{path}:3: invalid_json (Expecting")
    assert s.located["role_order"] == [f"{path}:9: role_order (message 0 is assistant (roles: assistant))"]
    text = str(report)
    assert f"{path}:6: no_assistant" in text and f"{path}:7: no_assistant" not in text
    in_memory = pipeline.build_pipeline(
        dict(sources=[{"dataset": [ROWS[0], {"nothing": 1}]}], template="chatml", seq_len=32,
             batch_size=1),
        common.word_tokenizer(), process_index=0, process_count=1,
    ).report.sources[0]  # fmt: skip
    assert in_memory.located == {"missing_field": ["row 2: missing_field (messages)"]}


def test_files_that_are_not_what_they_say(tmp_path):
    (tmp_path / "array.json").write_text('[{"messages": []}, {"messages": ')
    with pytest.raises(ValueError, match=r"array\.json: not valid JSON \(Expecting value"):
        sources.read_rows(tmp_path / "array.json")
    (tmp_path / "object.json").write_text('{"messages": [}')
    with pytest.raises(ValueError, match=r"object\.json: not valid JSON"):
        sources.read_rows(tmp_path / "object.json")
    (tmp_path / "wide.jsonl").write_bytes("\ufeff".encode("utf-16") + _jsonl(ROWS))
    with pytest.raises(ValueError, match=r"wide\.jsonl: the file is UTF-16"):
        sources.read_rows(tmp_path / "wide.jsonl")
    (tmp_path / "d.tsv").write_text("a\tb\n")
    with pytest.raises(ValueError, match=r"extension 'tsv' \(use .jsonl, .json, .csv"):
        sources.read_rows(tmp_path / "d.tsv")


def test_csv_json_and_jsonl_from_gcs_equal_local(tmp_path, gcs):  # noqa: F811
    files = {  # name -> (bytes, where the first row is)
        "d.csv": (BOM + b'instruction,output\n"a, b",c\nd,\n', "2"),
        "d.jsonl": (BOM + _jsonl(ROWS), "1"),
        "d.json": (json.dumps({"data": ROWS}).encode(), "row 1"),
    }
    for name, (raw, first) in files.items():
        (tmp_path / name).write_bytes(raw)
        storage.path(f"gs://bucket/data/{name}").write_bytes(raw)
        local = sources.read_rows(tmp_path / name)
        remote = sources.read_rows(f"gs://bucket/data/{name}")
        assert remote == local and len(local) in (2, 3)
        assert remote.where(0) == f"gs://bucket/data/{name}:{first}"


def test_iter_rows_streams_what_read_rows_reads(tmp_path):
    """The streaming reader (parallel preparation) yields read_rows' rows with their
    `Rows.where` locations: a BOM dropped, blank lines not rows, bad lines BadRows in place;
    rows it is told not to decode are None; a UTF-16 file is refused the same way."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(BOM + _jsonl(ROWS[:2]) + b"\n  \n{bad\n[1]\nbad \xff\n" + _jsonl(ROWS[2:]))
    rows = sources.read_rows(path)
    streamed = list(sources.iter_rows(path))
    assert streamed == [(rows.where(i), r) for i, r in enumerate(rows)]
    assert [w for w, _ in streamed] == [f"{path}:{n}" for n in (1, 2, 5, 6, 7, 8)]
    assert [r.reason for _, r in streamed[2:5]] == ["invalid_json", "invalid_json", "non_utf8"]
    assert list(sources.iter_rows(path, max_rows=3, select=lambda i: i != 1)) == [
        streamed[0],
        (streamed[1][0], None),
        streamed[2],
    ]
    csv_path = tmp_path / "c.csv"
    csv_path.write_bytes(b"instruction,output\nhello,world\n\nbye,now\n")
    assert list(sources.iter_rows(csv_path)) == [
        (f"{csv_path}:2", {"instruction": "hello", "output": "world"}),
        (f"{csv_path}:4", {"instruction": "bye", "output": "now"}),
    ]
    assert list(sources.iter_rows(ROWS[:1])) == [("row 1", ROWS[0])]
    utf16 = tmp_path / "u.jsonl"
    utf16.write_bytes(_jsonl(ROWS).decode().encode("utf-16"))
    with pytest.raises(UserError, match="UTF-16"):
        list(sources.iter_rows(utf16))
