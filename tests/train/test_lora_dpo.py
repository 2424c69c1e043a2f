"""DPO with LoRA: the reference is the model's own frozen base with the adapters off, and that
equals DPO against an explicit copy of the base (loss, TRL's metrics, adapter gradients); adapter
dropout reaches the policy and never the reference; through the loop the state holds no
reference copy, the eval DPO loss starts at ln 2 and falls, and a precomputed, resumed run ==
the in-step, uninterrupted one."""

import json
import math

import jax
import numpy as np
import pytest

from covenant_jax.convert.api import load_lora_model, load_model
from covenant_jax.model.llama import ModelOptions
from covenant_jax.model.lora import LoraConfig
from covenant_jax.train import loop, preference, program
from covenant_jax.train import state as state_lib
from covenant_jax.train import step as step_lib
from covenant_jax.train.checkpoint import RunCheckpointer
from tests import helpers
from tests.train import common
from tests.train.test_dpo import _packed, _units

LORA = dict(rank=4, alpha=8.0, targets=("q", "v", "o", "down"), dropout=0.1)


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_dpo")
    return root, common.tiny_model_dir(root), common.pairs_jsonl(root)


def _recipe(root, model_dir, data, **train):
    cfg = common.tiny_dpo_recipe(root, model_dir, data, **train)
    cfg.model.lora.update(dict(enabled=True, **LORA))
    return cfg


def _trained_adapters(params: dict) -> dict:
    """Adapters as after some training: B no longer zero, so the policy differs from the base."""
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(params))))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), params)


def _objective_and_inputs(cfg, explicit_copy: bool):
    """The LoRA policy's DPO objective, its adapters and frozen arrays: the reference is the base
    with the adapters off, or (``explicit_copy``) a plain model loaded again from the folder."""
    mesh = helpers.one_device_mesh()
    lora = LoraConfig(**LORA)
    graphdef, params, frozen, rest = state_lib.split_trained(
        load_lora_model(cfg.model.path, ModelOptions(lora=lora), mesh, seed=0)
    )
    params = _trained_adapters(params)
    if explicit_copy:
        base_graphdef, base_params, base_rest = state_lib.split_model(
            load_model(cfg.model.path, ModelOptions(), mesh)
        )
        reference = preference.frozen_model_reference(base_graphdef, base_rest, chunk_size=16)
        frozen = {**frozen, "ref_params": base_params}
    else:
        reference = preference.adapters_off_reference(graphdef, rest, chunk_size=16)
    objective = preference.dpo_objective(
        graphdef, rest, cfg.dpo, chunk_size=16, pairs_per_row=4, reference=reference
    )
    return objective, params, frozen


def _loss_report_grads(objective, params, frozen, batch):
    totals = objective.totals({k: v for k, v in batch.items() if k != step_lib.DROPOUT_KEY})
    (loss, sums), grads = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))(
        params, frozen, batch, totals
    )
    return float(loss), objective.report(sums, totals), grads


def test_adapters_off_reference_equals_an_explicit_copy_of_the_base(tmp_path, setup_dirs):
    _, model_dir, data = setup_dirs
    cfg = _recipe(tmp_path, model_dir, data)
    batch = _packed(_units(cfg, 6), rows=3, seq_len=112, pairs_per_row=4)
    off = _loss_report_grads(*_objective_and_inputs(cfg, explicit_copy=False), batch)
    copy = _loss_report_grads(*_objective_and_inputs(cfg, explicit_copy=True), batch)
    assert float(off[1]["pairs"]) == 6
    assert abs(float(off[1]["rewards/margins"])) > 1e-3, "the policy differs from its reference"
    np.testing.assert_allclose(off[0], copy[0], rtol=1e-6)
    for name in preference.METRICS:
        np.testing.assert_allclose(float(off[1][name]), float(copy[1][name]), rtol=1e-6, atol=1e-7)
    for g_off, g_copy in zip(jax.tree.leaves(off[2]), jax.tree.leaves(copy[2]), strict=True):
        np.testing.assert_allclose(np.asarray(g_off), np.asarray(g_copy), rtol=1e-5, atol=1e-7)


def test_dropout_reaches_the_policy_not_the_reference(tmp_path, setup_dirs):
    """A dropout key in the batch changes the policy's log-probs; the reference's (adapters off)
    stay those of the base."""
    _, model_dir, data = setup_dirs
    cfg = _recipe(tmp_path, model_dir, data)
    objective, params, frozen = _objective_and_inputs(cfg, explicit_copy=False)
    batch = _packed(_units(cfg, 6), rows=3, seq_len=112, pairs_per_row=4)
    dropped = {**batch, step_lib.DROPOUT_KEY: jax.random.key(3)}
    _, plain, _ = _loss_report_grads(objective, params, frozen, batch)
    _, with_dropout, _ = _loss_report_grads(objective, params, frozen, dropped)
    assert float(plain["logps/chosen"]) != float(with_dropout["logps/chosen"])
    # rewards = beta * (policy - reference): the reference part is the same with and without the key
    beta = cfg.dpo.beta
    ref_plain = float(plain["logps/chosen"]) - float(plain["rewards/chosen"]) / beta
    ref_dropped = float(with_dropout["logps/chosen"]) - float(with_dropout["rewards/chosen"]) / beta
    np.testing.assert_allclose(ref_plain, ref_dropped, rtol=1e-5)


def test_the_state_holds_no_reference_copy(tmp_path, setup_dirs):
    _, model_dir, data = setup_dirs
    cfg = _recipe(tmp_path, model_dir, data)
    model_cfg = load_model(cfg.model.path, ModelOptions(), helpers.one_device_mesh()).config
    abstract = program.abstract_state(cfg, model_cfg, helpers.one_device_mesh())
    assert set(abstract.state["frozen"]) == {state_lib.BASE}
    assert not program.holds_reference_copy(cfg)


def _metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_lora_dpo_run_learns_and_precomputed_resumed_equals_in_step(tmp_path, setup_dirs):
    """Six steps in one run with the in-step reference (the base, adapters off); then three steps
    with the reference precomputed, resumed to six: the same losses and adapters (float32
    rounding: the precomputed reference's forward packs the pairs otherwise)."""
    _, model_dir, data = setup_dirs
    full = _recipe(tmp_path / "full", model_dir, data, steps=6, export=True)
    summary = loop.train(full)
    rows = _metrics(tmp_path / "full" / "run")
    evals = [r for r in rows if "eval_loss" in r]
    np.testing.assert_allclose(evals[0]["eval_loss"], math.log(2), rtol=1e-6)  # fresh adapters: B = 0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    saved = RunCheckpointer(tmp_path / "full" / "run" / "checkpoints").read_state(6)
    assert set(saved) == {"step", "params", "opt_state"}
    assert all(
        "lora" in "/".join(map(str, path))
        for path, _ in jax.tree_util.tree_flatten_with_path(saved["params"])[0]
    )
    assert (summary.export_dir / "adapter_model.safetensors").is_file()

    part = _recipe(tmp_path / "part", model_dir, data, steps=3)
    part.dpo.precompute_ref_log_probs = True
    loop.train(part)
    part.train.steps = 6
    loop.train(part)
    part_rows = _metrics(tmp_path / "part" / "run")
    for key in ("loss", "rewards/margins", "eval_loss", "eval_rewards/accuracies"):
        np.testing.assert_allclose(
            [r[key] for r in part_rows if key in r],
            [r[key] for r in rows if key in r],
            rtol=2e-5,
            err_msg=key,
        )
    part_params = RunCheckpointer(tmp_path / "part" / "run" / "checkpoints").read_state(6)["params"]
    for x, y in zip(jax.tree.leaves(part_params), jax.tree.leaves(saved["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)
