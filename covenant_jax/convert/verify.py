"""Parity check: transformers (PyTorch, CPU) and covenant_jax on the same tokens.

The reference is whatever ``AutoModelForCausalLM`` makes of the HF folder, so this checks the
whole chain (config reading, key map, RoPE, attention) rather than our own assumptions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from covenant_jax.convert.api import load_model
from covenant_jax.config import ModelConfig
from covenant_jax.errors import RecipeError, require
from covenant_jax.model.llama import ModelOptions

# Allowed max |Δlogits| = atol + rtol * max |reference logits|, per compute dtype. The rtol term
# admits float32 summation-order noise on real models, whose logits reach ~30 (SmolLM2: 1.4e-4).
DEFAULT_TOLERANCE = {"float32": (1e-4, 1e-5), "bfloat16": (0.05, 2e-2), "float16": (1e-2, 2e-3)}


@dataclasses.dataclass
class Parity:
    max_abs: float
    max_rel: float  # max_abs / max |reference logits|
    kl: float  # mean KL(reference || ours) per token, in nats
    tolerance: float  # on max_abs

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance

    def report(self) -> str:
        verdict = "OK" if self.ok else "FAIL"
        return (f"max |Δlogits| {self.max_abs:.3e}  max rel {self.max_rel:.3e}  KL {self.kl:.3e}  "
                f"(tolerance {self.tolerance:.1e}): {verdict}")


def reference_logits(hf_dir: str | Path, tokens: np.ndarray, dtype: str) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=getattr(torch, dtype), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def compare(ref: np.ndarray, ours: np.ndarray, dtype: str = "float32", tolerance: float | None = None) -> Parity:
    ref, ours = ref.astype(np.float64), ours.astype(np.float64)
    if tolerance is None:
        atol, rtol = DEFAULT_TOLERANCE[dtype]
        tolerance = atol + rtol * float(np.abs(ref).max())
    diff = np.abs(ref - ours)
    log_p = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    log_q = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    return Parity(float(diff.max()), float(diff.max() / max(np.abs(ref).max(), 1e-12)), kl, tolerance)


def _check_shape(model_dir: str | Path, batch: int, seq_len: int) -> None:
    """Before anything is loaded: a shape the model can run (a huge one would try to allocate it)."""
    max_positions = ModelConfig.from_json_file(Path(model_dir) / "config.json").max_position_embeddings
    if not 1 <= seq_len <= max_positions:
        raise RecipeError(f"--seq-len {seq_len}: must be in [1, {max_positions}] (the model's "
                          "max_position_embeddings)")
    if batch < 1:
        raise RecipeError(f"batch {batch} must be >= 1")


def verify(hf_dir: str | Path, ckpt_dir: str | Path | None = None, *, dtype: str = "float32",
           batch: int = 2, seq_len: int = 64, seed: int = 0, tolerance: float | None = None) -> Parity:
    """Logits of the HF folder under transformers vs. ours (from ``ckpt_dir`` or the same folder)."""
    require("torch", "verify (transformers' PyTorch model is the reference)")
    _check_shape(ckpt_dir or hf_dir, batch, seq_len)
    model = load_model(ckpt_dir or hf_dir, ModelOptions(param_dtype=dtype, dtype=dtype))
    tokens = np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, seq_len))
    ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    ref = reference_logits(hf_dir, tokens, dtype)
    return compare(ref, ours, dtype, tolerance)
