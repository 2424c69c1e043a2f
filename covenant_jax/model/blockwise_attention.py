"""Blockwise (flash-style) causal attention in pure JAX: never materialises [T, S] scores.

Same contract as ``attention.naive_attention``: a query attends to a key iff the key is not in
the future and both carry the same segment id (0 = padding, attends only to padding). Segment
ids must be >= 0; -1 is used internally for the rows added to round T up to the block size.

Forward: for each query block, an online softmax over the key blocks in float32 (running max
``m``, running sum ``l``, unnormalised output ``acc``). Key blocks entirely in the future of the
query block are never visited (the inner ``fori_loop``'s upper bound depends on the query block).
Backward (FlashAttention-2): only the output and the per-row logsumexp are saved; one pass over
key blocks recomputes each [Q, C] probability block from the logsumexp and accumulates dK, dV
for that key block and dQ for every query block at or after it. Memory is O(T * block) in
forward and backward.

Axes: B batch, T query length (padded), S key length, K kv heads, G = N // K query heads per kv
head, H head_dim, Q query block, C key block, I / J number of query / key blocks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite, so max/exp never see inf - inf
_PAD_SEGMENT = -1


def check_self_attention(name: str, q_BTNH: jnp.ndarray, k_BSKH: jnp.ndarray) -> None:
    """The shapes the flash-style backends take: S == T, and N a multiple of K (GQA)."""
    t, n = q_BTNH.shape[1], q_BTNH.shape[2]
    s, kh = k_BSKH.shape[1], k_BSKH.shape[2]
    if s != t:
        raise ValueError(f"{name} attention is self-attention: query length {t} != key length {s}")
    if n % kh:
        raise ValueError(f"query heads {n} are not a multiple of kv heads {kh}")


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
    a multiple of lcm(block_q, block_kv) (choose blocks that divide one another)."""
    check_self_attention("blockwise", q_BTNH, k_BSKH)
    b, t, n, h = q_BTNH.shape
    kh = k_BSKH.shape[2]
    bq, bk = min(block_q, t), min(block_kv, t)
    step = math.lcm(bq, bk)
    pad = -t % step
    if pad:
        q_BTNH, k_BSKH, v_BSKH = (
            jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BTNH, k_BSKH, v_BSKH)
        )
        segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, pad)), constant_values=_PAD_SEGMENT)
    q_BTKGH = q_BTNH.reshape(b, t + pad, kh, n // kh, h)
    out_BTKGH = _flash(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT.astype(jnp.int32), bq, bk)
    return out_BTKGH[:, :t].reshape(b, t, n, h)


def make_blockwise_attention(block_q: int = 512, block_kv: int = 512):
    """An ``AttentionFn`` with fixed block sizes (for ``attention.register_backend``)."""
    return functools.partial(blockwise_attention, block_q=block_q, block_kv=block_kv)


def _block_scores(q_BQKGH, k_BCKH, seg_BQ, seg_BC, q_start, k_start):
    """Scaled float32 scores with masked entries set to _MASKED, and the [B,1,1,Q,C] mask."""
    bq, bk, h = q_BQKGH.shape[1], k_BCKH.shape[1], q_BQKGH.shape[-1]
    s_BKGQC = jnp.einsum("BQKGH,BCKH->BKGQC", q_BQKGH, k_BCKH, preferred_element_type=jnp.float32)
    causal_QC = (q_start + jnp.arange(bq))[:, None] >= (k_start + jnp.arange(bk))[None, :]
    mask_BQC = causal_QC[None] & (seg_BQ[:, :, None] == seg_BC[:, None, :])
    mask_B11QC = mask_BQC[:, None, None]
    return jnp.where(mask_B11QC, s_BKGQC * (h**-0.5), _MASKED), mask_B11QC


def _slice(x, start, size, axis=1):
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _forward(q_BTKGH, k_BSKH, v_BSKH, seg_BT, bq, bk):
    """Returns out [B,T,K,G,H] (input dtype) and logsumexp [I,B,K,G,Q] (float32)."""
    b, t, kh, g, h = q_BTKGH.shape
    nk = t // bk

    def q_block(i):
        q_BQKGH = _slice(q_BTKGH, i * bq, bq)
        seg_BQ = _slice(seg_BT, i * bq, bq)

        def kv_step(j, carry):
            m_BKGQ, l_BKGQ, acc_BKGQH = carry
            k_BCKH, v_BCKH = _slice(k_BSKH, j * bk, bk), _slice(v_BSKH, j * bk, bk)
            s_BKGQC, mask = _block_scores(q_BQKGH, k_BCKH, seg_BQ, _slice(seg_BT, j * bk, bk), i * bq, j * bk)
            m_new = jnp.maximum(m_BKGQ, s_BKGQC.max(axis=-1))
            p_BKGQC = jnp.where(mask, jnp.exp(s_BKGQC - m_new[..., None]), 0.0)
            alpha = jnp.exp(m_BKGQ - m_new)
            pv_BKGQH = jnp.einsum(
                "BKGQC,BCKH->BKGQH", p_BKGQC.astype(v_BCKH.dtype), v_BCKH, preferred_element_type=jnp.float32
            )
            return m_new, alpha * l_BKGQ + p_BKGQC.sum(axis=-1), alpha[..., None] * acc_BKGQH + pv_BKGQH

        init = (
            jnp.full((b, kh, g, bq), _MASKED, jnp.float32),
            jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, h), jnp.float32),
        )
        num_kv = jnp.minimum(nk, ((i + 1) * bq + bk - 1) // bk)  # later key blocks are all future
        m_BKGQ, l_BKGQ, acc_BKGQH = lax.fori_loop(0, num_kv, kv_step, init)
        # every row sees its own key (padding rows included), so l > 0
        return (acc_BKGQH / l_BKGQ[..., None]).astype(q_BTKGH.dtype), m_BKGQ + jnp.log(l_BKGQ)

    out_IBKGQH, lse_IBKGQ = lax.map(q_block, jnp.arange(t // bq))
    out_BTKGH = out_IBKGQH.transpose(1, 0, 4, 2, 3, 5).reshape(b, t, kh, g, h)
    return out_BTKGH, lse_IBKGQ


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q_BTKGH, k_BSKH, v_BSKH, seg_BT, bq, bk):
    return _forward(q_BTKGH, k_BSKH, v_BSKH, seg_BT, bq, bk)[0]


def _flash_fwd(q_BTKGH, k_BSKH, v_BSKH, seg_BT, bq, bk):
    out_BTKGH, lse_IBKGQ = _forward(q_BTKGH, k_BSKH, v_BSKH, seg_BT, bq, bk)
    return out_BTKGH, (q_BTKGH, k_BSKH, v_BSKH, seg_BT, out_BTKGH, lse_IBKGQ)


def _flash_bwd(bq, bk, residuals, dout_BTKGH):
    q_BTKGH, k_BSKH, v_BSKH, seg_BT, out_BTKGH, lse_IBKGQ = residuals
    b, t, kh, g, h = q_BTKGH.shape
    dt = q_BTKGH.dtype
    # D_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij
    delta_BTKG = jnp.sum(dout_BTKGH.astype(jnp.float32) * out_BTKGH.astype(jnp.float32), axis=-1)

    def kv_block(dq_BTKGH, j):
        k_BCKH, v_BCKH = _slice(k_BSKH, j * bk, bk), _slice(v_BSKH, j * bk, bk)
        seg_BC = _slice(seg_BT, j * bk, bk)

        def q_step(i, carry):
            dq_BTKGH, dk_BCKH, dv_BCKH = carry
            q_BQKGH, do_BQKGH = _slice(q_BTKGH, i * bq, bq), _slice(dout_BTKGH, i * bq, bq)
            s_BKGQC, mask = _block_scores(q_BQKGH, k_BCKH, _slice(seg_BT, i * bq, bq), seg_BC, i * bq, j * bk)
            lse_BKGQ = lax.dynamic_index_in_dim(lse_IBKGQ, i, keepdims=False)
            p_BKGQC = jnp.where(mask, jnp.exp(s_BKGQC - lse_BKGQ[..., None]), 0.0)
            delta_BKGQ = _slice(delta_BTKG, i * bq, bq).transpose(0, 2, 3, 1)
            dp_BKGQC = jnp.einsum("BQKGH,BCKH->BKGQC", do_BQKGH, v_BCKH, preferred_element_type=jnp.float32)
            ds_BKGQC = (p_BKGQC * (dp_BKGQC - delta_BKGQ[..., None]) * (h**-0.5)).astype(dt)
            dv_BCKH = dv_BCKH + jnp.einsum(
                "BKGQC,BQKGH->BCKH", p_BKGQC.astype(dt), do_BQKGH, preferred_element_type=jnp.float32
            )
            dk_BCKH = dk_BCKH + jnp.einsum(
                "BKGQC,BQKGH->BCKH", ds_BKGQC, q_BQKGH, preferred_element_type=jnp.float32
            )
            dq_BQKGH = jnp.einsum("BKGQC,BCKH->BQKGH", ds_BKGQC, k_BCKH, preferred_element_type=jnp.float32)
            dq_BTKGH = lax.dynamic_update_slice_in_dim(
                dq_BTKGH, _slice(dq_BTKGH, i * bq, bq) + dq_BQKGH, i * bq, axis=1
            )
            return dq_BTKGH, dk_BCKH, dv_BCKH

        zeros_BCKH = jnp.zeros((b, bk, kh, h), jnp.float32)
        first_q = (j * bk) // bq  # earlier query blocks lie entirely before this key block
        dq_BTKGH, dk_BCKH, dv_BCKH = lax.fori_loop(
            first_q, t // bq, q_step, (dq_BTKGH, zeros_BCKH, zeros_BCKH)
        )
        return dq_BTKGH, (dk_BCKH, dv_BCKH)

    dq_BTKGH, (dk_JBCKH, dv_JBCKH) = lax.scan(
        kv_block, jnp.zeros(q_BTKGH.shape, jnp.float32), jnp.arange(t // bk)
    )

    def unblock(x_JBCKH, dtype):
        return x_JBCKH.transpose(1, 0, 2, 3, 4).reshape(b, t, kh, h).astype(dtype)

    return dq_BTKGH.astype(dt), unblock(dk_JBCKH, k_BSKH.dtype), unblock(dv_JBCKH, v_BSKH.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
