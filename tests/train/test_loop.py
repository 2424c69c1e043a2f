"""End to end on a tiny model: loss falls, resume == uninterrupted, export loads in transformers."""

import json
import shutil

import numpy as np
import pytest

from covenant_jax.train import loop
from tests.train import common


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return root, common.tiny_model_dir(root), common.chat_jsonl(root)


def _metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_train_eval_loss_falls_and_export_loads(tmp_path, setup_dirs, capsys):
    import torch
    import transformers

    _, model_dir, data = setup_dirs
    cfg = common.tiny_recipe(tmp_path, model_dir, data, steps=12, eval_every=6, export=True)
    summary = loop.train(cfg)
    rows = _metrics(tmp_path / "run")
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 3 and evals[2] < evals[1] < evals[0]  # steps 0, 6, 12
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    assert {"step", "loss", "lr", "tokens_per_s"} <= rows[1].keys()
    assert summary.steps == 12 and summary.checkpoint_step == 12 and summary.tokens > 0
    # The export is the trained model: transformers' logits equal ours from the final checkpoint.
    from covenant_jax.convert.verify import verify

    assert verify(summary.export_dir).ok
    trained = transformers.AutoModelForCausalLM.from_pretrained(summary.export_dir, dtype=torch.float32)
    original = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert not torch.equal(trained.model.norm.weight, original.model.norm.weight)
    assert (summary.export_dir / "tokenizer.json").exists()

    # `covenant-jax export` of the last step == the run's own export, bit for bit; a damaged step
    # (another step's state under its name) is named, not exported
    from covenant_jax.cli import main

    assert main(["export", str(tmp_path / "run")]) == 0  # the newest step, 12
    for f in summary.export_dir.iterdir():
        assert (tmp_path / "run" / "export-step12" / f.name).read_bytes() == f.read_bytes(), f.name
    steps = tmp_path / "run" / "checkpoints"
    shutil.rmtree(steps / "12" / "state")
    shutil.copytree(steps / "9" / "state", steps / "12" / "state")
    assert main(["export", str(tmp_path / "run"), "--step", "12", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint step 12 in" in err and "is damaged: content digests differ" in err, err
    assert not (tmp_path / "bad").exists()


def test_resumed_equals_uninterrupted(tmp_path, setup_dirs):
    from covenant_jax.train.checkpoint import RunCheckpointer

    _, model_dir, data = setup_dirs
    full = common.tiny_recipe(tmp_path / "full", model_dir, data, steps=6)
    loop.train(full)
    part = common.tiny_recipe(tmp_path / "part", model_dir, data, steps=3)
    loop.train(part)
    part.train.steps = 6
    loop.train(part)  # resumes from step 3 in the same run dir

    full_losses = [r["loss"] for r in _metrics(tmp_path / "full" / "run") if "loss" in r]
    part_losses = [r["loss"] for r in _metrics(tmp_path / "part" / "run") if "loss" in r]
    np.testing.assert_allclose(part_losses, full_losses, rtol=1e-6)
    a = RunCheckpointer(tmp_path / "full" / "run" / "checkpoints")
    b = RunCheckpointer(tmp_path / "part" / "run" / "checkpoints")
    pa, pb = a.read_state(6)["params"], b.read_state(6)["params"]
    for x, y in zip(jax_leaves(pa), jax_leaves(pb)):
        np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_context_parallel_zigzag_training_matches_plain(tmp_path, setup_dirs):
    """Same losses with the sequence spread over context=2 (zig-zag) as on fsdp x tensor."""
    _, model_dir, data = setup_dirs
    plain = common.tiny_recipe(tmp_path / "plain", model_dir, data, steps=2, eval_every=0)
    loop.train(plain)
    cp = common.tiny_recipe(tmp_path / "cp", model_dir, data, steps=2, eval_every=0)
    cp.model.attention = "context_zigzag"
    cp.mesh.fsdp, cp.mesh.tensor, cp.mesh.context = 2, 2, 2
    loop.train(cp)
    a = [r["loss"] for r in _metrics(tmp_path / "plain" / "run") if "loss" in r]
    b = [r["loss"] for r in _metrics(tmp_path / "cp" / "run") if "loss" in r]
    np.testing.assert_allclose(b, a, rtol=1e-5)
