"""FlashAttention-2 in pure JAX, written once: every flash-style backend calls this kernel.

Query i attends key j iff ``q_index[i] >= kv_index[j]`` (causal by explicit token indices) and
both carry the same segment id. Blockwise attention passes ``arange`` indices; context
parallelism passes each device's original token indices of a sharded (possibly zig-zagged)
row, so any layout of the sequence is exact.

Forward: for each query block an online softmax over key blocks in float32 (running max ``m``,
running sum ``l``, unnormalised output ``acc``). Key blocks are visited only from the first to
the last one visible to the query block (the causal prefix for ``arange`` indices), and a block
inside that range that is entirely in the future (zig-zag layouts) is skipped with
``lax.cond``. Backward: only the output and the per-row logsumexp are saved; one pass over key
blocks recomputes each [Q, C] probability block and accumulates dK, dV for the key block and dQ
for every query block that sees it. Memory is O(T * block) in forward and backward.

Axes: B batch, T query length (padded), S key length (padded), K kv heads, G = N // K query
heads per kv head, H head_dim, Q / C query / key block, I / J number of query / key blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite, so max/exp never see inf - inf
_PAD_Q_INDEX = -1  # padded query rows see no key (every real key index is >= 0)
_PAD_KV_INDEX = np.iinfo(np.int32).max  # padded keys are in every query's future
_PAD_SEGMENT = -1


def check_self_attention(name: str, q_BTNH: jnp.ndarray, k_BSKH: jnp.ndarray) -> None:
    """The shapes the flash-style backends take: S == T, and N a multiple of K (GQA)."""
    t, n = q_BTNH.shape[1], q_BTNH.shape[2]
    s, kh = k_BSKH.shape[1], k_BSKH.shape[2]
    if s != t:
        raise ValueError(f"{name} attention is self-attention: query length {t} != key length {s}")
    if n % kh:
        raise ValueError(f"query heads {n} are not a multiple of kv heads {kh}")


def indexed_attention(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, q_index_T, kv_index_S, block_q, block_kv):
    """Causal-by-index, segment-masked GQA attention; queries and keys may have different
    lengths and any order. Blocks are clipped to the lengths, which are padded up to them.
    Rows that see no key (only padding) come out zero."""
    b, t, n, h = q_BTNH.shape
    s, kh = k_BSKH.shape[1], k_BSKH.shape[2]
    bq, bk = min(block_q, t), min(block_kv, s)
    pad_t, pad_s = -t % bq, -s % bk
    q_index_T, kv_index_S = jnp.asarray(q_index_T, jnp.int32), jnp.asarray(kv_index_S, jnp.int32)
    if pad_t:
        q_BTNH = jnp.pad(q_BTNH, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
        q_seg_BT = jnp.pad(q_seg_BT, ((0, 0), (0, pad_t)), constant_values=_PAD_SEGMENT)
        q_index_T = jnp.pad(q_index_T, (0, pad_t), constant_values=_PAD_Q_INDEX)
    if pad_s:
        k_BSKH, v_BSKH = (jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, 0))) for x in (k_BSKH, v_BSKH))
        kv_seg_BS = jnp.pad(kv_seg_BS, ((0, 0), (0, pad_s)), constant_values=_PAD_SEGMENT)
        kv_index_S = jnp.pad(kv_index_S, (0, pad_s), constant_values=_PAD_KV_INDEX)
    q_BTKGH = q_BTNH.reshape(b, t + pad_t, kh, n // kh, h)
    out_BTKGH = _flash(
        q_BTKGH,
        k_BSKH,
        v_BSKH,
        q_seg_BT.astype(jnp.int32),
        kv_seg_BS.astype(jnp.int32),
        q_index_T,
        kv_index_S,
        bq,
        bk,
    )
    return out_BTKGH[:, :t].reshape(b, t, n, h)


# ---- the kernel -----------------------------------------------------------------------------


def _slice(x, start, size, axis=1):
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _visible(q_index_T, kv_index_S, bq, bk):
    """[I, J] bool: some query of block i is at or after some key of block j."""
    q_last_I = q_index_T.reshape(-1, bq).max(axis=1)
    k_first_J = kv_index_S.reshape(-1, bk).min(axis=1)
    return q_last_I[:, None] >= k_first_J[None, :]


def _span(visible_XY):
    """Per row x: [first, last + 1) of the visible y (an empty range when none is)."""
    ny = visible_XY.shape[1]
    any_X = visible_XY.any(axis=1)
    first_X = jnp.argmax(visible_XY, axis=1)
    last_X = ny - jnp.argmax(visible_XY[:, ::-1], axis=1)
    return jnp.where(any_X, first_X, 0), jnp.where(any_X, last_X, 0)


def _block_scores(q_BQKGH, k_BCKH, seg_BQ, seg_BC, idx_Q, idx_C):
    """Scaled float32 scores with masked entries set to _MASKED, and the [B,1,1,Q,C] mask."""
    h = q_BQKGH.shape[-1]
    s_BKGQC = jnp.einsum("BQKGH,BCKH->BKGQC", q_BQKGH, k_BCKH, preferred_element_type=jnp.float32)
    mask_BQC = (idx_Q[:, None] >= idx_C[None, :])[None] & (seg_BQ[:, :, None] == seg_BC[:, None, :])
    mask_B11QC = mask_BQC[:, None, None]
    return jnp.where(mask_B11QC, s_BKGQC * (h**-0.5), _MASKED), mask_B11QC


def _forward(q_BTKGH, k_BSKH, v_BSKH, qseg_BT, kseg_BS, qidx_T, kidx_S, bq, bk):
    """out [B,T,K,G,H] (input dtype) and logsumexp [I,B,K,G,Q] (float32)."""
    b, t, kh, g, h = q_BTKGH.shape
    visible_IJ = _visible(qidx_T, kidx_S, bq, bk)
    first_I, stop_I = _span(visible_IJ)

    def q_block(i):
        q_BQKGH, seg_BQ = _slice(q_BTKGH, i * bq, bq), _slice(qseg_BT, i * bq, bq)
        idx_Q = _slice(qidx_T, i * bq, bq, 0)

        def attend(j, carry):
            m_BKGQ, l_BKGQ, acc_BKGQH = carry
            k_BCKH, v_BCKH = _slice(k_BSKH, j * bk, bk), _slice(v_BSKH, j * bk, bk)
            s_BKGQC, mask = _block_scores(
                q_BQKGH, k_BCKH, seg_BQ, _slice(kseg_BS, j * bk, bk), idx_Q, _slice(kidx_S, j * bk, bk, 0)
            )
            m_new = jnp.maximum(m_BKGQ, s_BKGQC.max(axis=-1))
            p_BKGQC = jnp.where(mask, jnp.exp(s_BKGQC - m_new[..., None]), 0.0)
            alpha = jnp.exp(m_BKGQ - m_new)
            pv_BKGQH = jnp.einsum(
                "BKGQC,BCKH->BKGQH", p_BKGQC.astype(v_BCKH.dtype), v_BCKH, preferred_element_type=jnp.float32
            )
            return m_new, alpha * l_BKGQ + p_BKGQC.sum(axis=-1), alpha[..., None] * acc_BKGQH + pv_BKGQH

        def kv_step(j, carry):
            return lax.cond(visible_IJ[i, j], attend, lambda j, c: c, j, carry)

        init = (
            jnp.full((b, kh, g, bq), _MASKED, jnp.float32),
            jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, h), jnp.float32),
        )
        m_BKGQ, l_BKGQ, acc_BKGQH = lax.fori_loop(first_I[i], stop_I[i], kv_step, init)
        l_BKGQ = jnp.where(l_BKGQ > 0, l_BKGQ, 1.0)  # rows that saw no key (padding) give 0
        return (acc_BKGQH / l_BKGQ[..., None]).astype(q_BTKGH.dtype), m_BKGQ + jnp.log(l_BKGQ)

    out_IBKGQH, lse_IBKGQ = lax.map(q_block, jnp.arange(t // bq))
    return out_IBKGQH.transpose(1, 0, 4, 2, 3, 5).reshape(b, t, kh, g, h), lse_IBKGQ


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _flash(q_BTKGH, k_BSKH, v_BSKH, qseg_BT, kseg_BS, qidx_T, kidx_S, bq, bk):
    return _forward(q_BTKGH, k_BSKH, v_BSKH, qseg_BT, kseg_BS, qidx_T, kidx_S, bq, bk)[0]


def _flash_fwd(q_BTKGH, k_BSKH, v_BSKH, qseg_BT, kseg_BS, qidx_T, kidx_S, bq, bk):
    out_BTKGH, lse_IBKGQ = _forward(q_BTKGH, k_BSKH, v_BSKH, qseg_BT, kseg_BS, qidx_T, kidx_S, bq, bk)
    return out_BTKGH, (q_BTKGH, k_BSKH, v_BSKH, qseg_BT, kseg_BS, qidx_T, kidx_S, out_BTKGH, lse_IBKGQ)


def _flash_bwd(bq, bk, residuals, dout_BTKGH):
    q_BTKGH, k_BSKH, v_BSKH, qseg_BT, kseg_BS, qidx_T, kidx_S, out_BTKGH, lse_IBKGQ = residuals
    b, t, kh, g, h = q_BTKGH.shape
    s = k_BSKH.shape[1]
    dt = q_BTKGH.dtype
    visible_IJ = _visible(qidx_T, kidx_S, bq, bk)
    first_J, stop_J = _span(visible_IJ.T)
    # D_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij
    delta_BTKG = jnp.sum(dout_BTKGH.astype(jnp.float32) * out_BTKGH.astype(jnp.float32), axis=-1)

    def kv_block(dq_BTKGH, j):
        k_BCKH, v_BCKH = _slice(k_BSKH, j * bk, bk), _slice(v_BSKH, j * bk, bk)
        seg_BC, idx_C = _slice(kseg_BS, j * bk, bk), _slice(kidx_S, j * bk, bk, 0)

        def accumulate(i, carry):
            dq_BTKGH, dk_BCKH, dv_BCKH = carry
            q_BQKGH, do_BQKGH = _slice(q_BTKGH, i * bq, bq), _slice(dout_BTKGH, i * bq, bq)
            s_BKGQC, mask = _block_scores(
                q_BQKGH, k_BCKH, _slice(qseg_BT, i * bq, bq), seg_BC, _slice(qidx_T, i * bq, bq, 0), idx_C
            )
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

        def q_step(i, carry):
            return lax.cond(visible_IJ[i, j], accumulate, lambda i, c: c, i, carry)

        zeros_BCKH = jnp.zeros((b, bk, kh, h), jnp.float32)
        dq_BTKGH, dk_BCKH, dv_BCKH = lax.fori_loop(
            first_J[j], stop_J[j], q_step, (dq_BTKGH, zeros_BCKH, zeros_BCKH)
        )
        return dq_BTKGH, (dk_BCKH, dv_BCKH)

    dq_BTKGH, (dk_JBCKH, dv_JBCKH) = lax.scan(
        kv_block, jnp.zeros(q_BTKGH.shape, jnp.float32), jnp.arange(s // bk)
    )

    def unblock(x_JBCKH, dtype):
        return x_JBCKH.transpose(1, 0, 2, 3, 4).reshape(b, s, kh, h).astype(dtype)

    return (
        dq_BTKGH.astype(dt),
        unblock(dk_JBCKH, k_BSKH.dtype),
        unblock(dv_JBCKH, v_BSKH.dtype),
        None,
        None,
        None,
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)
