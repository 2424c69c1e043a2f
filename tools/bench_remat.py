"""Remat policies on one long-sequence train step: compiled temporary memory and step time.

    python tools/bench_remat.py [--seq 4096] [--hidden 256] [--layers 4] [--steps 2]

Memory is XLA's ``memory_analysis()`` of the compiled step (deterministic); time is wall per
step after one warm-up step on this machine's default device.
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx

from bench_step import one_device_step, random_batch, time_steps
from covenant_jax.config import ModelConfig
from covenant_jax.model.llama import REMAT_POLICIES, Llama, ModelOptions


def measure(cfg: ModelConfig, remat: str, seq: int, steps: int, attention: str) -> dict:
    model = Llama(cfg, ModelOptions(remat=remat, attention=attention), rngs=nnx.Rngs(0))
    fn, state = one_device_step(model, lr=1e-4, loss_chunk_size=512)
    batch = random_batch(cfg.vocab_size, rows=1, seq=seq)
    try:
        compiled = fn.lower(state, batch).compile()
    except Exception as e:  # e.g. offload on a platform without pinned host memory
        return {"remat": remat, "error": str(e).splitlines()[0][:80]}
    temp = compiled.memory_analysis().temp_size_in_bytes
    _, _, seconds = time_steps(compiled, state, batch, steps, warmup=1)
    return {"remat": remat, "temp_mib": temp / 2**20, "step_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--attention", default="blockwise")
    p.add_argument("--policies", default=",".join(REMAT_POLICIES))
    a = p.parse_args()
    cfg = ModelConfig.from_hf_dict(
        dict(
            model_type="llama",
            vocab_size=a.vocab,
            hidden_size=a.hidden,
            intermediate_size=4 * a.hidden,
            num_hidden_layers=a.layers,
            num_attention_heads=a.hidden // 64,
            num_key_value_heads=max(a.hidden // 256, 1),
            max_position_embeddings=a.seq,
        )
    )
    print(
        f"{jax.devices()[0].device_kind}: hidden {a.hidden}, {a.layers} layers, T={a.seq}, {a.attention} attention"
    )
    print("| remat | temp MiB | step s |\n|---|---:|---:|")
    for policy in a.policies.split(","):
        r = measure(cfg, policy, a.seq, a.steps, a.attention)
        print(
            f"| {policy} | {r['temp_mib']:.1f} | {r['step_s']:.2f} |"
            if "error" not in r
            else f"| {policy} | unsupported here: {r['error']} | |",
            flush=True,
        )


if __name__ == "__main__":
    main()
