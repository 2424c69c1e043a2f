"""DPO through the training loop on a tiny model: the eval DPO loss starts at ln 2 (the policy is
its own reference) and falls while rewards/accuracies rises, TRL's metric names in
metrics.jsonl, resume == uninterrupted (the frozen reference is re-loaded, not checkpointed),
also with a precomputed reference (== the in-step one)."""

import json
import math

import numpy as np
import pytest

from covenant_jax.train import loop, preference
from covenant_jax.train import precompute as precompute_pass
from covenant_jax.train.checkpoint import RunCheckpointer
from tests.train import common


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_loop")
    return root, common.tiny_model_dir(root), common.pairs_jsonl(root)


def _metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_eval_dpo_loss_falls_from_ln2_and_metrics_carry_trl_names(tmp_path, setup_dirs):
    _, model_dir, data = setup_dirs
    cfg = common.tiny_dpo_recipe(tmp_path, model_dir, data, steps=8, eval_every=4, export=True)
    summary = loop.train(cfg)
    rows = _metrics(tmp_path / "run")
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    np.testing.assert_allclose(evals[0]["eval_loss"], math.log(2), rtol=1e-6)  # policy == reference
    assert evals[0]["eval_rewards/margins"] == 0
    assert evals[2]["eval_loss"] < evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[2]["eval_rewards/accuracies"] > 0.5
    for name in preference.METRICS:
        assert name in rows[1] and f"eval_{name}" in evals[1], name
    assert summary.checkpoint_step == 8
    saved = RunCheckpointer(tmp_path / "run" / "checkpoints").read_state(8)
    assert set(saved) == {"step", "params", "opt_state"}  # the frozen reference is not saved
    assert any(summary.export_dir.glob("*.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(setup_dirs):
    """Six steps with the in-step reference, uninterrupted: (metrics rows, final params)."""
    root, model_dir, data = setup_dirs
    loop.train(common.tiny_dpo_recipe(root / "full", model_dir, data, steps=6))
    params = RunCheckpointer(root / "full" / "run" / "checkpoints").read_state(6)["params"]
    return _metrics(root / "full" / "run"), _leaves(params)


def _no_forward(*_):
    raise AssertionError("the reference's forward ran: its log-probs were cached")


@pytest.mark.parametrize("precompute", [False, True], ids=["in_step_reference", "precomputed_reference"])
def test_resumed_equals_uninterrupted(tmp_path, setup_dirs, uninterrupted, precompute, monkeypatch, capsys):
    """Stopped after 3 steps and resumed (the reference comes from model.path again, or its
    log-probs from the cache the first start wrote: no forward) == 6 steps uninterrupted with
    the in-step reference: exactly for the in-step reference, within float32 rounding for the
    precomputed one (same sums, other packing of the reference's forward)."""
    _, model_dir, data = setup_dirs
    part = common.tiny_dpo_recipe(tmp_path, model_dir, data, steps=3)
    part.dpo.precompute_ref_log_probs = precompute
    loop.train(part)
    part.train.steps = 6
    if precompute:
        assert "reference log-probs precomputed for 48 pairs" in capsys.readouterr().out
        monkeypatch.setattr(precompute_pass, "_my_values", _no_forward)
    loop.train(part)
    if precompute:
        cached = list((tmp_path / "run" / "data_cache").glob("ref_logp-*.npz"))
        assert f"reference log-probs read from cache {cached[0]} (48 pairs)" in capsys.readouterr().out
        assert len(cached) == 1 and not list(cached[0].parent.glob(".*"))  # whole, no temp left

    full_rows, full_params = uninterrupted
    part_rows = _metrics(tmp_path / "run")
    rtol = 2e-5 if precompute else 1e-6
    for key in ("loss", "rewards/margins", "logps/chosen", "eval_loss", "eval_rewards/accuracies"):
        np.testing.assert_allclose(
            [r[key] for r in part_rows if key in r],
            [r[key] for r in full_rows if key in r],
            rtol=rtol,
            err_msg=key,
        )
    part_params = _leaves(RunCheckpointer(tmp_path / "run" / "checkpoints").read_state(6)["params"])
    for x, y in zip(part_params, full_params):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 if precompute else 0)


def test_another_reference_computes_its_log_probs_again(tmp_path, setup_dirs, capsys):
    """The cached log-probs are keyed by the reference: with dpo.ref_model_path naming another
    model's folder, a run sharing the data cache runs the pass again, into a second file."""
    _, model_dir, data = setup_dirs
    other = common.tiny_model_dir(tmp_path / "other", seed=1)
    for name, reference in [("a", ""), ("b", str(other))]:
        cfg = common.tiny_dpo_recipe(tmp_path / name, model_dir, data, steps=1, eval_every=0)
        cfg.dpo.precompute_ref_log_probs = True
        cfg.dpo.ref_model_path = reference
        cfg.data.cache_dir = str(tmp_path / "cache")
        loop.train(cfg)
        assert "reference log-probs precomputed for 48 pairs" in capsys.readouterr().out, name
    assert len(list((tmp_path / "cache").glob("ref_logp-*.npz"))) == 2
