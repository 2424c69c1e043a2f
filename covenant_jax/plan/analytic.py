"""Memory per device from a formula, for targets this host cannot compile for (GPUs: CUDA
ahead-of-time compilation needs a GPU host). Labelled an estimate wherever it is shown."""

from __future__ import annotations

import numpy as np

from covenant_jax.config import ModelConfig
from covenant_jax.plan.checks import abstract_mesh
from covenant_jax.plan.compile import Memory, device_bytes
from covenant_jax.train import program


def estimate_memory(cfg, model_cfg: ModelConfig, sizes: dict[str, int]) -> Memory:
    """Parameter, optimizer, frozen-weight and float32 gradient bytes per device are exact (the
    training run's shardings, on a mesh of ``sizes`` without devices); activations come from a formula (saved
    layer inputs / projections per remat policy, one layer's working set, the loss chunk)."""
    state = program.abstract_state(cfg, model_cfg, abstract_mesh(sizes)).state
    params, opt_state = device_bytes(state["params"]), device_bytes(state["opt_state"])
    frozen = device_bytes(state.get("frozen", {}))
    grads = params // np.dtype(cfg.model.param_dtype).itemsize * 4  # float32 accumulation
    b = cfg.data.batch_size // cfg.train.micro_batches // (sizes["data"] * sizes["fsdp"])
    t = cfg.data.seq_len // sizes["context"]
    temporaries = int(_activation_bytes(cfg, model_cfg, b, t, sizes["tensor"]) + grads)
    held = params + opt_state + frozen
    args = held + 5 * 4 * b * t * cfg.train.micro_batches
    return Memory(
        args, held, held, temporaries, 0, args + temporaries, params, opt_state, frozen, estimate=True
    )


def _activation_bytes(cfg, model_cfg: ModelConfig, b: int, t: int, tp: int) -> float:
    """One micro-batch of ``b`` rows x ``t`` tokens per device, tensor split ``tp``."""
    c = np.dtype(cfg.model.dtype).itemsize
    d, f, layers = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_hidden_layers
    n, k = model_cfg.num_attention_heads, model_cfg.num_key_value_heads
    qkv = (n + 2 * k) * model_cfg.head_dim
    per_token_dots = (qkv + n * model_cfg.head_dim) / tp + 2 * d + 3 * f / tp
    saved_per_layer = {
        "full": d,
        "save_dots": d + per_token_dots,
        "offload": d,
        "none": d + 2 * per_token_dots,
    }[cfg.model.remat]
    working = 3 * per_token_dots  # one layer's forward + backward intermediates
    attention = 0
    if cfg.model.attention == "naive":
        attention = 2 * (n // tp if n % tp == 0 else n) * t * t * 4 * b
    loss = 3 * min(cfg.train.loss_chunk_size, b * t) * (model_cfg.vocab_size / tp) * 4
    return b * t * c * (saved_per_layer * layers + working) + attention + loss
