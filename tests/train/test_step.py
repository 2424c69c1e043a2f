"""Invariants of the train step: packed == unpacked, accumulated == full batch, sharded == 1 device."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from covenant_jax.convert.api import load_model
from covenant_jax.model.llama import ModelOptions
from covenant_jax.parallel.sharding import activation_sharding, make_mesh
from covenant_jax.train import state as state_lib, step as step_lib
from tests import helpers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return helpers.save_hf(helpers.hf_model(), tmp_path_factory.mktemp("m") / "hf")


def _sample_batch(lengths, seq_len, vocab=96, seed=0):
    """Rows packed from samples of the given lengths (one list of lengths per row)."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    samples = []
    for row_lengths in lengths:
        toks, seg, pos, tgt, mask = [], [], [], [], []
        for s, n in enumerate(row_lengths, start=1):
            sample = rng.integers(3, vocab, n)
            samples.append(sample)
            toks += list(sample)
            seg += [s] * n
            pos += list(range(n))
            tgt += list(sample[1:]) + [0]
            mask += [1.0] * (n - 1) + [0.0]
        pad = seq_len - len(toks)
        rows["tokens"].append(toks + [0] * pad)
        rows["segment_ids"].append(seg + [0] * pad)
        rows["positions"].append(pos + [0] * pad)
        rows["targets"].append(tgt + [0] * pad)
        rows["loss_mask"].append(mask + [0.0] * pad)
    batch = {k: np.asarray(v, np.float32 if k == "loss_mask" else np.int32) for k, v in rows.items()}
    return batch, samples


def _loss_and_grads(model_dir, batch, mesh=None):
    model = load_model(model_dir, ModelOptions(), mesh or helpers.one_device_mesh())
    graphdef, params, rest = state_lib.split_model(model)
    loss_fn = step_lib.make_loss_fn(graphdef, rest, chunk_size=16)
    (loss_sum, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    return float(loss_sum), float(count), grads


def test_packed_equals_unpacked(model_dir):
    packed, _ = _sample_batch([[10, 7, 9], [12, 5]], seq_len=32)
    unpacked, _ = _sample_batch([[10], [7], [9], [12], [5]], seq_len=16)
    # same samples, same rng order: regenerate unpacked from the packed samples
    _, samples = _sample_batch([[10, 7, 9], [12, 5]], seq_len=32)
    single = {k: [] for k in packed}
    for s in samples:
        b, _ = _sample_batch([[len(s)]], seq_len=16)
        b["tokens"][0, : len(s)] = s
        b["targets"][0, : len(s) - 1] = s[1:]
        for k in single:
            single[k].append(b[k][0])
    unpacked = {k: np.stack(v) for k, v in single.items()}
    lp, cp, gp = _loss_and_grads(model_dir, packed)
    lu, cu, gu = _loss_and_grads(model_dir, unpacked)
    assert cp == cu == sum(len(s) - 1 for s in samples)
    np.testing.assert_allclose(lp, lu, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gu)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-4)


def _run_steps(model_dir, batch, micro_batches, mesh, steps=2, unroll=False, remat="none"):
    model = load_model(model_dir, ModelOptions(remat=remat, scan_unroll=unroll), mesh)
    graphdef, params, rest = state_lib.split_model(model)
    tx = optax.sgd(0.5)  # update error = gradient error (Adam would amplify float noise)
    state, shardings = state_lib.create_state(params, tx, mesh)
    loss_fn = step_lib.make_loss_fn(graphdef, rest, chunk_size=16, unroll=unroll)
    data_sharding = NamedSharding(mesh, P(None, ("data", "fsdp"), "context"))
    fn = jax.jit(
        step_lib.make_train_step(loss_fn, tx, optax.constant_schedule(0.5), unroll=unroll),
        in_shardings=(shardings, data_sharding),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    stacked = {
        k: jax.device_put(v.reshape(micro_batches, -1, v.shape[-1]), data_sharding) for k, v in batch.items()
    }
    losses = []
    with activation_sharding(mesh):
        for _ in range(steps):
            state, metrics = fn(state, stacked)
            losses.append(float(metrics["loss"]))
    assert fn._cache_size() == 1  # compiled once
    return losses, jax.tree.map(np.asarray, state["params"])


def test_accumulated_equals_full_batch(model_dir):
    # Rows with very different numbers of trained tokens: per-micro-batch averaging would differ.
    batch, _ = _sample_batch([[30], [4], [20, 8], [3]], seq_len=32)
    mesh = helpers.one_device_mesh()
    full_losses, full = _run_steps(model_dir, batch, 1, mesh)
    acc_losses, acc = _run_steps(model_dir, batch, 2, mesh)
    np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(full)):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_unrolled_equals_scanned(model_dir):
    """Every loop unrolled (layers, micro-batches, loss chunks: what plan's step time estimate
    compiles) computes the same step, here under remat as the pod recipes run it."""
    batch, _ = _sample_batch([[30], [4], [20, 8], [3]], seq_len=32)
    mesh = helpers.one_device_mesh()
    scanned_losses, scanned = _run_steps(model_dir, batch, 2, mesh, remat="full")
    unrolled_losses, unrolled = _run_steps(model_dir, batch, 2, mesh, unroll=True, remat="full")
    np.testing.assert_allclose(unrolled_losses, scanned_losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(scanned)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_sharded_equals_single_device(model_dir):
    batch, _ = _sample_batch([[30], [4], [20, 8], [3]], seq_len=32)
    single_losses, single = _run_steps(model_dir, batch, 1, helpers.one_device_mesh())
    sharded_losses, sharded = _run_steps(model_dir, batch, 1, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_non_finite_update_is_skipped(model_dir):
    """A NaN loss reports finite=False and leaves the params as they were (apply_if_finite)."""
    mesh = helpers.one_device_mesh()
    model = load_model(model_dir, ModelOptions(), mesh)
    graphdef, params, rest = state_lib.split_model(model)
    from covenant_jax.train import optimizer

    cfg = optimizer.default_config()
    tx, schedule = optimizer.make_optimizer(cfg, 10)
    state, _ = state_lib.create_state(params, tx, mesh)
    loss_fn = step_lib.make_loss_fn(graphdef, rest, chunk_size=16)
    batch, _ = _sample_batch([[10]], seq_len=16)
    batch = {k: v[None] for k, v in batch.items()}
    batch["loss_mask"] = batch["loss_mask"] * np.nan
    before = jax.tree.map(np.asarray, state["params"])
    new_state, metrics = jax.jit(step_lib.make_train_step(loss_fn, tx, schedule))(state, batch)
    assert not bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
