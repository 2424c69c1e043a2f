#!/usr/bin/env python
"""LoRA vs full fine-tuning of SmolLM2-135M-Instruct on the same ShareGPT data, same machine.

Runs configs/smollm2_sft_cpu.py (every weight trained) and configs/smollm2_lora_cpu.py (rank-8
adapters on a frozen base: the same data, batch and steps) one after the other through the
trainer, each into a fresh run dir, and prints one table: trained parameters, the size of one
checkpoint and of the export, the median step time (step 1, which compiles, left out) and the
eval loss before and after.

    python tools/fetch_material.py --what smollm2,sharegpt
    python tools/bench_lora.py [--variant runlocal] [--out /tmp/bench_lora]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = {"full": "configs/smollm2_sft_cpu.py", "lora": "configs/smollm2_lora_cpu.py"}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(name: str, recipe: str, variant: str, out: Path) -> dict:
    """Trains ``recipe`` into ``out / name`` and reads back what the table shows."""
    import jax

    from covenant_jax.cli import load_recipe
    from covenant_jax.train import loop
    from covenant_jax.train.checkpoint import RunCheckpointer

    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_recipe(f"{recipe}:{variant}" if variant else recipe,
                      [f"--config.train.run_dir={run_dir}", "--config.train.keep_checkpoints=1"])
    summary = loop.train(cfg)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > 1]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    step_dir = run_dir / "checkpoints" / str(summary.checkpoint_step)
    state = RunCheckpointer(run_dir / "checkpoints").read_state(summary.checkpoint_step)
    exports = [run_dir / "export"] + ([run_dir / "export_merged"] if (run_dir / "export_merged").exists() else [])
    return {"run": name, "trained_params": sum(x.size for x in jax.tree.leaves(state["params"])),
            "optimizer_values": sum(x.size for x in jax.tree.leaves(state["opt_state"])),
            "checkpoint_bytes": folder_bytes(step_dir), "export_bytes": folder_bytes(exports[0]),
            "step_time_s": statistics.median(times), "steps": summary.steps,
            "eval_loss_before": evals[0], "eval_loss_after": evals[-1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="", help="recipe variant of both, e.g. runlocal")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_lora"))
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = [measure(name, recipe, args.variant, args.out) for name, recipe in RECIPES.items()]
    print(f"{'run':5} {'trained params':>15} {'optimizer values':>17} {'checkpoint':>11} {'export':>10} "
          f"{'step time':>10} {'eval loss':>16}")
    for r in rows:
        print(f"{r['run']:5} {r['trained_params']:>15,} {r['optimizer_values']:>17,} "
              f"{r['checkpoint_bytes'] / 1e6:>9.1f}MB {r['export_bytes'] / 1e6:>8.1f}MB "
              f"{r['step_time_s']:>9.2f}s {r['eval_loss_before']:>7.4f} -> {r['eval_loss_after']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
