"""`covenant-jax eval` verbs print the table and write the same numbers as JSON."""

import json

from covenant_jax import cli
from tests.train import common


def test_eval_verbs_write_json(tmp_path, capsys):
    model_dir = common.tiny_model_dir(tmp_path)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"text": " ".join(f"w{(i * j) % 300}" for j in range(90))}) + "\n" for i in range(3)
        )
    )
    out = tmp_path / "ppl.json"
    assert (
        cli.main(["eval", "perplexity", str(model_dir), str(docs), "--lengths", "16,64", "--out", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    rows = {r["length"]: r for r in result["rows"]}
    assert set(rows) == {16, 64} and all(r["ppl"] > 1 and r["tokens"] > 0 for r in rows.values())
    assert f"{rows[64]['ppl']:.3f}"[:5] in printed

    out = tmp_path / "passkey.json"
    assert (
        cli.main(
            [
                "eval",
                "passkey",
                str(model_dir),
                "--lengths",
                "64",
                "--depths",
                "0,1",
                "--keys-per-cell",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert len(result["samples"]) == 2 and {s["length"] for s in result["samples"]} == {64}


def test_eval_bad_input_exits_2(tmp_path, capsys):
    model_dir = common.tiny_model_dir(tmp_path)
    missing = tmp_path / "nope.jsonl"
    assert cli.main(["eval", "perplexity", str(model_dir), str(missing), "--lengths", "16"]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
