"""Parity with TRL's DPOTrainer (trl 1.16, CPU torch): TRL's own batch (prompt+chosen rows, then
prompt+rejected rows, right-padded, with its completion mask) is packed into pair rows and fed to
covenant_jax's DPO objective on the converted models; the loss, every reward / log-prob metric
and the policy gradients equal TRL's for each loss type, within float32 tolerance."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from covenant_jax.config import ModelConfig
from covenant_jax.convert import keymap
from covenant_jax.convert.api import load_model
from covenant_jax.model.llama import ModelOptions
from covenant_jax.train import preference, state as state_lib
from tests import helpers
from tests.data import common as data_common

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PAIRS = 4
CASES = {  # name -> (loss_type, loss_weights, label_smoothing, beta)
    "sigmoid": (("sigmoid",), (), 0.0, 0.1),
    "ipo": (("ipo",), (), 0.0, 0.5),
    "hinge": (("hinge",), (), 0.0, 2.0),
    "robust": (("robust",), (), 0.2, 0.1),
    "exo_pair": (("exo_pair",), (), 1e-3, 0.1),
    "sigmoid+sft": (("sigmoid", "sft"), (1.0, 0.5), 0.0, 0.1),
}
METRICS = preference.METRICS


@pytest.fixture(scope="module")
def trl_run(tmp_path_factory):
    """TRL's batch, and per case its loss, metrics and policy gradients (one backward)."""
    root = tmp_path_factory.mktemp("trl")
    tokenizer = data_common.word_tokenizer()
    policy = helpers.hf_model(seed=0, vocab_size=len(tokenizer))
    reference = helpers.hf_model(seed=1, vocab_size=len(tokenizer))
    folders = {name: helpers.save_hf(m, root / name) for name, m in (("policy", policy), ("ref", reference))}
    rows = [
        dict(
            prompt=data_common.words(i, 2 + i % 3),
            chosen=" " + data_common.words(i + 1, 1 + i % 4),
            rejected=" " + data_common.words(i + 5, 3 - i % 3),
        )
        for i in range(PAIRS)
    ]
    # DPOConfig defaults to bf16=True, which runs the reference under bf16 autocast (accelerate
    # wraps its forward): float32 throughout, for a float32 comparison.
    args = trl.DPOConfig(
        output_dir=str(root / "out"),
        per_device_train_batch_size=PAIRS,
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=None,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    results = {}
    for name, (loss_type, weights, smoothing, beta) in CASES.items():
        # The attributes _compute_loss reads (set by __init__ from DPOConfig).
        trainer.loss_types, trainer.loss_weights = list(loss_type), list(weights) or [1.0] * len(loss_type)
        trainer.label_smoothing, trainer.beta = smoothing, beta
        trainer._metrics["train"].clear()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {k: p.grad.detach().numpy().copy() for k, p in trainer.model.named_parameters()}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results[name] = (loss.item(), metrics, grads)
    batch = {k: v.numpy() for k, v in batch.items()}
    return folders, batch, results


def pack_pairs(batch: dict, pairs_per_row: int) -> dict[str, np.ndarray]:
    """TRL's [2N, L] batch as pair rows: pair i's chosen then rejected sequence (each unpadded,
    its own segment, positions from 0), ``pairs_per_row`` pairs a row, loss on TRL's completion
    tokens."""
    n = batch["input_ids"].shape[0] // 2
    width = 2 * pairs_per_row * batch["input_ids"].shape[1]
    rows = -(-n // pairs_per_row)
    out = {
        k: np.zeros((rows, width), np.int32)
        for k in ("tokens", "targets", "segment_ids", "positions", "chosen")
    }
    out["pair_slot"] = np.full((rows, width), -1, np.int32)
    out["loss_mask"] = np.zeros((rows, width), np.float32)
    at = np.zeros(rows, int)
    for pair in range(n):
        row, slot = divmod(pair, pairs_per_row)
        for sub, seq in enumerate((pair, pair + n)):
            length = int(batch["attention_mask"][seq].sum())
            ids, completion = batch["input_ids"][seq, :length], batch["completion_mask"][seq, :length]
            span = slice(at[row], at[row] + length)
            out["tokens"][row, span] = ids
            out["targets"][row, span] = np.append(ids[1:], 0)
            out["loss_mask"][row, span] = np.append(completion[1:], 0)
            out["segment_ids"][row, span] = 2 * slot + sub + 1
            out["positions"][row, span] = np.arange(length)
            out["pair_slot"][row, span] = slot
            out["chosen"][row, span] = 1 - sub
            at[row] += length
    return out


def dpo_section(loss_type, weights, smoothing, beta):
    section = preference.default_config()
    section.update(loss_type=loss_type, loss_weights=weights, label_smoothing=smoothing, beta=beta)
    preference.check(section)
    return section


@pytest.fixture(scope="module")
def models(trl_run):
    folders = trl_run[0]
    mesh = helpers.one_device_mesh()
    graphdef, params, rest = state_lib.split_model(load_model(folders["policy"], ModelOptions(), mesh))
    _, ref_params, _ = state_lib.split_model(load_model(folders["ref"], ModelOptions(), mesh))
    return graphdef, rest, params, {"ref_params": ref_params}


def ours(models, packed, section, pairs_per_row):
    """(loss, reported metrics, policy gradients) of covenant_jax's DPO objective."""
    graphdef, rest, params, frozen = models
    objective = preference.dpo_objective(
        graphdef,
        rest,
        section,
        chunk_size=16,
        pairs_per_row=pairs_per_row,
        reference=preference.frozen_model_reference(graphdef, rest, chunk_size=16),
    )
    totals = objective.totals(packed)
    (loss, sums), grads = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))(
        params, frozen, packed, totals
    )
    return float(loss), jax.tree.map(float, objective.report(sums, totals)), grads


def hf_grads_as_ours(folders, grads: dict) -> dict:
    """TRL's (HF-named) gradients in covenant_jax's layout, by the conversion key map."""
    cfg = ModelConfig.from_hf_dict(json.loads((folders["policy"] / "config.json").read_text()))
    out = {}
    for m in keymap.tensor_maps(cfg):
        full = tuple(slice(None) for _ in m.shape)
        layers = range(cfg.num_hidden_layers) if m.stacked else [None]
        parts = [m.read(grads[m.hf_name(layer)], full) for layer in layers]
        out[m.path] = np.stack(parts) if m.stacked else parts[0]
    return out


@pytest.mark.parametrize(
    "case,pairs_per_row",
    [(c, 1) for c in CASES] + [("sigmoid+sft", 2)],
    ids=[f"{c}-pair_a_row" for c in CASES] + ["sigmoid+sft-two_pairs_a_row"],
)
def test_loss_metrics_and_gradients_equal_trl(trl_run, models, case, pairs_per_row):
    folders, batch, results = trl_run
    trl_loss, trl_metrics, trl_grads = results[case]
    section = dpo_section(*CASES[case])
    loss, metrics, grads = ours(models, pack_pairs(batch, pairs_per_row), section, pairs_per_row)
    np.testing.assert_allclose(loss, trl_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], trl_loss, rtol=1e-5, atol=1e-6)
    for name in METRICS:
        # rewards are beta x (policy - reference), two float32 sums over whole answers whose
        # roundings (~2e-6 measured) survive the difference
        atol = 1e-5 if name.startswith("rewards/") else 1e-6
        np.testing.assert_allclose(metrics[name], trl_metrics[name], rtol=1e-5, atol=atol, err_msg=name)
    assert metrics["pairs"] == PAIRS
    want = hf_grads_as_ours(folders, trl_grads)
    got = _flat(grads)
    assert set(got) == set(want)
    scale = max(float(np.abs(g).max()) for g in want.values())
    for path, g in want.items():
        np.testing.assert_allclose(got[path], g, atol=2e-5 * scale, rtol=1e-3, err_msg=str(path))


def _flat(tree, prefix=()) -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, prefix + (key,)).items()}
    return {prefix: np.asarray(tree)}


def test_trl_batch_is_a_meaningful_reference(trl_run):
    """The case is not degenerate: rewards differ from 0, answers of several lengths, both
    accuracy outcomes possible (policy and reference are different random models)."""
    _, batch, results = trl_run
    _, metrics, _ = results["sigmoid"]
    assert abs(metrics["rewards/margins"]) > 1e-3 and abs(metrics["rewards/chosen"]) > 1e-3
    lengths = batch["completion_mask"].sum(axis=1)
    assert len(set(lengths.tolist())) > 2
