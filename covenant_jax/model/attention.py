"""Causal self-attention with GQA and packed-row segment ids; backends chosen by name.

A query attends to a key iff it is not in the future and both carry the same segment id, so
attention never crosses packed samples. Segment id 0 marks padding (it attends only to other
padding, which keeps its softmax finite; the loss masks it out).

Axes: B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head_dim.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from covenant_jax.errors import RecipeError


def attention_mask(segment_ids_BT: jnp.ndarray) -> jnp.ndarray:
    """[B, T, S] boolean: causal and same segment."""
    t = segment_ids_BT.shape[1]
    causal_TS = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    same_segment_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return causal_TS[None] & same_segment_BTS


def naive_attention(
    q_BTNH: jnp.ndarray, k_BSKH: jnp.ndarray, v_BSKH: jnp.ndarray, segment_ids_BT: jnp.ndarray
) -> jnp.ndarray:
    """The reference: materialises [B, N, T, S] scores (fine for short rows and tests)."""
    b, t, n, h = q_BTNH.shape
    k = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
    scores_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH).astype(jnp.float32)
    scores_BKGTS = scores_BKGTS * (h**-0.5)
    mask_B11TS = attention_mask(segment_ids_BT)[:, None, None]
    scores_BKGTS = jnp.where(mask_B11TS, scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(b, t, n, h)


def cost_model_stand_in(
    q_BTNH: jnp.ndarray, k_BSKH: jnp.ndarray, v_BSKH: jnp.ndarray, segment_ids_BT: jnp.ndarray
) -> jnp.ndarray:
    """Not attention: q * k + v per head (elementwise), for the compiler's cost model only.

    ``plan``'s step time estimate compiles the layers around the attention core as they are,
    but the cost model cannot see inside the fused kernels (splash is a Pallas custom call,
    blockwise's loops have data-dependent bounds), so the core's FLOPs are added analytically
    there. This stand-in reads q, k and v and writes the output, so the projections, RoPE and
    their gradients stay in the program, each gradient different from the others (a sum would
    give q, k and v one gradient, and the compiler would merge their weight gradients into one
    matmul). It is never a training backend.
    """
    g = q_BTNH.shape[2] // k_BSKH.shape[2]
    return q_BTNH * jnp.repeat(k_BSKH, g, axis=2) + jnp.repeat(v_BSKH, g, axis=2)


AttentionFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]
_BACKENDS: dict[str, AttentionFn] = {"naive": naive_attention}
COST_MODEL_STAND_IN = "cost_model_stand_in"  # a name get_backend resolves; not a recipe choice


def register_backend(name: str, fn: AttentionFn) -> None:
    _BACKENDS[name] = fn


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


# Backends whose kernel holds a static table of the packed samples in a row: name -> factory.
_ROW_BOUNDED: dict[str, Callable[[int], AttentionFn]] = {}


def get_backend(name: str, *, max_samples_per_row: int = 0) -> AttentionFn:
    """The backend; one with a per-row sample table sized to ``max_samples_per_row`` (0: its own
    default) when it has one."""
    if name == COST_MODEL_STAND_IN:
        return cost_model_stand_in
    if name not in _BACKENDS:
        raise RecipeError(f"attention backend {name!r} is not available; choose one of {backend_names()}")
    if max_samples_per_row and name in _ROW_BOUNDED:
        return _ROW_BOUNDED[name](max_samples_per_row)
    return _BACKENDS[name]


# Memory-efficient and fused backends (their modules do not import this one, so no cycle).
from covenant_jax.model import blockwise_attention as _blockwise, gpu_attention as _fused  # noqa: E402

register_backend("blockwise", _blockwise.blockwise_attention)
register_backend("cudnn", _fused.cudnn_attention)
_ROW_BOUNDED["cudnn"] = _fused.make_cudnn_attention
register_backend("splash", _fused.splash_attention)

# Context parallelism: T sharded over the active mesh's context axis (blockwise without one).
from covenant_jax.model import context_parallel as _context  # noqa: E402

register_backend("context", _context.make_context_attention("contiguous"))
register_backend("context_zigzag", _context.make_context_attention("zigzag"))
