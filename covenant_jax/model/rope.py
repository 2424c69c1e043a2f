"""Rotary position embeddings: default, linear, llama3 and YaRN, as transformers computes them.

Inverse frequencies are computed once on the host in float32 (numpy), mirroring
``transformers.modeling_rope_utils`` knob for knob; positions arrive as an array, so packed
rows restart them per sample. Split-half rotation, as transformers (no q/k permutation).

Axes: B batch, T sequence, N heads, H head_dim.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from covenant_jax.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Returns (inv_freq [head_dim // 2] float32, attention scale applied to cos and sin)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    base_freq = np.float32(1.0) / np.power(np.float32(rope.theta), exponents, dtype=np.float32)
    if rope.rope_type == "default":
        return base_freq, 1.0
    if rope.rope_type == "linear":
        return (base_freq / np.float32(rope.factor)).astype(np.float32), 1.0
    if rope.rope_type == "llama3":
        return _llama3(rope, base_freq), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, head_dim)
    raise ValueError(f"unsupported rope_type {rope.rope_type!r}")


def _llama3(rope: RopeConfig, inv_freq: np.ndarray) -> np.ndarray:
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def yarn_attention_factor(rope: RopeConfig) -> float:
    """0.1·ln(s)+1 (or the mscale / mscale_all_dim ratio, or the explicit attention_factor)."""
    if rope.attention_factor is not None:
        return float(rope.attention_factor)

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return float(get_mscale(rope.factor, rope.mscale) / get_mscale(rope.factor, rope.mscale_all_dim))
    return get_mscale(rope.factor)


def _yarn(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """NTK-by-parts: extrapolate high frequencies, interpolate low ones, linear ramp between."""
    base, factor = rope.theta, rope.factor
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1
    original = rope.original_max_position_embeddings
    truncate = True if rope.truncate is None else rope.truncate

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp, as transformers does
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = (1 - ramp).astype(np.float32)

    pos_freqs = np.power(
        np.float32(base), np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim), dtype=np.float32
    )
    extrapolated = (np.float32(1.0) / pos_freqs).astype(np.float32)
    interpolated = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv_freq.astype(np.float32), yarn_attention_factor(rope)


def rope_cos_sin(
    positions_BT: jnp.ndarray, inv_freq: np.ndarray, scale: float, dtype: jnp.dtype
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin [B, T, H] in float32, scaled, then cast to the compute dtype (as transformers)."""
    freqs_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    return (jnp.cos(emb_BTH) * scale).astype(dtype), (jnp.sin(emb_BTH) * scale).astype(dtype)


def apply_rope(x_BTNH: jnp.ndarray, cos_BTH: jnp.ndarray, sin_BTH: jnp.ndarray) -> jnp.ndarray:
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    return x_BTNH * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]
