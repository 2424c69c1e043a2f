"""Parity check: covenant_jax's logits against transformers', both measured from float64.

transformers in float32 or bfloat16 is not exact either (SmolLM2-135M, 1024 random tokens: its
float32 logits are up to 5.9e-4 from its float64 ones, its bfloat16 logits up to 6.8), so a fixed
tolerance either fails healthy models or passes broken ones. ``verify`` runs the same tokens
three times -- transformers in float64 (the reference), transformers in the checked dtype, and
ours in the checked dtype -- and passes when ours is no farther from the reference than
``FACTOR`` x transformers' own distance (+ ``FLOOR`` x mean |logits|, for models where that is ~0).

The distance is the mean |Δlogits|. The max is printed too but is not the test: it sits at a few
ill-conditioned positions where equally valid summation orders differ by an order of magnitude
(SmolLM2 at 1024 tokens, position 604: transformers 2.2e-4, ours on one device 4.6e-4, ours
sharded over 8 devices 2.6e-3), while the mean agrees within 25% (9.0e-6, 1.1e-5, 9.1e-6). The
reference is whatever ``AutoModelForCausalLM`` makes of the HF folder, so this checks the whole
chain (config reading, key map, RoPE, attention), not our own assumptions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from covenant_jax.convert.api import load_model
from covenant_jax.config import ModelConfig
from covenant_jax.errors import RecipeError, require
from covenant_jax.model.llama import ModelOptions

FACTOR = 2.0  # ours may be at most this many times farther from float64 than transformers itself
FLOOR = 1e-7  # x mean |reference logits| (about float32's epsilon): the limit when transformers is exact
_CHUNK = 256  # positions compared at a time (logits are [B, T, vocab])


@dataclasses.dataclass
class Distance:
    """How far one set of logits is from the float64 reference."""

    mean: float  # mean |Δlogits|: the one verify tests
    max: float  # max |Δlogits|: shown, not tested (see the module docstring)
    kl: float  # mean KL(float64 reference || these) per token, in nats


@dataclasses.dataclass
class Parity:
    ours: Distance
    transformers: Distance  # transformers in the checked dtype
    limit: float  # the largest ``ours.mean`` that passes
    dtype: str
    rule: str  # how ``limit`` was set

    @property
    def ok(self) -> bool:
        return self.ours.mean <= self.limit

    def report(self) -> str:
        verdict = "OK" if self.ok else "FAIL"
        o, t = self.ours, self.transformers
        return (
            f"{self.dtype}: mean |Δlogits| from transformers float64: ours {o.mean:.3e}, transformers "
            f"{t.mean:.3e}; limit {self.limit:.3e} ({self.rule}): {verdict}  "
            f"[max |Δlogits| ours {o.max:.3e}, transformers {t.max:.3e}; KL ours {o.kl:.2e}, "
            f"transformers {t.kl:.2e}]"
        )


def random_tokens(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, seq_len))


def reference_logits(hf_dir: str | Path, tokens: np.ndarray, dtype: str) -> np.ndarray:
    """transformers' logits (eager attention) in ``dtype``; float64 stays float64, else float32."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=getattr(torch, dtype), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens)).logits
    del model
    gc.collect()
    return logits.numpy() if dtype == "float64" else logits.float().numpy()


def our_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Float32 matmuls at full precision when checking float32: on GPUs JAX's default is TF32, on
    TPUs bfloat16 passes, neither of which transformers' CPU float32 uses."""
    full = model.options.dtype == "float32"
    with jax.default_matmul_precision("highest") if full else contextlib.nullcontext():
        return np.asarray(model(jnp.asarray(tokens, jnp.int32)))


def distance(reference: np.ndarray, other: np.ndarray) -> Distance:
    """Mean / max |Δ| and mean KL, a chunk of positions at a time (float64 [B, T, vocab] copies
    of a long sequence would cost GBs)."""
    total_abs, largest, total_kl = 0.0, 0.0, 0.0
    for b in range(reference.shape[0]):
        for s in range(0, reference.shape[1], _CHUNK):
            p, q = (
                reference[b, s : s + _CHUNK].astype(np.float64),
                other[b, s : s + _CHUNK].astype(np.float64),
            )
            diff = np.abs(q - p)
            total_abs, largest = total_abs + float(diff.sum()), max(largest, float(diff.max()))
            log_p = p - np.logaddexp.reduce(p, axis=-1, keepdims=True)
            log_q = q - np.logaddexp.reduce(q, axis=-1, keepdims=True)
            total_kl += float(np.sum(np.exp(log_p) * (log_p - log_q)))
    tokens = reference.shape[0] * reference.shape[1]
    return Distance(total_abs / reference.size, largest, total_kl / tokens)


def compare(
    exact: np.ndarray,
    theirs: np.ndarray,
    ours: np.ndarray,
    dtype: str,
    *,
    factor: float = FACTOR,
    tolerance: float | None = None,
) -> Parity:
    """``exact``: transformers float64; ``theirs``: transformers in ``dtype``; ``ours``: ours in
    ``dtype``. ``tolerance`` replaces the relative limit with a fixed one (on the mean)."""
    transformers_distance = distance(exact, theirs)
    if tolerance is None:
        floor = FLOOR * float(np.mean([np.abs(exact[b]).mean() for b in range(exact.shape[0])]))
        limit = factor * transformers_distance.mean + floor
        rule = f"{factor:g} x transformers + {floor:.1e}"
    else:
        limit, rule = tolerance, "--tolerance"
    return Parity(distance(exact, ours), transformers_distance, limit, dtype, rule)


def _check_shape(model_dir: str | Path, batch: int, seq_len: int) -> None:
    """Before anything is loaded: a shape the model can run (a huge one would try to allocate it)."""
    max_positions = ModelConfig.from_json_file(Path(model_dir) / "config.json").max_position_embeddings
    if not 1 <= seq_len <= max_positions:
        raise RecipeError(
            f"--seq-len {seq_len}: must be in [1, {max_positions}] (the model's max_position_embeddings)"
        )
    if batch < 1:
        raise RecipeError(f"batch {batch} must be >= 1")


def verify(
    hf_dir: str | Path,
    ckpt_dir: str | Path | None = None,
    *,
    dtype: str = "float32",
    batch: int = 2,
    seq_len: int = 64,
    seed: int = 0,
    factor: float = FACTOR,
    tolerance: float | None = None,
) -> Parity:
    """Logits of ours (from ``ckpt_dir``, or the HF folder itself) vs transformers on the HF folder."""
    require("torch", "verify (transformers' PyTorch model is the reference)")
    _check_shape(ckpt_dir or hf_dir, batch, seq_len)
    model = load_model(ckpt_dir or hf_dir, ModelOptions(param_dtype=dtype, dtype=dtype))
    tokens = random_tokens(model.config.vocab_size, batch, seq_len, seed)
    ours = our_logits(model, tokens)
    del model
    exact = reference_logits(hf_dir, tokens, "float64")
    theirs = reference_logits(hf_dir, tokens, dtype)
    return compare(exact, theirs, ours, dtype, factor=factor, tolerance=tolerance)
