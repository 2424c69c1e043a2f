"""What a person and a script see: progress bar, metrics.jsonl, TensorBoard, MFU estimate."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax

from covenant_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per chip, for the MFU estimate (None: unknown, MFU not shown).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6·N (matmul params, lm_head included, embedding lookup not) + 12·L·N_heads·H·T (attention)."""
    matmul_params = cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 6 * matmul_params + attention


class MetricsWriter:
    """One JSON object per logged step in RUN_DIR/metrics.jsonl, the same scalars in TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: float(v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        for key, value in scalars.items():
            self.tb.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
