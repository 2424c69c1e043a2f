"""Bad recipes and bad runs: a clear error before compiling, nothing lost."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from covenant_jax import cli
from covenant_jax.errors import UserError
from covenant_jax.train import loop
from covenant_jax.train.checkpoint import RunCheckpointer
from tests.train import common


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return root, common.tiny_model_dir(root), common.chat_jsonl(root)


def test_seq_len_beyond_max_positions(tmp_path, dirs):
    _, model_dir, data = dirs
    cfg = common.tiny_recipe(tmp_path, model_dir, data)
    cfg.data.seq_len = 256
    with pytest.raises(UserError, match="data.seq_len=256 exceeds the model's max_position_embeddings=128"):
        loop.train(cfg)


def test_yarn_factor_disagreeing_with_lengths(tmp_path, dirs):
    _, model_dir, data = dirs
    cfg = common.tiny_recipe(tmp_path, model_dir, data)
    cfg.model.rope.rope_type = "yarn"
    cfg.model.rope.factor = 4.0
    cfg.model.max_position_embeddings = 1024
    with pytest.raises(UserError, match=r"yarn factor 4.0 x original_max_position_embeddings 128 = 512"):
        loop.train(cfg)


def test_vocab_disagreement(tmp_path, dirs):
    _, _, data = dirs
    from tests import helpers
    from tests.data import common as data_common

    folder = helpers.save_hf(helpers.hf_model(vocab_size=64), tmp_path / "small")
    data_common.word_tokenizer().save_pretrained(folder)
    cfg = common.tiny_recipe(tmp_path, folder, data)
    with pytest.raises(UserError, match="tokenizer has 326 tokens but the model's vocab_size is 64"):
        loop.train(cfg)


def test_missing_field_in_data(tmp_path, dirs):
    _, model_dir, data = dirs
    cfg = common.tiny_recipe(tmp_path, model_dir, data)
    cfg.data.sources = [dict(path=str(data), format="sharegpt")]
    with pytest.raises(UserError, match="conversations"):
        loop.train(cfg)


def test_bad_override_is_named(capsys):
    assert cli.main(["train", "configs/smollm2_sft_cpu.py", "--config.optim.no_such=1"]) == 2
    assert "no_such" in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path, dirs, objective):
    _, model_dir, data = dirs
    settings = dict(steps=6, checkpoint_every=1, eval_every=0)
    if objective == "dpo":
        cfg = common.tiny_dpo_recipe(tmp_path, model_dir, common.pairs_jsonl(tmp_path), **settings)
    else:
        cfg = common.tiny_recipe(tmp_path, model_dir, data, **settings)
    cfg.optim.lr = 1e30
    cfg.optim.clip_norm = 0.0
    cfg.optim.warmup_steps = 0
    with pytest.raises(loop.NonFiniteLoss, match=r"non-finite loss or gradient at step (\d)") as info:
        loop.train(cfg)
    import re

    bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    ckpt = RunCheckpointer(tmp_path / "run" / "checkpoints")
    assert ckpt.latest_step() == bad_step - 1
    state = ckpt.read_state(bad_step - 1)
    import jax
    import numpy as np

    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


RECIPE = """
from tests.train import common
from pathlib import Path

def get_config():
    return common.tiny_recipe(Path({root!r}), Path({model!r}), Path({data!r}),
                              steps=400, checkpoint_every=2, eval_every=0, async_checkpoint=True)
"""


def test_kill_mid_run_then_resume(tmp_path, dirs):
    _, model_dir, data = dirs
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        textwrap.dedent(RECIPE.format(root=str(tmp_path), model=str(model_dir), data=str(data)))
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "covenant_jax.cli", "train", str(recipe)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt_dir = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and len([p for p in ckpt_dir.glob("[0-9]*")]) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-run, possibly mid-save
    proc.wait()
    latest = RunCheckpointer(ckpt_dir).latest_step()
    assert latest is not None and latest >= 4
    code = cli.main(
        ["train", str(recipe), f"--config.train.steps={latest + 2}", "--config.train.async_checkpoint=False"]
    )
    assert code == 0
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[-1]["step"] == latest + 2
