"""Remat policies on one long-sequence train step: compiled temporary memory and step time.

    python tools/bench_remat.py [--seq 4096] [--hidden 256] [--layers 4] [--steps 2]

Memory is XLA's ``memory_analysis()`` of the compiled step (deterministic); time is wall per
step after one warm-up step on this machine's default device.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from flax import nnx

from covenant_jax.config import ModelConfig
from covenant_jax.model.llama import REMAT_POLICIES, Llama, ModelOptions
from covenant_jax.parallel.sharding import make_mesh
from covenant_jax.train import state as state_lib, step as step_lib


def measure(cfg: ModelConfig, remat: str, seq: int, steps: int, attention: str) -> dict:
    model = Llama(cfg, ModelOptions(remat=remat, attention=attention), rngs=nnx.Rngs(0))
    graphdef, params, rest = state_lib.split_model(model)
    tx = optax.adamw(1e-4)
    state, _ = state_lib.create_state(params, tx, make_mesh(devices=jax.devices()[:1]))
    fn = jax.jit(step_lib.make_train_step(step_lib.make_loss_fn(graphdef, rest, 512), tx,
                                          optax.constant_schedule(1e-4)), donate_argnums=0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 1, seq)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, -1), "loss_mask": np.ones(tokens.shape, np.float32),
             "segment_ids": np.ones_like(tokens), "positions": np.arange(seq, dtype=np.int32)[None, None]}
    try:
        compiled = fn.lower(state, batch).compile()
    except Exception as e:  # e.g. offload on a platform without pinned host memory
        return {"remat": remat, "error": str(e).splitlines()[0][:80]}
    temp = compiled.memory_analysis().temp_size_in_bytes
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    return {"remat": remat, "temp_mib": temp / 2**20, "step_s": (time.perf_counter() - start) / steps}


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
    cfg = ModelConfig.from_hf_dict(dict(
        model_type="llama", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
        num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=max(a.hidden // 256, 1),
        max_position_embeddings=a.seq))
    print(f"{jax.devices()[0].device_kind}: hidden {a.hidden}, {a.layers} layers, T={a.seq}, {a.attention} attention")
    print("| remat | temp MiB | step s |\n|---|---:|---:|")
    for policy in a.policies.split(","):
        r = measure(cfg, policy, a.seq, a.steps, a.attention)
        print(f"| {policy} | {r['temp_mib']:.1f} | {r['step_s']:.2f} |" if "error" not in r
              else f"| {policy} | unsupported here: {r['error']} | |", flush=True)


if __name__ == "__main__":
    main()
