"""Context parallelism: one long sequence spread over the ``context`` mesh axis.

Backends ``"context"`` and ``"context_zigzag"`` (registered in ``attention.py``; pick with
``ModelOptions(attention=...)``). Everything outside attention is per token (norms, MLP, RoPE
from the ``positions`` input, the loss), so it already runs on a T-sharded activation; only
attention needs the other devices' tokens.

All-gather design (exact): inside ``jax.shard_map`` over the mesh axes that the logical ``seq``
rule maps to (``context``), each device holds a [B, T/C] chunk of queries, keys, values and
segment ids; it all-gathers K, V and the segment ids along the sequence axis and runs a
flash-style kernel of its query chunk against the full [B, T] K/V. The kernel's causal mask uses
each token's *original* index in the row (explicit index arrays, not offsets), so any layout of
the sequence over devices is exact. The backward is a ``custom_vjp`` (FlashAttention-2: saves
the output and the row logsumexp, recomputes per block); the all-gather sits outside it, so
JAX transposes it to a reduce-scatter of dK / dV. Batch and heads stay sharded as the logical
rules say (heads over ``tensor`` only when the kv heads divide, so each device keeps whole GQA
groups; otherwise heads are replicated inside the shard_map).

Layouts (``order``: the original index of the token at each stored position of a row):

* ``"context"`` - contiguous: device c holds tokens [c*T/C, (c+1)*T/C). Nothing to permute.
  Causal work is unbalanced: device C-1 does about 2C-1 times the work of device 0.
* ``"context_zigzag"`` - causal load balancing: the row is cut into 2C chunks and device c holds
  chunks c and 2C-1-c (``zigzag_order``), so every device does the same causal work. **The
  caller permutes every [.., T] array of the batch** (tokens, targets, loss_mask, segment_ids,
  positions) with :func:`zigzag_permute` before the model and never un-permutes: the loss is a
  sum over tokens and targets moved with their tokens, RoPE reads the permuted ``positions``, and
  this backend derives the original indices from the same ``zigzag_order(T, C)``, with C the
  context size of the mesh active while tracing. Logits come out in the permuted order
  (``zigzag_unpermute`` restores it). A batch that was not permuted is attended wrongly: only
  use this backend where the data path permutes.

Fallback: with no active mesh (``sharding.activation_sharding``), a context size of 1, or a T
the context size does not divide (2C for zigzag; ``zigzag_permute`` refuses such a T, so such a
row is in original order), the plain ``blockwise`` kernel runs.

Cost: every device holds the full K/V of one layer ([B, T, K, H] twice, kept as residuals for
the backward) - at 128k tokens, 8 kv heads of 128 in bfloat16 that is 256 MiB each per row.
Ring attention (ppermute K/V blocks with an online softmax) would avoid it; not done yet.

Axes: B batch, T local query length, S full key length, N query heads, K kv heads, G = N // K,
H head_dim, Q / C query / key block, I / J number of query / key blocks.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from covenant_jax.model import blockwise_attention as blockwise_lib
from covenant_jax.parallel import sharding as sharding_lib

_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite, so max/exp never see inf - inf
_PAD_Q_INDEX = -1  # padded query rows see no key (every real key index is >= 0)
_PAD_KV_INDEX = np.iinfo(np.int32).max  # padded keys are in every query's future

Layout = Literal["contiguous", "zigzag"]


# ---- layouts -------------------------------------------------------------------------------


def zigzag_order(t: int, context: int) -> np.ndarray:
    """[T] original token index at each stored position: chunks (0, 2C-1, 1, 2C-2, ...) of T/2C."""
    if t % (2 * context):
        raise ValueError(
            f"zigzag layout needs the sequence length {t} to be a multiple of 2 * context = {2 * context}"
        )
    chunk = t // (2 * context)
    chunks = [c for i in range(context) for c in (i, 2 * context - 1 - i)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks]).astype(np.int32)


def zigzag_permute(batch, context: int):
    """Reorder the last (T) axis of every array in a pytree (a batch dict) into the zigzag layout."""
    def permute(x):
        take = np.take if isinstance(x, np.ndarray) else jnp.take
        return take(x, zigzag_order(x.shape[-1], context), axis=-1)

    return jax.tree.map(permute, batch)


def zigzag_unpermute(x, context: int, axis: int = 1):
    """Inverse of :func:`zigzag_permute` along ``axis`` (e.g. logits [B, T, V] back to token order)."""
    inverse = np.argsort(zigzag_order(x.shape[axis], context)).astype(np.int32)
    return jnp.take(x, inverse, axis=axis)


# ---- the backend ---------------------------------------------------------------------------


def context_attention(
    q_BTNH: jnp.ndarray,
    k_BSKH: jnp.ndarray,
    v_BSKH: jnp.ndarray,
    segment_ids_BT: jnp.ndarray,
    *,
    layout: Layout = "contiguous",
    block_q: int = 512,
    block_kv: int = 512,
) -> jnp.ndarray:
    """``attention.naive_attention``'s contract, with T sharded over the active mesh's ``seq`` axes."""
    t = q_BTNH.shape[1]
    active = sharding_lib.active_sharding()
    fallback = functools.partial(blockwise_lib.blockwise_attention, block_q=block_q, block_kv=block_kv)
    if active is None:
        return fallback(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    blockwise_lib.check_self_attention("context", q_BTNH, k_BSKH)
    mesh, rules = active
    # heads take what the kv-head rule allows, so each device keeps whole GQA groups
    kv_spec = sharding_lib.logical_to_spec(("batch", "seq", "act_kv_heads", None), k_BSKH.shape, mesh, rules)
    batch, seq, heads, _ = kv_spec
    seq_axes = () if seq is None else (seq,) if isinstance(seq, str) else tuple(seq)
    c = math.prod(mesh.shape[a] for a in seq_axes)
    if c == 1 or (layout == "zigzag" and t % (2 * c)):
        return fallback(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)

    order_T = zigzag_order(t, c) if layout == "zigzag" else np.arange(t, dtype=np.int32)
    qkv_spec = P(batch, seq, heads, None)
    seg_spec = P(batch, seq)
    t_local = t // c
    bq = min(block_q, t_local // 2 if layout == "zigzag" else t_local)
    bk = min(block_kv, t_local // 2 if layout == "zigzag" else t_local)

    def local(q_BTNH, k_BTKH, v_BTKH, seg_BT):
        k_BSKH = lax.all_gather(k_BTKH, seq, axis=1, tiled=True)
        v_BSKH = lax.all_gather(v_BTKH, seq, axis=1, tiled=True)
        seg_BS = lax.all_gather(seg_BT, seq, axis=1, tiled=True)
        order = jnp.asarray(order_T)
        q_index_T = lax.dynamic_slice_in_dim(order, lax.axis_index(seq) * t_local, t_local)
        return indexed_attention(q_BTNH, k_BSKH, v_BSKH, seg_BT, seg_BS, q_index_T, order, bq, bk)

    # check_vma=False: the kernel's lax.cond block skipping does not type-check under varying-
    # manual-axes inference. The out_specs are still true: the output varies exactly as q does.
    return jax.shard_map(
        local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec), out_specs=qkv_spec,
        check_vma=False,
    )(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT.astype(jnp.int32))


def make_context_attention(layout: Layout = "contiguous", block_q: int = 512, block_kv: int = 512):
    """An ``AttentionFn`` with a fixed layout and block sizes (for ``attention.register_backend``)."""
    return functools.partial(context_attention, layout=layout, block_q=block_q, block_kv=block_kv)


# ---- flash kernel with explicit token indices ----------------------------------------------


def indexed_attention(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, q_index_T, kv_index_S, block_q, block_kv):
    """Query i attends key j iff ``q_index[i] >= kv_index[j]`` and their segment ids are equal.

    Queries and keys may have different lengths and any order; blocks are clipped and the
    lengths padded up to them. A key block entirely in the future of a query block (by the
    indices) is skipped with ``lax.cond``. Rows that see no key (only padding) come out zero.
    """
    b, t, n, h = q_BTNH.shape
    s, kh = k_BSKH.shape[1], k_BSKH.shape[2]
    bq, bk = min(block_q, t), min(block_kv, s)
    pad_t, pad_s = -t % bq, -s % bk
    q_index_T, kv_index_S = jnp.asarray(q_index_T, jnp.int32), jnp.asarray(kv_index_S, jnp.int32)
    if pad_t:
        q_BTNH = jnp.pad(q_BTNH, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
        q_seg_BT = jnp.pad(q_seg_BT, ((0, 0), (0, pad_t)), constant_values=-1)
        q_index_T = jnp.pad(q_index_T, (0, pad_t), constant_values=_PAD_Q_INDEX)
    if pad_s:
        k_BSKH, v_BSKH = (jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, 0))) for x in (k_BSKH, v_BSKH))
        kv_seg_BS = jnp.pad(kv_seg_BS, ((0, 0), (0, pad_s)), constant_values=-1)
        kv_index_S = jnp.pad(kv_index_S, (0, pad_s), constant_values=_PAD_KV_INDEX)
    q_BTKGH = q_BTNH.reshape(b, t + pad_t, kh, n // kh, h)
    out_BTKGH = _flash(q_BTKGH, k_BSKH, v_BSKH, q_seg_BT.astype(jnp.int32), kv_seg_BS.astype(jnp.int32),
                       q_index_T, kv_index_S, bq, bk)
    return out_BTKGH[:, :t].reshape(b, t, n, h)


def _slice(x, start, size, axis=1):
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _visible(q_index_T, kv_index_S, bq, bk):
    """[I, J] bool: some query of block i is at or after some key of block j."""
    q_last_I = q_index_T.reshape(-1, bq).max(axis=1)
    k_first_J = kv_index_S.reshape(-1, bk).min(axis=1)
    return q_last_I[:, None] >= k_first_J[None, :]


def _block_scores(q_BQKGH, k_BCKH, seg_BQ, seg_BC, idx_Q, idx_C):
    h = q_BQKGH.shape[-1]
    s_BKGQC = jnp.einsum("BQKGH,BCKH->BKGQC", q_BQKGH, k_BCKH, preferred_element_type=jnp.float32)
    mask_BQC = (idx_Q[:, None] >= idx_C[None, :])[None] & (seg_BQ[:, :, None] == seg_BC[:, None, :])
    mask_B11QC = mask_BQC[:, None, None]
    return jnp.where(mask_B11QC, s_BKGQC * (h**-0.5), _MASKED), mask_B11QC


def _forward(q_BTKGH, k_BSKH, v_BSKH, qseg_BT, kseg_BS, qidx_T, kidx_S, bq, bk):
    """out [B,T,K,G,H] (input dtype) and logsumexp [I,B,K,G,Q] (float32)."""
    b, t, kh, g, h = q_BTKGH.shape
    nk = k_BSKH.shape[1] // bk
    visible_IJ = _visible(qidx_T, kidx_S, bq, bk)

    def q_block(i):
        q_BQKGH, seg_BQ = _slice(q_BTKGH, i * bq, bq), _slice(qseg_BT, i * bq, bq)
        idx_Q = _slice(qidx_T, i * bq, bq, 0)

        def attend(j, carry):
            m_BKGQ, l_BKGQ, acc_BKGQH = carry
            k_BCKH, v_BCKH = _slice(k_BSKH, j * bk, bk), _slice(v_BSKH, j * bk, bk)
            s_BKGQC, mask = _block_scores(q_BQKGH, k_BCKH, seg_BQ, _slice(kseg_BS, j * bk, bk),
                                          idx_Q, _slice(kidx_S, j * bk, bk, 0))
            m_new = jnp.maximum(m_BKGQ, s_BKGQC.max(axis=-1))
            p_BKGQC = jnp.where(mask, jnp.exp(s_BKGQC - m_new[..., None]), 0.0)
            alpha = jnp.exp(m_BKGQ - m_new)
            pv_BKGQH = jnp.einsum("BKGQC,BCKH->BKGQH", p_BKGQC.astype(v_BCKH.dtype), v_BCKH,
                                  preferred_element_type=jnp.float32)
            return m_new, alpha * l_BKGQ + p_BKGQC.sum(axis=-1), alpha[..., None] * acc_BKGQH + pv_BKGQH

        def kv_step(j, carry):
            return lax.cond(visible_IJ[i, j], attend, lambda j, c: c, j, carry)

        init = (jnp.full((b, kh, g, bq), _MASKED, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
                jnp.zeros((b, kh, g, bq, h), jnp.float32))
        m_BKGQ, l_BKGQ, acc_BKGQH = lax.fori_loop(0, nk, kv_step, init)
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
    delta_BTKG = jnp.sum(dout_BTKGH.astype(jnp.float32) * out_BTKGH.astype(jnp.float32), axis=-1)

    def kv_block(dq_BTKGH, j):
        k_BCKH, v_BCKH = _slice(k_BSKH, j * bk, bk), _slice(v_BSKH, j * bk, bk)
        seg_BC, idx_C = _slice(kseg_BS, j * bk, bk), _slice(kidx_S, j * bk, bk, 0)

        def accumulate(i, carry):
            dq_BTKGH, dk_BCKH, dv_BCKH = carry
            q_BQKGH, do_BQKGH = _slice(q_BTKGH, i * bq, bq), _slice(dout_BTKGH, i * bq, bq)
            s_BKGQC, mask = _block_scores(q_BQKGH, k_BCKH, _slice(qseg_BT, i * bq, bq), seg_BC,
                                          _slice(qidx_T, i * bq, bq, 0), idx_C)
            lse_BKGQ = lax.dynamic_index_in_dim(lse_IBKGQ, i, keepdims=False)
            p_BKGQC = jnp.where(mask, jnp.exp(s_BKGQC - lse_BKGQ[..., None]), 0.0)
            delta_BKGQ = _slice(delta_BTKG, i * bq, bq).transpose(0, 2, 3, 1)
            dp_BKGQC = jnp.einsum("BQKGH,BCKH->BKGQC", do_BQKGH, v_BCKH, preferred_element_type=jnp.float32)
            ds_BKGQC = (p_BKGQC * (dp_BKGQC - delta_BKGQ[..., None]) * (h**-0.5)).astype(dt)
            dv_BCKH = dv_BCKH + jnp.einsum("BKGQC,BQKGH->BCKH", p_BKGQC.astype(dt), do_BQKGH,
                                           preferred_element_type=jnp.float32)
            dk_BCKH = dk_BCKH + jnp.einsum("BKGQC,BQKGH->BCKH", ds_BKGQC, q_BQKGH,
                                           preferred_element_type=jnp.float32)
            dq_BQKGH = jnp.einsum("BKGQC,BCKH->BQKGH", ds_BKGQC, k_BCKH, preferred_element_type=jnp.float32)
            dq_BTKGH = lax.dynamic_update_slice_in_dim(dq_BTKGH, _slice(dq_BTKGH, i * bq, bq) + dq_BQKGH,
                                                       i * bq, axis=1)
            return dq_BTKGH, dk_BCKH, dv_BCKH

        def q_step(i, carry):
            return lax.cond(visible_IJ[i, j], accumulate, lambda i, c: c, i, carry)

        zeros_BCKH = jnp.zeros((b, bk, kh, h), jnp.float32)
        dq_BTKGH, dk_BCKH, dv_BCKH = lax.fori_loop(0, t // bq, q_step, (dq_BTKGH, zeros_BCKH, zeros_BCKH))
        return dq_BTKGH, (dk_BCKH, dv_BCKH)

    dq_BTKGH, (dk_JBCKH, dv_JBCKH) = lax.scan(
        kv_block, jnp.zeros(q_BTKGH.shape, jnp.float32), jnp.arange(s // bk)
    )

    def unblock(x_JBCKH, dtype):
        return x_JBCKH.transpose(1, 0, 2, 3, 4).reshape(b, s, kh, h).astype(dtype)

    return (dq_BTKGH.astype(dt), unblock(dk_JBCKH, k_BSKH.dtype), unblock(dv_JBCKH, v_BSKH.dtype),
            None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
