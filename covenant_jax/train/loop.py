"""The training run: setup in named steps, then the step loop.

The loop dispatches step N before fetching step N-1's metrics, so logging never stalls the
device. Checkpoints save the state and the data iterator at the same step, only after that
step's loss, gradients and updated state are known finite; a NaN/inf stops the run naming the
step, and the last checkpoint stays good. Resuming checks the recipe against the checkpoint's
(:mod:`covenant_jax.train.resume`) before anything loads, and restores the newest intact step.
SIGTERM / SIGINT save the step all processes agree on and exit with ``EXIT_PREEMPTED``
(:mod:`covenant_jax.train.preemption`).

For ``train.objective="dpo"`` the reference model (``dpo.ref_model_path``, else a copy of the
starting model) either rides in the state as ``frozen`` (loaded from its folder on every start,
never checkpointed) or, with ``dpo.precompute_ref_log_probs``, scores every pair once before
training and is dropped. With LoRA the reference is the model's own frozen base with the
adapters off: no copy. Evaluation reports the objective's metrics (the DPO eval loss, rewards
and log-probs as TRL names them) over the whole held-out split.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from covenant_jax import storage
from covenant_jax.convert import peft_adapter
from covenant_jax.data import pipeline as data_pipeline
from covenant_jax.data.tokenizer import load_tokenizer
from covenant_jax.errors import NonFiniteLoss, UserError
from covenant_jax.model.llama import Llama
from covenant_jax.parallel.sharding import activation_sharding, make_mesh
from covenant_jax.train import (
    checkpoint,
    model_io,
    optimizer,
    precompute,
    preemption,
    preference,
    program,
    recipe,
    resume,
)
from covenant_jax.train import (
    metrics as metrics_lib,
)
from covenant_jax.train import state as state_lib


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
    preempted: bool = False  # stopped by SIGTERM/SIGINT after saving `checkpoint_step`

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
    objective: Any  # its report() turns an eval pass's sums into metrics
    fields: dict  # the batch's fields (padding batches)
    checkpointer: checkpoint.RunCheckpointer
    writer: metrics_lib.MetricsWriter
    start_step: int
    flops_per_token: float
    adapter: peft_adapter.Adapter | None = None  # the PEFT adapter the run continues


def _reference_copy(cfg, mesh, params: dict) -> dict | None:
    """DPO's reference weights on the mesh, sharded like ``params``: ``dpo.ref_model_path``'s, or
    a copy of the starting model's (a copy: the step donates the params; the params themselves
    when the reference only runs before training). None without DPO, and with LoRA, whose
    reference is its own frozen base with the adapters off."""
    if not program.is_dpo(cfg) or program.lora_config(cfg) is not None:
        return None
    if cfg.dpo.ref_model_path:
        return state_lib.split_model(model_io.load_recipe_model(cfg, mesh, path=cfg.dpo.ref_model_path))[1]
    return state_lib.copy_tree(params) if program.in_step_reference(cfg) else params


def _check_reference(cfg) -> None:
    if program.is_dpo(cfg) and cfg.dpo.ref_model_path:
        preference.check_reference(cfg.model.path, cfg.dpo.ref_model_path)


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
        storage.check_separate(cfg.model.path, model_io.export_dir(cfg), "the export folder")
        if cfg.model.lora.enabled and cfg.model.lora.export_merged:
            storage.check_separate(cfg.model.path, model_io.merged_dir(cfg), "the merged export folder")
    return run_dir


def _print0(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _check_resume(cfg: ml_collections.ConfigDict) -> None:
    """Refuses a resume that would not continue the saved run; reads only small JSON files."""
    directory = storage.path(cfg.train.run_dir) / "checkpoints"
    if not directory.is_dir():
        return
    reader = checkpoint.RunCheckpointer(directory, async_save=False, create=False)
    try:
        resume.check(cfg, reader.saved_config(), reader.latest_step(), directory)
    finally:
        reader.close()


def _restore(
    cfg, ckpt: checkpoint.RunCheckpointer, state: dict, shardings: dict, train_iter
) -> tuple[int, dict]:
    """(start step, state): the newest intact checkpoint's, or step 0 and the fresh state."""
    if not cfg.train.resume:
        return 0, state
    target = state_lib.abstract_like(state_lib.saved_part(state), state_lib.saved_part(shardings))
    step, restored = ckpt.restore_newest_intact(target, train_iter, log=_print0)
    if step is None:
        return 0, state
    _print0(f"resumed from {ckpt.directory} at step {step}")
    return step, state_lib.attach_frozen(restored, state)


def data_cache_dir(cfg: ml_collections.ConfigDict) -> str:
    """Where prepared samples are cached: data.cache_dir, else beside the run (RUN_DIR/data_cache)."""
    return cfg.data.cache_dir or os.fspath(storage.path(cfg.train.run_dir) / "data_cache")


def setup(cfg: ml_collections.ConfigDict) -> Run:
    recipe.check_fields(cfg)
    recipe.bound_samples_per_row(cfg)
    run_dir = check_outputs(cfg)
    _check_resume(cfg)
    adapter = model_io.recipe_adapter(cfg)
    _check_reference(cfg)
    mesh = make_mesh({k: v for k, v in cfg.mesh.to_dict().items()})
    model = model_io.load_recipe_model(cfg, mesh, adapter)
    recipe.validate(cfg, model.config, mesh.shape["data"] * mesh.shape["fsdp"], mesh.shape["context"])
    tokenizer = load_tokenizer(cfg.model.path)
    _check_vocab(tokenizer, model)
    graphdef, params, frozen, rest = state_lib.split_trained(model)
    reference = _reference_copy(cfg, mesh, params)
    if reference is not None:
        frozen_with_reference = {**(frozen or {}), "ref_params": reference}
    else:
        frozen_with_reference = frozen or {}
    data = data_pipeline.build_pipeline(
        cfg.data,
        tokenizer,
        cache_dir=data_cache_dir(cfg),
        annotate=_annotate(cfg, graphdef, rest, (params, frozen_with_reference), mesh, tokenizer),
    )
    if jax.process_index() == 0:
        print(data.report)
    tx, schedule = optimizer.make_optimizer(cfg.optim, cfg.train.steps)
    if program.holds_reference_copy(cfg):
        frozen = frozen_with_reference
    state, shardings = state_lib.create_state(params, tx, mesh, frozen)
    steps = program.make_steps(cfg, graphdef, rest, tx, schedule, shardings, mesh)
    train_step, eval_step, batch_sharding = steps.train_step, steps.eval_step, steps.batch_sharding
    storage.makedirs(run_dir)
    if jax.process_index() == 0:  # one writer
        (run_dir / "config.json").write_text(cfg.to_json_best_effort(indent=2) + "\n")
    ckpt = checkpoint.RunCheckpointer(
        run_dir / "checkpoints", cfg.train.keep_checkpoints, cfg.train.async_checkpoint
    )
    train_iter = iter(data.train)
    start, state = _restore(cfg, ckpt, state, shardings, train_iter)
    writer = metrics_lib.MetricsWriter(run_dir, start, enabled=jax.process_index() == 0)
    flops = program.flops_per_token(cfg, model.config)
    return Run(
        cfg,
        mesh,
        model,
        data,
        train_iter,
        state,
        shardings,
        train_step,
        eval_step,
        batch_sharding,
        steps.eval_sharding,
        steps.objective,
        steps.fields,
        ckpt,
        writer,
        start,
        flops,
        adapter,
    )


def _annotate(cfg, graphdef, rest, weights: tuple[dict, dict], mesh, tokenizer):
    """The data pipeline's hook that stores precomputed reference log-probs (the reference run
    on ``weights``: params and frozen arrays; cached beside the prepared samples), or None."""
    if not (program.is_dpo(cfg) and cfg.dpo.precompute_ref_log_probs):
        return None
    pad_id = cfg.data.pad_id if cfg.data.pad_id >= 0 else (tokenizer.pad_token_id or 0)
    reference = program.reference_forward(cfg, graphdef, rest)
    rows = cfg.data.batch_size // jax.process_count()
    return precompute.annotate_fn(
        cfg, reference, *weights, mesh, rows, pad_id, log=_print0, cache_dir=data_cache_dir(cfg)
    )


def _host_layout(run: "Run", batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return program.host_layout(run.cfg, run.mesh, batch)


def evaluate(run: Run, state: dict) -> dict[str, float] | None:
    """The objective's metrics (``loss`` among them) over the eval split, or None without one:
    sums over all eval rows (data.eval_mode "token_mean": the token mean for SFT, the DPO loss
    over all held-out pairs), or the loss transformers' Trainer.evaluate() reports ("trainer",
    SFT only, see _evaluate_like_trainer)."""
    if run.data.eval is None:
        return None
    if run.data.eval_mode == "trainer":
        loss = _evaluate_like_trainer(run, state)
        return None if loss is None else {"loss": loss}
    batches = itertools.islice(iter(run.data.eval), run.cfg.train.eval_batches or None)
    sums, totals = None, None
    while True:
        batch = next(batches, None)
        if jax.process_count() > 1:
            # Each process packs its own share of the eval rows, so their batch counts can
            # differ; all must run the same (collective) steps: go on while any has a batch,
            # the others feeding no-loss padding.
            from jax.experimental import multihost_utils

            if not multihost_utils.process_allgather(np.int32(batch is not None)).any():
                break
            batch = (
                program.padding_batch(
                    run.data.rows_per_process, run.data.seq_len, run.data.pad_id, run.fields
                )
                if batch is None
                else batch
            )
        elif batch is None:
            break
        sums, totals = _add(_eval_sums(run, state, batch), (sums, totals))
    if totals is None or not totals.get("pairs", totals["tokens"]):
        return None
    return {k: float(v) for k, v in run.objective.report(sums, totals).items()}


def _eval_sums(run: Run, state: dict, batch: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """The objective's (sums, totals) of one eval batch (this process's rows of it), as float64."""
    with activation_sharding(run.mesh):
        out = run.eval_step(
            state["params"],
            state.get("frozen", {}),
            program.device_batch(_host_layout(run, batch), run.eval_sharding, None),
        )
    return jax.tree.map(np.float64, out)


def _add(part: tuple, total: tuple) -> tuple:
    """``part + total`` leaf by leaf; ``part`` while ``total`` is still (None, None)."""
    return part if total[1] is None else jax.tree.map(np.add, part, total)


def _evaluate_like_trainer(run: Run, state: dict) -> float | None:
    """What transformers' Trainer.evaluate() reports (and Gradients' validator scores): each
    eval batch's token mean, averaged over the batches weighted by their rows (Trainer repeats
    a batch's loss per row, and accelerate's gather_for_metrics cuts the last batch's repeats to
    its rows); batches whose mean is not finite left out (logging_nan_inf_filter). The pipeline
    forms the batches (TrainerEval); each may take several device batches, summed before the mean."""
    means, weights = [], []
    for rows, batches in itertools.islice(iter(run.data.eval), run.cfg.train.eval_batches or None):
        sums, totals = None, None
        for b in batches:
            sums, totals = _add(_eval_sums(run, state, b), (sums, totals))
        means.append(
            float(run.objective.report(sums, totals)["loss"]) if totals and totals["tokens"] else float("nan")
        )
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


_NOT_LOGGED = ("tokens", "finite", "state_finite")  # per-step bookkeeping, not scalars


def _log(run: Run, step: int, m: dict, seconds: float, progress: _Progress, evaluated: dict | None) -> dict:
    tokens_per_s = float(m["tokens"]) / max(seconds, 1e-9)
    scalars = {k: v for k, v in m.items() if k not in _NOT_LOGGED}
    scalars.update(tokens_per_s=tokens_per_s, step_time_s=seconds)
    eval_loss = None if evaluated is None else evaluated["loss"]
    peak = metrics_lib.peak_flops_per_device(run.cfg.train.peak_tflops_per_device)
    # MFU over all rows, padding included: the device computes them.
    row_tokens = run.cfg.data.batch_size * run.cfg.data.seq_len
    if peak:
        scalars["mfu"] = run.flops_per_token * row_tokens / seconds / (peak * jax.device_count())
    if evaluated is not None:
        scalars.update(eval_scalars(evaluated))
    if step % run.cfg.train.log_every == 0 or eval_loss is not None:
        run.writer.write(step, scalars)
    postfix = {"loss": f"{float(m['loss']):.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
    if "mfu" in scalars:
        postfix["mfu"] = f"{scalars['mfu']:.1%}"
    if eval_loss is not None:
        postfix["eval"] = f"{eval_loss:.4f}"
    progress.update(postfix)
    return scalars


def eval_scalars(evaluated: dict) -> dict:
    """Eval metrics as logged: ``eval_loss``, ``eval_rewards/accuracies``, ... (TRL's names)."""
    return {f"eval_{k}": v for k, v in evaluated.items() if k not in ("tokens", "pairs")}


def _non_finite(run: Run, step: int, m: dict) -> NonFiniteLoss:
    """The error for a step whose loss, gradients or updated state are not finite."""
    run.checkpointer.wait()  # an in-flight save of an earlier (checked) step completes first
    latest = run.checkpointer.latest_step()
    kept = (
        f"the last checkpoint ({latest}) is intact"
        if latest is not None
        else "no checkpoint has been written"
    )
    values = f"loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}"
    if not m["finite"]:
        return NonFiniteLoss(
            f"non-finite loss or gradient at step {step}, on the run's batch #{step} ({values}); "
            f"the update was skipped, {kept}. Lower optim.lr or check the data."
        )
    return NonFiniteLoss(
        f"non-finite parameters or optimizer state after the update of step {step} ({values}): "
        f"the run stops and this state is not saved; {kept}. Lower optim.lr or set optim.clip_norm."
    )


def _stopped(run: Run, stop: preemption.StopRequest, step: int) -> None:
    if jax.process_index() == 0:
        print(
            f"covenant-jax: stopped by {stop.describe()} after step {step}: checkpoint saved in "
            f"{run.checkpointer.directory / str(step)}; rerun the same command to resume "
            f"(exit code {preemption.EXIT_PREEMPTED})",
            file=sys.stderr,
            flush=True,
        )


def train(cfg: ml_collections.ConfigDict) -> RunSummary:
    """Trains (or resumes) the recipe; returns early, ``preempted``, after SIGTERM / SIGINT."""
    with preemption.StopRequest() as stop:
        return _train(cfg, stop)


def _train(cfg: ml_collections.ConfigDict, stop: preemption.StopRequest) -> RunSummary:
    started = time.time()
    run = setup(cfg)
    t = cfg.train
    progress = _Progress(run, t.steps)
    state, last_train, last_eval, tokens = run.state, None, None, 0
    pending = None  # (step, metrics on device, dispatch time) of the step before
    last_time = time.time()
    stopped_at = None

    def finish(pending_item):
        nonlocal last_train, tokens, last_time, last_eval
        step, m, _ = pending_item
        m = jax.device_get(m)
        if not (m["finite"] and m["state_finite"]):
            raise _non_finite(run, step, m)
        now = time.time()
        seconds, last_time = now - last_time, now
        tokens += int(m["tokens"])
        last_train = float(m["loss"])
        evaluated = None
        if t.eval_every and (step % t.eval_every == 0 or step == t.steps):  # state is this step's
            evaluated = evaluate(run, state)
            last_eval = None if evaluated is None else evaluated["loss"]
        _log(run, step, m, seconds, progress, evaluated)

    if t.eval_every and run.start_step == 0:  # the baseline the eval losses fall from
        evaluated = evaluate(run, state)
        if evaluated is not None:
            last_eval = evaluated["loss"]
            run.writer.write(0, eval_scalars(evaluated))
            if jax.process_index() == 0:
                accuracy = evaluated.get("rewards/accuracies")
                print(
                    f"eval loss before training: {last_eval:.4f}"
                    + ("" if accuracy is None else f" (rewards/accuracies {accuracy:.3f})")
                )
    try:
        for step in range(run.start_step + 1, t.steps + 1):
            batch = program.device_batch(
                _host_layout(run, next(run.train_iter)), run.batch_sharding, t.micro_batches
            )
            with activation_sharding(run.mesh):
                state, m = run.train_step(state, batch)
            if pending is not None:
                finish(pending)  # step N-1's metrics, fetched after step N was dispatched
            pending = (step, m, time.time())
            stopping = stop.agreed(step)  # every step, on every process
            is_eval = bool(t.eval_every) and step % t.eval_every == 0
            is_checkpoint = step % t.checkpoint_every == 0 or step == t.steps or stopping
            if is_eval or is_checkpoint:
                # Evaluate the state of this step, and never checkpoint a state that is not
                # known to be finite.
                finish(pending)
                pending = None
            if is_checkpoint:
                run.checkpointer.save(step, state_lib.saved_part(state), run.train_iter, cfg.to_dict())
                run.writer.flush()  # metrics through this step, durable with it (object stores)
            if stopping:
                stopped_at = step
                break
        run.checkpointer.wait()
        checkpoint_step = run.checkpointer.latest_step()
    finally:
        progress.close()
        run.writer.close()
        run.checkpointer.close()
    if stopped_at is not None:
        _stopped(run, stop, stopped_at)
        return RunSummary(
            stopped_at - run.start_step,
            tokens,
            last_train,
            last_eval,
            time.time() - started,
            storage.path(t.run_dir),
            checkpoint_step,
            None,
            preempted=True,
        )
    exported = _export(run, state) if t.export else None
    summary = RunSummary(
        t.steps - run.start_step,
        tokens,
        last_train,
        last_eval,
        time.time() - started,
        storage.path(t.run_dir),
        checkpoint_step,
        exported,
    )
    if jax.process_index() == 0:
        print(summary)
    return summary


def _export(run: Run, state: dict) -> Path:
    """The HF export; with LoRA, the PEFT adapter (and, if asked, the merged weights)."""
    cfg = run.cfg
    graphdef, _, _, rest = state_lib.split_trained(run.model)
    model = state_lib.merge_trained(graphdef, state["params"], state.get("frozen"), rest)
    merged = model_io.merged_dir(cfg) if cfg.model.lora.enabled and cfg.model.lora.export_merged else None
    source = run.adapter.raw_config if run.adapter else None
    return model_io.write_exports(cfg, model, model_io.export_dir(cfg), merged, source_config=source)
