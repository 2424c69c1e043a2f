"""Training-step throughput: covenant_jax vs HF transformers (eager sdpa, torch.compile), same GPU.

Llama-3.2-1B shapes (hidden 2048, 16 layers, 32/8 heads, ffn 8192, vocab 128256, tied), bf16
params and compute, AdamW, random tokens. Each contender x shape runs in its own subprocess
(clean peak-memory counters), warms up, then times ``--steps`` steps. Prints one table.

    # the prepared GPU command (one H100/H200), ~6 minutes:
    python tools/bench_train.py --json bench_train.json
    # a CPU smoke run of the harness itself:
    python tools/bench_train.py --tiny --shapes 2x128 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
TINY = dict(
    LLAMA_1B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
CONTENDERS = ("covenant_jax", "hf_eager", "hf_compile")


def flops_per_token(cfg: dict, seq_len: int) -> float:
    d, f, v, l = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    n, k, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    matmul = l * (d * h * (2 * n + 2 * k) + 3 * d * f) + v * d
    return 6 * matmul + 12 * l * n * h * seq_len


def run_covenant_jax(cfg: dict, batch: int, seq: int, steps: int, remat: str) -> dict:
    import jax
    from flax import nnx

    from bench_step import one_device_step, random_batch, time_steps
    from covenant_jax.config import ModelConfig
    from covenant_jax.model.llama import Llama, ModelOptions

    gpu = jax.devices()[0].platform == "gpu"
    opts = ModelOptions(
        param_dtype="bfloat16", dtype="bfloat16", remat=remat, attention="cudnn" if gpu else "blockwise"
    )
    model_cfg = ModelConfig.from_hf_dict({**cfg, "model_type": "llama"})
    model = nnx.jit(lambda: Llama(model_cfg, opts, rngs=nnx.Rngs(0)))()
    step, state = one_device_step(model, lr=1e-5, loss_chunk_size=4096)
    data = jax.device_put(random_batch(cfg["vocab_size"], rows=batch, seq=seq))
    _, metrics, seconds = time_steps(step, state, data, steps, warmup=2)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "step_s": seconds,
        "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "device": jax.devices()[0].device_kind,
        "loss": float(metrics["loss"]),
    }


def run_hf(cfg: dict, batch: int, seq: int, steps: int, compiled: bool, remat: str) -> dict:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = transformers.LlamaConfig(**cfg)
    model = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    if remat != "none":
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    forward = torch.compile(model) if compiled else model
    tokens = torch.randint(0, cfg["vocab_size"], (batch, seq), device=device)

    def one_step():
        loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):
        one_step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"step_s": seconds, "peak_gib": peak, "device": kind, "loss": float(loss)}


def child(args) -> None:
    cfg = TINY if args.tiny else LLAMA_1B
    batch, seq = (int(x) for x in args.shape.split("x"))
    remat = args.remat if seq > 8192 or args.remat_all else "none"
    if args.contender == "covenant_jax":
        out = run_covenant_jax(cfg, batch, seq, args.steps, remat if remat != "none" else "none")
    else:
        out = run_hf(cfg, batch, seq, args.steps, args.contender == "hf_compile", remat)
    tokens = batch * seq
    peak = next((v for k, v in PEAK_BF16.items() if k in out["device"]), None)
    out.update(
        contender=args.contender,
        shape=args.shape,
        remat=remat,
        tokens_per_s=tokens / out["step_s"],
        mfu=(flops_per_token(cfg, seq) * tokens / out["step_s"] / peak) if peak else None,
    )
    print("RESULT " + json.dumps(out), flush=True)


def table(results: list[dict]) -> str:
    lines = [
        "| contender | shape | remat | step s | tokens/s | MFU | peak GiB | device |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['contender']} | {r['shape']} | | failed: {r['error'][:60]} | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
        lines.append(
            f"| {r['contender']} | {r['shape']} | {r['remat']} | {r['step_s']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {mfu} | {r['peak_gib']:.1f} | {r['device']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--shapes", default="4x2048,1x32768", help="BATCHxSEQ list")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--remat", default="full", help="policy for sequences > 8192 (covenant_jax name)")
    parser.add_argument("--remat-all", action="store_true", help="use --remat at every shape")
    parser.add_argument("--tiny", action="store_true", help="tiny model: a CPU smoke run of the harness")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    results = []
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    for shape in args.shapes.split(","):
        for contender in args.contenders.split(","):
            cmd = (
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "--contender",
                    contender,
                    "--shape",
                    shape,
                    "--steps",
                    str(args.steps),
                    "--remat",
                    args.remat,
                ]
                + (["--tiny"] if args.tiny else [])
                + (["--remat-all"] if args.remat_all else [])
            )
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                results.append(
                    json.loads(lines[-1][7:])
                    if lines
                    else {
                        "contender": contender,
                        "shape": shape,
                        "error": (proc.stderr or "no output")[-300:],
                    }
                )
            except subprocess.TimeoutExpired:
                results.append({"contender": contender, "shape": shape, "error": "timeout"})
            print(table(results[-1:]).splitlines()[-1], flush=True)
    print("\n" + table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
