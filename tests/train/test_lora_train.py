"""LoRA training: only the adapters change (the base stays bit-identical), the optimizer state
holds adapter shapes only, sharded == one device, resumed == uninterrupted (with adapter dropout),
and the run's exports (PEFT adapter, merged weights) are the trained model."""

import json

import jax
import numpy as np
import optax
import pytest

from covenant_jax.cli import main
from covenant_jax.convert import peft_adapter
from covenant_jax.convert.api import load_lora_model, load_model
from covenant_jax.model.llama import ModelOptions
from covenant_jax.model.lora import LoraConfig
from covenant_jax.parallel.sharding import activation_sharding, make_mesh
from covenant_jax.train import loop, program
from covenant_jax.train import state as state_lib
from covenant_jax.train.checkpoint import RunCheckpointer
from tests import helpers
from tests.train import common
from tests.train.test_step import _sample_batch

LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "down"), base_dtype="bfloat16")


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return root, common.tiny_model_dir(root), common.chat_jsonl(root)


def _lora_recipe(root, model_dir, data, **train):
    cfg = common.tiny_recipe(root, model_dir, data, **train)
    cfg.model.lora.update(
        dict(
            enabled=True,
            rank=4,
            alpha=8.0,
            targets=("q", "v", "o", "down"),
            base_dtype="bfloat16",
            dropout=0.1,
        )
    )
    return cfg


def _steps(model_dir, mesh, steps=3, lora=LORA, tx=None):
    """A LoRA model's state after ``steps`` SGD steps on one fixed batch: (state, losses, the
    frozen base as it was before)."""
    model = load_lora_model(model_dir, ModelOptions(lora=lora), mesh, seed=0)
    graphdef, params, frozen, rest = state_lib.split_trained(model)
    before = jax.tree.map(np.asarray, frozen)
    tx = tx or optax.adam(1e-2)
    state, shardings = state_lib.create_state(params, tx, mesh, frozen)
    from covenant_jax.train import step as step_lib

    loss_fn = step_lib.make_loss_fn(graphdef, rest, chunk_size=16)
    data_sharding = program.batch_sharding(mesh, 4, 32, micro_batched=True)
    fn = jax.jit(
        step_lib.make_train_step(loss_fn, tx, optax.constant_schedule(1e-2)),
        in_shardings=(shardings, data_sharding),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    batch, _ = _sample_batch([[30], [4], [20, 8], [3]], seq_len=32)
    batch = {k: jax.device_put(v[None], data_sharding) for k, v in batch.items()}
    losses = []
    with activation_sharding(mesh):
        for _ in range(steps):
            state, metrics = fn(state, batch)
            losses.append(float(metrics["loss"]))
    return state, losses, before


def test_only_adapters_change_and_optimizer_holds_adapter_shapes(setup_dirs):
    _, model_dir, _ = setup_dirs
    state, losses, before = _steps(model_dir, make_mesh({"fsdp": 2, "tensor": 4}))
    assert losses[-1] < losses[0]
    frozen_now = jax.tree.map(np.asarray, state["frozen"])
    assert jax.tree.structure(frozen_now) == jax.tree.structure(before)
    for a, b in zip(jax.tree.leaves(frozen_now), jax.tree.leaves(before)):
        assert a.dtype == np.dtype("bfloat16") and np.array_equal(a.view(np.uint16), b.view(np.uint16))
    params = jax.tree.leaves(state["params"])
    assert len(params) == 2 * len(LORA.targets)  # A and B per target, stacked over layers
    lora_b = [
        np.asarray(x)
        for path, x in jax.tree_util.tree_leaves_with_path(state["params"])
        if "lora_b" in jax.tree_util.keystr(path)
    ]
    assert all(np.abs(b).max() > 0 for b in lora_b)  # B left zero: the adapters did train
    adapter_shapes = {x.shape for x in params}
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert moments and {x.shape for x in moments} <= adapter_shapes
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in params)  # Adam: mu and nu


def test_sharded_equals_single_device(setup_dirs):
    _, model_dir, _ = setup_dirs
    sgd = optax.sgd(0.5)  # update error = gradient error (Adam would amplify float noise)
    single, single_losses, _ = _steps(model_dir, helpers.one_device_mesh(), tx=sgd)
    sharded, sharded_losses, _ = _steps(model_dir, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), tx=sgd)
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded["params"]), jax.tree.leaves(single["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def _metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_resumed_equals_uninterrupted_and_exports_are_the_trained_model(tmp_path, setup_dirs):
    """With adapter dropout on: a run stopped at 3 and resumed to 6 has the uninterrupted run's
    losses and adapters; checkpoints hold the adapters and their moments only; the PEFT export
    holds the checkpointed adapters and continues training exactly where the run ended."""
    _, model_dir, data = setup_dirs
    full = _lora_recipe(tmp_path / "full", model_dir, data, steps=6, export=True)
    full.model.lora.export_merged = True
    summary = loop.train(full)
    part = _lora_recipe(tmp_path / "part", model_dir, data, steps=3)
    loop.train(part)
    part.train.steps = 6
    loop.train(part)

    full_losses = [r["loss"] for r in _metrics(tmp_path / "full" / "run") if "loss" in r]
    part_losses = [r["loss"] for r in _metrics(tmp_path / "part" / "run") if "loss" in r]
    np.testing.assert_allclose(part_losses, full_losses, rtol=1e-6)
    a = RunCheckpointer(tmp_path / "full" / "run" / "checkpoints").read_state(6)
    b = RunCheckpointer(tmp_path / "part" / "run" / "checkpoints").read_state(6)
    assert set(a) == {"step", "params", "opt_state"}
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # a checkpoint step exported after the run (the resumed run exported nothing) == the
    # uninterrupted run's own exports, bit for bit; an earlier step is another adapter
    part_run = tmp_path / "part" / "run"
    args = ["export", str(part_run), "--step", "6", "--merged-out", str(tmp_path / "merged6")]
    assert main(args) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (part_run / "export-step6" / name).read_bytes() == (summary.export_dir / name).read_bytes()
    merged_full = (tmp_path / "full" / "run" / "export_merged" / "model.safetensors").read_bytes()
    assert (tmp_path / "merged6" / "model.safetensors").read_bytes() == merged_full
    assert main(["export", str(part_run), "--step", "3", "--out", str(tmp_path / "a3")]) == 0
    step3 = (tmp_path / "a3" / "adapter_model.safetensors").read_bytes()
    assert step3 != (summary.export_dir / "adapter_model.safetensors").read_bytes()

    # no-dropout losses differ from the dropout run's: the dropout really ran (step 1: B is zero;
    # step 2: Adam's first update is about lr·sign(g) whatever the mask, so from step 3 on)
    nodrop = _lora_recipe(tmp_path / "nodrop", model_dir, data, steps=4, eval_every=0)
    nodrop.model.lora.dropout = 0.0
    loop.train(nodrop)
    nodrop_losses = [r["loss"] for r in _metrics(tmp_path / "nodrop" / "run") if "loss" in r]
    assert nodrop_losses[0] == pytest.approx(full_losses[0], rel=1e-6)
    assert max(abs(a - b) for a, b in zip(nodrop_losses[2:], full_losses[2:4])) > 1e-5

    adapter = peft_adapter.read_adapter(summary.export_dir, 2)
    assert adapter.lora.targets == ("q", "v", "o", "down") and adapter.lora.rank == 4
    exported = peft_adapter.load_weights(
        adapter,
        jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
            ),
            a["params"],
        ),
    )
    for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(a["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # the run's adapter folder loads in PEFT on the HF base and gives our logits
    import dataclasses

    import torch
    import transformers
    from peft import PeftModel

    ours = load_lora_model(
        model_dir,
        ModelOptions(lora=dataclasses.replace(adapter.lora, dropout=0.0)),
        helpers.one_device_mesh(),
        adapter=adapter,
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = helpers.random_tokens(hf.config.vocab_size)
    base_logits = helpers.reference_logits(hf, tokens)
    peft = PeftModel.from_pretrained(hf, summary.export_dir).eval()
    our_logits = np.asarray(ours(jax.numpy.asarray(tokens)))
    np.testing.assert_allclose(our_logits, helpers.reference_logits(peft, tokens), atol=1e-4, rtol=0)
    assert np.abs(our_logits - base_logits).max() > 1e-2  # the adapters moved the logits

    # continuing from the exported adapter starts where the run ended: its step-0 eval loss is
    # the last eval loss of the first run (no dropout in evaluation)
    cont = _lora_recipe(tmp_path / "cont", model_dir, data, steps=1, eval_every=1)
    cont.model.lora.adapter = str(summary.export_dir)
    loop.train(cont)
    first_eval = next(r["eval_loss"] for r in _metrics(tmp_path / "cont" / "run") if "eval_loss" in r)
    assert first_eval == pytest.approx(summary.eval_loss, rel=1e-6)

    # the merged export: the adapted weights moved, every other one is the base's (in bf16)
    from safetensors.numpy import load_file

    base = load_file(model_dir / "model.safetensors")
    merged = {
        k: v for k, v in load_file(tmp_path / "full" / "run" / "export_merged" / "model.safetensors").items()
    }
    assert sorted(merged) == sorted(base) and {v.dtype for v in merged.values()} == {np.dtype("bfloat16")}
    adapted = ("q_proj", "v_proj", "o_proj", "down_proj")
    for key, value in merged.items():
        same = np.array_equal(value.view(np.uint16), base[key].astype("bfloat16").view(np.uint16))
        assert same != any(f".{name}." in key for name in adapted), key


def test_lora_flops_count_the_model_adapters():
    """The MFU's FLOPs per token with LoRA: 4·N for the frozen weights (no weight gradient),
    6 per adapter parameter, the attention core as full fine-tuning; the adapter count is the
    model's own."""
    from flax import nnx

    from covenant_jax.config import ModelConfig
    from covenant_jax.model.llama import abstract_model
    from covenant_jax.model import lora as lora_lib
    from covenant_jax.train.metrics import attention_flops_per_token, train_flops_per_token

    cfg = ModelConfig.from_hf_dict({**helpers.TINY, "model_type": "llama", "vocab_size": 96})
    adapters = sum(
        x.size
        for x in jax.tree.leaves(nnx.state(abstract_model(cfg, ModelOptions(lora=LORA)), nnx.LoRAParam))
    )
    assert lora_lib.num_params(cfg, LORA) == adapters
    attention = attention_flops_per_token(cfg, 32)
    full = train_flops_per_token(cfg, 32) - attention
    assert train_flops_per_token(cfg, 32, LORA) - attention == full / 6 * 4 + 6 * adapters
