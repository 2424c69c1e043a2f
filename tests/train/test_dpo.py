"""The DPO step's invariants on packed pairs: packed == one pair a row, micro-batches == full batch,
sharded (data x fsdp x tensor) == one device, precomputed reference == in-step reference, and the
frozen reference passes through the donated step unchanged."""

import grain
import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from covenant_jax.convert.api import load_model
from covenant_jax.data import pairs, pipeline
from covenant_jax.data.tokenizer import load_tokenizer
from covenant_jax.model.llama import ModelOptions
from covenant_jax.parallel.sharding import activation_sharding, make_mesh
from covenant_jax.train import precompute, preference, program, state as state_lib, step as step_lib
from tests import helpers
from tests.data import common as data_common
from tests.train import common

SEQ = 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    model_dir = common.tiny_model_dir(root)
    ref_dir = common.tiny_model_dir(root / "ref", seed=1)  # a reference unlike the policy
    data = common.pairs_jsonl(root)
    cfg = common.tiny_dpo_recipe(root, model_dir, data)
    cfg.dpo.ref_model_path = str(ref_dir)
    return cfg, model_dir, ref_dir


def _units(cfg, n):
    train, _, _ = data_common.source_samples(cfg.data, load_tokenizer(cfg.model.path))
    return train[:n]


def _packed(units, rows, seq_len, pairs_per_row):
    """All ``units`` in one batch of ``rows`` rows (asserted)."""
    ds = pipeline._shard(grain.MapDataset.source(units), 0, 1)
    batches = list(
        pairs.pack_pairs(
            ds,
            seq_len=seq_len,
            rows=rows,
            pad_id=0,
            bins=rows,
            seed=0,
            shuffle_bins=False,
            pairs_per_row=pairs_per_row,
            fields=tuple(units[0]),
        )
    )
    assert len(batches) == 1
    return batches[0]


def _models(cfg, mesh):
    graphdef, params, rest = state_lib.split_model(load_model(cfg.model.path, ModelOptions(), mesh))
    _, ref, _ = state_lib.split_model(load_model(cfg.dpo.ref_model_path, ModelOptions(), mesh))
    return graphdef, rest, params, {"ref_params": ref}


def _loss_and_grads(cfg, batch, pairs_per_row, mesh=None, precomputed=False):
    graphdef, rest, params, frozen = _models(cfg, mesh or helpers.one_device_mesh())
    reference = (
        preference.precomputed_reference
        if precomputed
        else preference.frozen_model_reference(graphdef, rest, chunk_size=16)
    )
    objective = preference.dpo_objective(
        graphdef, rest, cfg.dpo, chunk_size=16, pairs_per_row=pairs_per_row, reference=reference
    )
    totals = objective.totals(batch)
    (loss, sums), grads = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))(
        params, frozen, batch, totals
    )
    return float(loss), objective.report(sums, totals), grads


def _assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


def test_packed_pairs_equal_one_pair_a_row(setup):
    cfg = setup[0]
    units = _units(cfg, 6)
    packed = _packed(units, rows=3, seq_len=2 * SEQ, pairs_per_row=4)
    assert packed["pair_slot"].max() >= 1, "several pairs share a row"
    single = _packed(units, rows=6, seq_len=SEQ, pairs_per_row=1)
    loss_p, report_p, grads_p = _loss_and_grads(cfg, packed, 4)
    loss_s, report_s, grads_s = _loss_and_grads(cfg, single, 1)
    assert float(report_p["pairs"]) == float(report_s["pairs"]) == 6
    np.testing.assert_allclose(loss_p, loss_s, rtol=1e-5)
    for name in preference.METRICS:
        np.testing.assert_allclose(float(report_p[name]), float(report_s[name]), rtol=1e-5, atol=1e-6)
    _assert_trees_close(grads_p, grads_s, atol=2e-6)


def test_precomputed_reference_equals_in_step(setup):
    """The pass before training stores per-token reference log-probs that, carried through packing,
    give the in-step reference's loss and gradients."""
    cfg = setup[0]
    mesh = helpers.one_device_mesh()
    units = _units(cfg, 6)
    graphdef, rest, params, frozen = _models(cfg, mesh)
    reference = preference.frozen_model_reference(graphdef, rest, cfg.train.loss_chunk_size)
    annotate = precompute.annotate_fn(
        cfg, reference, params, frozen, mesh, rows=4, pad_id=0, log=lambda _: None
    )
    annotated = [dict(u) for u in units]
    annotate([annotated[:4], annotated[4:]])
    assert all(pairs.REF_FIELD in u and (u[pairs.REF_FIELD][~u["weights"]] == 0).all() for u in annotated)
    with_ref = _packed(annotated, rows=3, seq_len=2 * SEQ, pairs_per_row=4)
    without = _packed(units, rows=3, seq_len=2 * SEQ, pairs_per_row=4)
    loss_p, report_p, grads_p = _loss_and_grads(cfg, with_ref, 4, precomputed=True)
    loss_i, report_i, grads_i = _loss_and_grads(cfg, without, 4)
    np.testing.assert_allclose(loss_p, loss_i, rtol=1e-6)
    np.testing.assert_allclose(
        float(report_p["rewards/margins"]), float(report_i["rewards/margins"]), rtol=1e-5
    )
    _assert_trees_close(grads_p, grads_i, atol=1e-6)


def _train_batch(cfg, micro_batches):
    cfg = cfg.copy_and_resolve_references()
    cfg.train.micro_batches = micro_batches
    data = pipeline.build_pipeline(cfg.data, load_tokenizer(cfg.model.path), process_index=0, process_count=1)
    return next(iter(data.train)), cfg


def _run_steps(cfg, batch, micro_batches, mesh, steps=2):
    """Two SGD steps of the program's DPO train step (in-step reference): losses, final params,
    and the frozen reference as it came out."""
    cfg = cfg.copy_and_resolve_references()
    cfg.train.micro_batches = micro_batches
    graphdef, rest, params, frozen = _models(cfg, mesh)
    tx = optax.sgd(0.5)
    state, shardings = state_lib.create_state(params, tx, mesh, frozen)
    fn = jax.jit(
        step_lib.make_train_step(
            program.make_objective(cfg, graphdef, rest), tx, optax.constant_schedule(0.5)
        ),
        in_shardings=(shardings, NamedSharding(mesh, P(None, ("data", "fsdp")))),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    stacked = {k: v.reshape(micro_batches, -1, v.shape[-1]) for k, v in batch.items()}
    losses = []
    with activation_sharding(mesh):
        for _ in range(steps):
            state, metrics = fn(state, stacked)
            losses.append(
                {k: float(metrics[k]) for k in ("loss", "pairs", "rewards/accuracies", "grad_norm")}
            )
    assert fn._cache_size() == 1
    return losses, jax.tree.map(np.asarray, state["params"]), jax.tree.map(np.asarray, state["frozen"])


def test_micro_batches_equal_full_batch_and_the_reference_stays_frozen(setup):
    cfg = setup[0]
    batch, _ = _train_batch(cfg, 1)
    per_row = [(row.max() + 1) for row in batch["pair_slot"]]
    assert len(set(per_row)) > 1, "rows with different pair counts: per-micro-batch means would differ"
    mesh = helpers.one_device_mesh()
    full_losses, full, frozen = _run_steps(cfg, batch, 1, mesh)
    acc_losses, acc, _ = _run_steps(cfg, batch, 2, mesh)
    for a, b in zip(acc_losses, full_losses):
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in b], rtol=1e-5)
    _assert_trees_close(acc, full, atol=2e-6)
    _, _, _, start = _models(cfg, mesh)
    for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(start)):
        np.testing.assert_array_equal(x, np.asarray(y))  # never updated


def test_sharded_equals_single_device(setup):
    cfg = setup[0]
    batch, _ = _train_batch(cfg, 1)
    single_losses, single, _ = _run_steps(cfg, batch, 1, helpers.one_device_mesh())
    sharded_losses, sharded, _ = _run_steps(cfg, batch, 1, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    for a, b in zip(sharded_losses, single_losses):
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in b], rtol=1e-5)
    _assert_trees_close(sharded, single, atol=2e-6)
