"""Unit tests for tools/material.py and tools/fetch_material.py (no network, no real material)."""

from __future__ import annotations

import bz2
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import fetch_material  # noqa: E402

material = fetch_material.material  # the very module the CLI uses (tools.material or material)


def test_iter_json_array_truncated_and_complete():
    rows = [{"a": 1, "s": "x, ] }"}, {"b": [1, 2]}, {"c": "é"}]
    full = json.dumps(rows, indent=2)
    assert list(material.iter_json_array(full)) == rows
    # cut inside the last element: only the complete ones come back
    cut = full[: full.rindex('"c"') + 3]
    assert list(material.iter_json_array(cut)) == rows[:2]
    # cut right after a comma / mid-whitespace
    assert list(material.iter_json_array(full[: full.index("},") + 2])) == rows[:1]
    assert list(material.iter_json_array("[]")) == []
    assert list(material.iter_json_array("  [ ")) == []
    with pytest.raises(ValueError):
        list(material.iter_json_array('{"not": "array"}'))


def test_normalise_conversation():
    ok = {
        "id": "x",
        "conversations": [{"from": "human", "value": "hi", "extra": 1}, {"from": "gpt", "value": "yo"}],
    }
    assert material.normalise_conversation(ok) == {
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    }
    for bad in (
        {"conversations": []},
        {"conversations": [{"from": "human"}]},
        {"x": 1},
        [1],
        {"conversations": [{"from": "human", "value": None}]},
    ):
        assert material.normalise_conversation(bad) is None


def test_fetch_sharegpt_from_truncated_file(tmp_path, monkeypatch):
    rows = [
        {
            "id": str(i),
            "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}],
        }
        for i in range(5)
    ] + [{"id": "empty", "conversations": []}]
    rows.append(rows[0])
    src = tmp_path / "data.json"
    text = json.dumps(rows, indent=2)
    src.write_text(text[: len(text) - 40])  # truncated inside the last element
    monkeypatch.setattr(material, "sharegpt_json_path", lambda: src)
    out = material.fetch_sharegpt(tmp_path / "out")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 5 and lines[3] == {"conversations": rows[3]["conversations"]}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    # idempotent: a second call does not even look at the source
    monkeypatch.setattr(material, "sharegpt_json_path", lambda: (_ for _ in ()).throw(AssertionError))
    assert material.fetch_sharegpt(tmp_path / "out") == out


def test_sharegpt_pairs_reject_another_conversations_reply(tmp_path):
    """The DPO demo's pairs: each exchange's real reply chosen, the reply of the exchange half the
    list away rejected; conversations not opening user -> assistant, too long or mostly non-ASCII
    are not used, and a pair whose replies are equal is left out."""

    def conv(q, a, first="human"):
        return {"conversations": [{"from": first, "value": q}, {"from": "gpt", "value": a}]}

    convs = [conv(f"question number {i}?", f"the answer to question {i}.") for i in range(4)]
    convs += [
        conv("question ignored?", "an answer to nothing.", first="gpt"),  # opens with gpt
        conv("question long?", "x" * 400),  # reply too long
        conv("вопрос на русском?", "ответ на русском языке."),
    ]  # not ASCII
    convs[3] = conv("question repeated?", "the answer to question 0.")  # pair 3's rejected reply is its own
    convs.append(conv("question number 7?", "the answer to question 7."))
    with open(tmp_path / material.SHAREGPT_FILENAME, "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in convs)
    out = material.fetch_sharegpt_pairs(tmp_path)
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    exchanges = [
        (c["conversations"][0]["value"], c["conversations"][1]["value"]) for c in convs[:4] + convs[7:]
    ]
    n = len(exchanges)
    want = [
        (q, a, exchanges[(i + n // 2) % n][1])
        for i, (q, a) in enumerate(exchanges)
        if exchanges[(i + n // 2) % n][1] != a
    ]
    got = [(p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs]
    assert got == want and len(got) == n - 1  # pair 3 (rejected == chosen) left out
    assert {p["prompt"][0]["role"] for p in pairs} == {"user"}
    assert {m["role"] for p in pairs for m in p["chosen"] + p["rejected"]} == {"assistant"}


def test_strip_wikitext():
    raw = (
        "'''Foo''' (1775{{ndash}}1783) is a [[bar (thing)|bar]] and [[baz]].{{cite web|x={{y|z}}}}"
        "<ref name=a>r</ref><ref name=b/><!-- c -->\n[[File:X.jpg|thumb|a [[link]] here]]\n"
        "{| class=t\n| cell\n|}\nSee [http://example.com example]."
    )
    assert material.strip_wikitext(raw) == "Foo (1775\u20131783) is a bar and baz.\n\nSee example."


def test_wiki_and_lee_documents(tmp_path):
    body = "Some ''article'' text about [[Thing|things]]. " * 20
    xml = f"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>A</title><revision><text>{body}</text></revision></page>
<page><title>R</title><revision><text>#REDIRECT [[A]]</text></revision></page>
<page><title>S</title><revision><text>tiny</text></revision></page>
</mediawiki>"""
    p = tmp_path / "w.xml.bz2"
    p.write_bytes(bz2.compress(xml.encode()))
    docs = material.wiki_documents(p)
    assert [d["title"] for d in docs] == ["A"]
    assert "[[" not in docs[0]["text"] and "things" in docs[0]["text"]
    lee = tmp_path / "lee.cor"
    lee.write_text("first  para\n\nsecond para\n")
    assert material.lee_documents(lee) == ["first para", "second para"]


def test_ensure_packages_reports_unavailable(monkeypatch):
    monkeypatch.setattr(material, "_pip", lambda *a: subprocess.CompletedProcess(a, 1, "", "No network"))
    with pytest.raises(material.MaterialUnavailable, match="No network"):
        material.ensure_packages({"surely_not_installed_module_xyz": "whatever"})
    material.ensure_packages({"json": "json"})  # present: no pip call


def test_cli_continues_and_exit_code(tmp_path, monkeypatch, capsys):
    def unavailable(out):
        raise material.MaterialUnavailable("offline")

    def ok(out):
        return Path(out)

    monkeypatch.setitem(material.FETCHERS, "smollm2", unavailable)
    monkeypatch.setitem(material.FETCHERS, "sharegpt", ok)
    monkeypatch.setitem(material.FETCHERS, "gensim", unavailable)
    assert fetch_material.main(["--out", str(tmp_path)]) == 0
    assert "UNAVAILABLE" in capsys.readouterr().out
    assert fetch_material.main(["--out", str(tmp_path), "--what", "smollm2,gensim"]) == 1
    with pytest.raises(SystemExit):
        fetch_material.main(["--what", "nope"])


def test_default_material_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("COVENANT_MATERIAL_DIR", raising=False)
    assert material.default_material_dir() == REPO / "material"
    monkeypatch.setenv("COVENANT_MATERIAL_DIR", str(tmp_path))
    assert material.default_material_dir() == tmp_path.resolve()
