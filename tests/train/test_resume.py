"""Resuming a run_dir: a changed recipe, too few steps or no kept checkpoint are refused up front."""

import shutil

import pytest

from covenant_jax.errors import ResumeError, UserError
from covenant_jax.train import loop, resume
from tests.train import common


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model_dir, data, a run_dir trained 3 steps with its checkpoint at 3)."""
    root = tmp_path_factory.mktemp("resume")
    model_dir, data = common.tiny_model_dir(root), common.chat_jsonl(root)
    loop.train(common.tiny_recipe(root, model_dir, data, steps=3, eval_every=0))
    return model_dir, data, root / "run"


def _recipe(tmp_path, trained, **train):
    model_dir, data, run_dir = trained
    shutil.copytree(run_dir, tmp_path / "run")
    return common.tiny_recipe(tmp_path, model_dir, data, steps=6, eval_every=0, **train)


def test_changed_recipe_is_refused_naming_the_keys(tmp_path, trained):
    cfg = _recipe(tmp_path, trained)
    cfg.data.seq_len = 64
    cfg.optim.lr = 1e-3
    cfg.train.seed = 7
    saved_config = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(
        ResumeError,
        match=r"holds a run trained with a different recipe \(checkpoint step 3\).*"
        r"data.seq_len 32 -> 64; optim.lr 0.003 -> 0.001; train.seed 0 -> 7\. "
        r".*--config.train.allow_recipe_change=True",
    ):
        loop.train(cfg)
    assert (tmp_path / "run" / "config.json").read_text() == saved_config  # not overwritten


def test_changed_recipe_resumes_with_the_override(tmp_path, trained):
    cfg = _recipe(tmp_path, trained, allow_recipe_change=True)
    cfg.optim.lr = 1e-3
    summary = loop.train(cfg)
    assert summary.steps == 3 and summary.checkpoint_step == 6
    assert '"lr": 0.001' in (tmp_path / "run" / "config.json").read_text()


def test_what_may_change_is_not_refused():
    saved = {
        "train": {"steps": 3, "eval_every": 3, "run_dir": "a", "seed": 0},
        "mesh": {"fsdp": 2},
        "model": {"attention": "naive", "dtype": "float32"},
        "data": {"sources": [{"path": "x"}]},
    }
    current = {
        "train": {"steps": 9, "eval_every": 0, "run_dir": "b", "seed": 0, "new_knob": 1},
        "mesh": {"fsdp": 8},
        "model": {"attention": "blockwise", "dtype": "bfloat16"},
        "data": {"sources": ({"path": "y"},)},
    }
    assert resume.recipe_changes(saved, current) == [
        'data.sources [{"path": "x"}] -> [{"path": "y"}]',
        'model.dtype "float32" -> "bfloat16"',
    ]


def test_where_and_how_data_is_prepared_may_change():
    """The cache folder, the preparation processes and the shard size change no sample."""
    saved = {"data": {"cache_dir": "", "workers": 0, "shard_rows": 16384, "seq_len": 8}}
    current = {"data": {"cache_dir": "gs://b/c", "workers": 4, "shard_rows": 64, "seq_len": 8}}
    assert resume.recipe_changes(saved, current) == []


def test_steps_below_the_latest_checkpoint_are_refused(tmp_path, trained):
    cfg = _recipe(tmp_path, trained)
    cfg.train.steps = 2
    with pytest.raises(ResumeError, match=r"train.steps=2 is below the latest checkpoint in .* \(step 3\)"):
        loop.train(cfg)


def test_a_fresh_run_into_a_run_dir_with_checkpoints_is_refused(tmp_path, trained):
    cfg = _recipe(tmp_path, trained, resume=False)
    with pytest.raises(ResumeError, match=r"train.resume=False, but .* holds checkpoints up to step 3"):
        loop.train(cfg)


def test_keep_checkpoints_below_one_is_refused(tmp_path, trained):
    model_dir, data, _ = trained
    cfg = common.tiny_recipe(tmp_path, model_dir, data, keep_checkpoints=0)
    with pytest.raises(UserError, match=r"train.keep_checkpoints=0: must be >= 1"):
        loop.train(cfg)
    assert not (tmp_path / "run").exists()
