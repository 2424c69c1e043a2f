"""Blockwise (flash-style) causal attention in pure JAX: never materialises [T, S] scores.

Same contract as ``attention.naive_attention``: a query attends to a key iff the key is not in
the future and both carry the same segment id (0 = padding, attends only to padding). It is the
one flash kernel (``flash.indexed_attention``: online softmax forward, FlashAttention-2
``custom_vjp`` backward, future key blocks never visited) with each token's own position as its
index.

Axes: B batch, T query length, S key length, N query heads, K kv heads, H head_dim.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from covenant_jax.model.flash import check_self_attention, indexed_attention


def blockwise_attention(
    q_BTNH: jnp.ndarray,
    k_BSKH: jnp.ndarray,
    v_BSKH: jnp.ndarray,
    segment_ids_BT: jnp.ndarray,
    *,
    block_q: int = 512,
    block_kv: int = 512,
) -> jnp.ndarray:
    """Causal, segment-masked GQA attention; block sizes are clipped to T, and T is padded up to
    a multiple of each."""
    check_self_attention("blockwise", q_BTNH, k_BSKH)
    index_T = jnp.arange(q_BTNH.shape[1], dtype=jnp.int32)
    return indexed_attention(
        q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, segment_ids_BT, index_T, index_T, block_q, block_kv
    )


def make_blockwise_attention(block_q: int = 512, block_kv: int = 512):
    """An ``AttentionFn`` with fixed block sizes (for ``attention.register_backend``)."""
    return functools.partial(blockwise_attention, block_q=block_q, block_kv=block_kv)
