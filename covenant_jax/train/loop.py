"""The training run: setup in named steps, then the step loop.

The loop dispatches step N before fetching step N-1's metrics, so logging never stalls the
device. Checkpoints save the state and the data iterator at the same step; a NaN/inf stops the
run (the step skipped the update on device, so the last checkpoint and the state stay good).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from covenant_jax import storage
from covenant_jax.convert.api import export_model, load_model
from covenant_jax.data import pipeline as data_pipeline
from covenant_jax.data.tokenizer import load_tokenizer
from covenant_jax.errors import UserError
from covenant_jax.model.llama import Llama, ModelOptions
from covenant_jax.parallel.sharding import activation_sharding, make_mesh
from covenant_jax.train import checkpoint, metrics as metrics_lib, optimizer, recipe, state as state_lib
from covenant_jax.train import step as step_lib


class NonFiniteLoss(UserError):
    """The loss or gradient norm became NaN/inf; the message names the step."""


@dataclasses.dataclass
class RunSummary:
    steps: int
    tokens: int
    train_loss: float | None
    eval_loss: float | None
    seconds: float
    run_dir: Path
    checkpoint_step: int | None
    export_dir: Path | None

    def __str__(self) -> str:
        def fmt(x):
            return "n/a" if x is None else f"{x:.4f}"

        return (
            f"run summary: {self.steps} steps, {self.tokens:,} trained tokens in {self.seconds:.1f}s; "
            f"final train loss {fmt(self.train_loss)}, eval loss {fmt(self.eval_loss)}\n"
            f"  run dir:    {self.run_dir}\n  checkpoint: {self.run_dir / 'checkpoints'} "
            f"(step {self.checkpoint_step})\n  export:     {self.export_dir or 'none'}"
        )


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built by :func:`setup`."""

    cfg: ml_collections.ConfigDict
    mesh: Any
    model: Llama
    data: data_pipeline.DataPipeline
    train_iter: Any
    state: dict
    shardings: dict
    train_step: Any
    eval_step: Any
    batch_sharding: NamedSharding
    eval_sharding: NamedSharding
    checkpointer: checkpoint.RunCheckpointer
    writer: metrics_lib.MetricsWriter
    start_step: int
    flops_per_token: float


def _load(cfg, mesh) -> Llama:
    model = load_model(cfg.model.path, model_options(cfg), mesh)
    model.config = recipe.rope_override(model.config, cfg.model)
    return model


def _check_vocab(tokenizer, model: Llama) -> None:
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}: the data and the checkpoint disagree"
        )


def check_outputs(cfg: ml_collections.ConfigDict) -> storage.Path:
    """Before any work: the run dir is writable and the export will not replace the model."""
    run_dir = storage.path(cfg.train.run_dir)
    storage.check_writable(run_dir)
    if cfg.train.export:
        storage.check_separate(cfg.model.path, export_dir(cfg), "the export folder")
    return run_dir


def export_dir(cfg: ml_collections.ConfigDict) -> storage.Path:
    return storage.path(cfg.train.run_dir) / "export"


def data_cache_dir(cfg: ml_collections.ConfigDict) -> str:
    """Where prepared samples are cached: data.cache_dir, else beside the run (RUN_DIR/data_cache)."""
    return cfg.data.cache_dir or os.fspath(storage.path(cfg.train.run_dir) / "data_cache")


def setup(cfg: ml_collections.ConfigDict) -> Run:
    recipe.check_fields(cfg)
    recipe.bound_samples_per_row(cfg)
    run_dir = check_outputs(cfg)
    mesh = make_mesh({k: v for k, v in cfg.mesh.to_dict().items()})
    model = _load(cfg, mesh)
    recipe.validate(cfg, model.config, mesh.shape["data"] * mesh.shape["fsdp"], mesh.shape["context"])
    tokenizer = load_tokenizer(cfg.model.path)
    _check_vocab(tokenizer, model)
    data = data_pipeline.build_pipeline(cfg.data, tokenizer, cache_dir=data_cache_dir(cfg))
    if jax.process_index() == 0:
        print(data.report)
    tx, schedule = optimizer.make_optimizer(cfg.optim, cfg.train.steps)
    graphdef, params, rest = state_lib.split_model(model)
    state, shardings = state_lib.create_state(params, tx, mesh)
    steps = make_steps(cfg, graphdef, rest, tx, schedule, shardings, mesh)
    train_step, eval_step, batch_sharding = steps.train_step, steps.eval_step, steps.batch_sharding
    storage.makedirs(run_dir)
    if jax.process_index() == 0:  # one writer
        (run_dir / "config.json").write_text(cfg.to_json_best_effort(indent=2) + "\n")
    ckpt = checkpoint.RunCheckpointer(run_dir / "checkpoints", cfg.train.keep_checkpoints,
                                      cfg.train.async_checkpoint)
    train_iter = iter(data.train)
    start = 0
    if cfg.train.resume and ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        state = ckpt.restore(start, state_lib.abstract_like(state, shardings), train_iter)
        if jax.process_index() == 0:
            print(f"resumed from {run_dir / 'checkpoints'} at step {start}")
    writer = metrics_lib.MetricsWriter(run_dir, start, enabled=jax.process_index() == 0)
    flops = metrics_lib.train_flops_per_token(model.config, cfg.data.seq_len)
    return Run(cfg, mesh, model, data, train_iter, state, shardings, train_step, eval_step,
               batch_sharding, steps.eval_sharding, ckpt, writer, start, flops)


@dataclasses.dataclass
class Steps:
    train_step: Any  # jitted (state, batch[A, b, T]) -> (state, metrics)
    eval_step: Any  # jitted (params, batch[B, T]) -> (loss sum, token count)
    batch_sharding: NamedSharding  # of a [A, b, T] train batch
    eval_sharding: NamedSharding  # of a [B, T] eval batch


def make_steps(cfg, graphdef, rest, tx, schedule, shardings: dict, mesh) -> Steps:
    """The jitted steps with explicit shardings and donation; also what `plan` lowers abstractly."""
    loss_fn = step_lib.make_loss_fn(graphdef, rest, cfg.train.loss_chunk_size)
    batch_sharding = NamedSharding(mesh, P(None, ("data", "fsdp"), "context"))
    eval_sharding = NamedSharding(mesh, P(("data", "fsdp"), "context"))
    train_step = jax.jit(step_lib.make_train_step(loss_fn, tx, schedule),
                         in_shardings=(shardings, batch_sharding),
                         out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
    eval_step = jax.jit(step_lib.make_eval_step(loss_fn), in_shardings=(shardings["params"], eval_sharding))
    return Steps(train_step, eval_step, batch_sharding, eval_sharding)


def model_options(cfg) -> ModelOptions:
    return ModelOptions(param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype,
                        remat=cfg.model.remat, attention=cfg.model.attention,
                        max_samples_per_row=cfg.data.max_samples_per_row)


def _host_layout(run: "Run", batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zig-zag context parallelism balances causal work by reordering T once, on the host."""
    if run.cfg.model.attention == "context_zigzag":
        from covenant_jax.model.context_parallel import zigzag_permute

        return zigzag_permute(batch, run.mesh.shape["context"])
    return batch


def _device_batch(batch: dict[str, np.ndarray], sharding: NamedSharding, micro_batches: int | None):
    """Host batch [rows, T] (this process's rows) -> global arrays, [A, b, T] when micro-batched."""
    def put(x):
        if micro_batches is not None:
            x = x.reshape(micro_batches, -1, *x.shape[1:])
        global_shape = list(x.shape)
        batch_axis = 1 if micro_batches is not None else 0
        global_shape[batch_axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

    return {k: put(v) for k, v in batch.items()}


def _padding_batch(data: data_pipeline.DataPipeline) -> dict[str, np.ndarray]:
    """A batch of padding rows (no tokens, no loss): what a process feeds once its share ends."""
    shape = (data.rows_per_process, data.seq_len)
    pad = np.full(shape, data.pad_id, np.int32)
    zeros = np.zeros(shape, np.int32)
    return {"tokens": pad, "targets": pad, "loss_mask": np.zeros(shape, np.float32),
            "segment_ids": zeros, "positions": zeros}


def evaluate(run: Run, params: dict) -> float | None:
    """The eval loss: the token mean over the eval rows (data.eval_mode "token_mean"), or the
    number transformers' Trainer.evaluate() reports ("trainer", see _evaluate_like_trainer)."""
    if run.data.eval is None:
        return None
    if run.data.eval_mode == "trainer":
        return _evaluate_like_trainer(run, params)
    batches = itertools.islice(iter(run.data.eval), run.cfg.train.eval_batches or None)
    total, count = 0.0, 0.0
    while True:
        batch = next(batches, None)
        if jax.process_count() > 1:
            # Each process packs its own share of the eval rows, so their batch counts can
            # differ; all must run the same (collective) steps: go on while any has a batch,
            # the others feeding no-loss padding.
            from jax.experimental import multihost_utils

            if not multihost_utils.process_allgather(np.int32(batch is not None)).any():
                break
            batch = _padding_batch(run.data) if batch is None else batch
        elif batch is None:
            break
        loss_sum, n = _eval_sums(run, params, batch)
        total, count = total + loss_sum, count + n
    return total / count if count else None


def _eval_sums(run: Run, params: dict, batch: dict[str, np.ndarray]) -> tuple[float, float]:
    """(summed token loss, trained tokens) of one eval batch (this process's rows of it)."""
    with activation_sharding(run.mesh):
        loss_sum, n = run.eval_step(params, _device_batch(_host_layout(run, batch), run.eval_sharding, None))
    return float(loss_sum), float(n)


def _evaluate_like_trainer(run: Run, params: dict) -> float | None:
    """What transformers' Trainer.evaluate() reports (and Gradients' validator scores): each
    eval batch's token mean, averaged over the batches weighted by their rows (Trainer repeats
    a batch's loss per row, and accelerate's gather_for_metrics cuts the last batch's repeats to
    its rows); batches whose mean is not finite left out (logging_nan_inf_filter). The pipeline
    forms the batches (TrainerEval); each may take several device batches, summed before the mean."""
    means, weights = [], []
    for rows, batches in itertools.islice(iter(run.data.eval), run.cfg.train.eval_batches or None):
        total, count = np.sum([_eval_sums(run, params, b) for b in batches], axis=0)
        means.append(total / count if count else float("nan"))
        weights.append(rows)
    if not means:
        return None
    means, weights = np.asarray(means), np.asarray(weights, float)
    finite = np.isfinite(means)
    if finite.any():
        means, weights = means[finite], weights[finite]
    return float(np.sum(means * weights) / np.sum(weights))


class _Progress:
    def __init__(self, run: Run, total: int):
        self.enabled = run.cfg.train.progress and jax.process_index() == 0
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=run.start_step, unit="step", dynamic_ncols=True)

    def update(self, postfix: dict[str, str]) -> None:
        if self.enabled:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()


def _log(run: Run, step: int, m: dict, seconds: float, progress: _Progress, eval_loss) -> dict:
    tokens_per_s = float(m["tokens"]) / max(seconds, 1e-9)
    scalars = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
               "tokens_per_s": tokens_per_s, "step_time_s": seconds}
    peak = metrics_lib.peak_flops_per_device(run.cfg.train.peak_tflops_per_device)
    # MFU over all rows, padding included: the device computes them.
    row_tokens = run.cfg.data.batch_size * run.cfg.data.seq_len
    if peak:
        scalars["mfu"] = run.flops_per_token * row_tokens / seconds / (peak * jax.device_count())
    if eval_loss is not None:
        scalars["eval_loss"] = eval_loss
    if step % run.cfg.train.log_every == 0 or eval_loss is not None:
        run.writer.write(step, scalars)
    postfix = {"loss": f"{float(m['loss']):.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
    if "mfu" in scalars:
        postfix["mfu"] = f"{scalars['mfu']:.1%}"
    if eval_loss is not None:
        postfix["eval"] = f"{eval_loss:.4f}"
    progress.update(postfix)
    return scalars


def train(cfg: ml_collections.ConfigDict) -> RunSummary:
    started = time.time()
    run = setup(cfg)
    t = cfg.train
    progress = _Progress(run, t.steps)
    state, last_train, last_eval, tokens = run.state, None, None, 0
    pending = None  # (step, metrics on device, dispatch time) of the step before
    last_time = time.time()

    def finish(pending_item):
        nonlocal last_train, tokens, last_time, last_eval
        step, m, _ = pending_item
        m = jax.device_get(m)
        if not m["finite"]:
            raise NonFiniteLoss(
                f"non-finite loss or gradient at step {step}, on the run's batch #{step} "
                f"(loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}); the update was "
                f"skipped, the last checkpoint "
                f"({run.checkpointer.latest_step()}) is intact. Lower optim.lr or check the data."
            )
        now = time.time()
        seconds, last_time = now - last_time, now
        tokens += int(m["tokens"])
        last_train = float(m["loss"])
        eval_loss = None
        if t.eval_every and (step % t.eval_every == 0 or step == t.steps):  # state is this step's
            eval_loss = last_eval = evaluate(run, state["params"])
        _log(run, step, m, seconds, progress, eval_loss)

    if t.eval_every and run.start_step == 0:  # the baseline the eval losses fall from
        last_eval = evaluate(run, state["params"])
        if last_eval is not None:
            run.writer.write(0, {"eval_loss": last_eval})
            if jax.process_index() == 0:
                print(f"eval loss before training: {last_eval:.4f}")
    try:
        for step in range(run.start_step + 1, t.steps + 1):
            batch = _device_batch(_host_layout(run, next(run.train_iter)), run.batch_sharding, t.micro_batches)
            with activation_sharding(run.mesh):
                state, m = run.train_step(state, batch)
            if pending is not None:
                finish(pending)  # step N-1's metrics, fetched after step N was dispatched
            pending = (step, m, time.time())
            is_eval = bool(t.eval_every) and step % t.eval_every == 0
            is_checkpoint = step % t.checkpoint_every == 0 or step == t.steps
            if is_eval or is_checkpoint:
                # Evaluate the state of this step, and never checkpoint a state whose loss is
                # not known to be finite.
                finish(pending)
                pending = None
            if is_checkpoint:
                run.checkpointer.save(step, state, run.train_iter, cfg.to_dict())
                run.writer.flush()  # metrics through this step, durable with it (object stores)
        run.checkpointer.wait()
        checkpoint_step = run.checkpointer.latest_step()
    finally:
        progress.close()
        run.writer.close()
        run.checkpointer.close()
    exported = _export(run, state) if t.export else None
    summary = RunSummary(t.steps - run.start_step, tokens, last_train, last_eval, time.time() - started,
                         storage.path(t.run_dir), checkpoint_step, exported)
    if jax.process_index() == 0:
        print(summary)
    return summary


def _export(run: Run, state: dict) -> Path:
    from flax import nnx

    graphdef, _, rest = state_lib.split_model(run.model)
    model = nnx.merge(graphdef, state["params"], rest)
    return export_model(model, export_dir(run.cfg), dtype=run.cfg.train.export_dtype or None,
                        aux_dir=run.cfg.model.path, overwrite=True)
