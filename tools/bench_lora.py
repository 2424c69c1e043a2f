#!/usr/bin/env python
"""LoRA vs full fine-tuning of SmolLM2-135M-Instruct on the same ShareGPT data, same machine.

Runs configs/smollm2_sft_cpu.py (every weight trained) and configs/smollm2_lora_cpu.py (rank-8
adapters on a frozen base: the same data, batch and steps) one after the other through the
trainer, each into a fresh run dir, and prints one table: trained parameters, the size of one
checkpoint and of the export, the median step time (step 1, which compiles, left out) and the
eval loss before and after.

    python tools/fetch_material.py --what smollm2,sharegpt
    python tools/bench_lora.py [--variant runlocal] [--out /tmp/bench_lora] [--json rows.json]
    python tools/bench_lora.py --runs lora --json rows.json    # one run at a time, one table
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPE_MODEL = "material/smollm2-135m-instruct"
RECIPES = {"full": "configs/smollm2_sft_cpu.py", "lora": "configs/smollm2_lora_cpu.py"}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def train(recipe: str, variant: str, run_dir: Path) -> None:
    from covenant_jax.cli import load_recipe
    from covenant_jax.train import loop

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_recipe(
        f"{recipe}:{variant}" if variant else recipe,
        [f"--config.train.run_dir={run_dir}", "--config.train.keep_checkpoints=1"],
    )
    loop.train(cfg)


def read_run(name: str, run_dir: Path) -> dict:
    """The table's row of a finished run: its metrics, newest checkpoint and export."""
    import jax

    from covenant_jax.train.checkpoint import RunCheckpointer

    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > 1]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    step = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    state = RunCheckpointer(run_dir / "checkpoints").read_state(step)
    return {
        "run": name,
        "trained_params": sum(x.size for x in jax.tree.leaves(state["params"])),
        "optimizer_values": sum(x.size for x in jax.tree.leaves(state["opt_state"])),
        "checkpoint_bytes": folder_bytes(run_dir / "checkpoints" / str(step)),
        "export_bytes": folder_bytes(run_dir / "export"),
        "step_time_s": statistics.median(times),
        "steps": step,
        "eval_loss_before": evals[0],
        "eval_loss_after": evals[-1],
    }


def step_times(model_dir: str, rows: int, seq_len: int, rounds: int) -> dict[str, tuple[float, float]]:
    """(median seconds, XLA's flop count) of one jitted AdamW step, full fine-tuning vs LoRA (rank 8 on every
    projection), on ``model_dir``'s shapes (random weights: the time does not depend on them),
    alternating the two round by round so both see the same load on a shared machine."""
    import jax
    import optax
    from flax import nnx

    from covenant_jax.convert.api import folder_config
    from covenant_jax.model.llama import Llama, ModelOptions
    from covenant_jax.model.lora import LoraConfig
    from covenant_jax.parallel.sharding import make_mesh
    from covenant_jax.train import state as state_lib, step as step_lib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_step import random_batch

    model_cfg, _ = folder_config(model_dir)
    batch = random_batch(model_cfg.vocab_size, rows, seq_len)
    runs, flops = {}, {}
    for name, lora in (("full", None), ("lora", LoraConfig(rank=8, alpha=16.0))):
        model = Llama(model_cfg, ModelOptions(lora=lora), rngs=nnx.Rngs(0))
        graphdef, params, frozen, rest = state_lib.split_trained(model)
        tx = optax.adamw(1e-4)
        state, _ = state_lib.create_state(params, tx, make_mesh(devices=jax.devices()[:1]), frozen)
        loss_fn = step_lib.make_loss_fn(graphdef, rest, chunk_size=seq_len)
        step = jax.jit(step_lib.make_train_step(loss_fn, tx, optax.constant_schedule(1e-4)), donate_argnums=0)
        cost = step.lower(state, batch).compile().cost_analysis()
        flops[name] = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        runs[name] = [step, state, []]
    for _ in range(rounds):
        for run in runs.values():
            started = time.perf_counter()
            run[1], metrics = run[0](run[1], batch)
            jax.block_until_ready(metrics)
            run[2].append(time.perf_counter() - started)
    return {name: (statistics.median(run[2]), flops[name]) for name, run in runs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="", help="recipe variant of both, e.g. runlocal")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_lora"))
    ap.add_argument("--runs", default=",".join(RECIPES), help="which runs (default: %(default)s)")
    ap.add_argument(
        "--step-rounds",
        type=int,
        default=0,
        help="also time the bare step, full vs LoRA alternating, this many rounds (batch 4 x 256)",
    )
    ap.add_argument("--reuse", action="store_true", help="read finished runs in --out instead of training")
    ap.add_argument("--json", type=Path, help="rows are kept here: a run not in --runs is read back")
    args = ap.parse_args(argv)
    wanted = [r for r in args.runs.split(",") if r]
    if set(wanted) - set(RECIPES):
        ap.error(f"--runs: choose from {list(RECIPES)}")
    kept = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    rows = [r for r in kept if r["run"] not in wanted]
    for name in wanted:
        if not args.reuse:
            train(RECIPES[name], args.variant, args.out / name)
        rows.append(read_run(name, args.out / name))
    rows.sort(key=lambda r: list(RECIPES).index(r["run"]))
    print(
        f"{'run':5} {'trained params':>15} {'optimizer values':>17} {'checkpoint':>11} {'export':>10} "
        f"{'step time':>10} {'eval loss':>16}"
    )
    for r in rows:
        print(
            f"{r['run']:5} {r['trained_params']:>15,} {r['optimizer_values']:>17,} "
            f"{r['checkpoint_bytes'] / 1e6:>9.1f}MB {r['export_bytes'] / 1e6:>8.1f}MB "
            f"{r['step_time_s']:>9.2f}s {r['eval_loss_before']:>7.4f} -> {r['eval_loss_after']:.4f}"
        )
    if args.step_rounds:
        times = step_times(RECIPE_MODEL, 4, 256, args.step_rounds)
        for r in rows:
            r["bare_step_s"], r["step_flops"] = times[r["run"]]
        print(
            "bare step (median of alternating rounds; XLA's flops): "
            + ", ".join(f"{k} {t:.2f}s ({f / 1e12:.2f} TFLOP)" for k, (t, f) in times.items())
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
