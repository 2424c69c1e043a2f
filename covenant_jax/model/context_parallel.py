"""Context parallelism: one long sequence spread over the ``context`` mesh axis.

Backends ``"context"`` and ``"context_zigzag"`` (registered in ``attention.py``; pick with
``ModelOptions(attention=...)``). Everything outside attention is per token (norms, MLP, RoPE
from the ``positions`` input, the loss), so it already runs on a T-sharded activation; only
attention needs the other devices' tokens.

All-gather design (exact): inside ``jax.shard_map`` over the mesh axes that the logical ``seq``
rule maps to (``context``), each device holds a [B, T/C] chunk of queries, keys, values and
segment ids; it all-gathers K, V and the segment ids along the sequence axis and runs a
flash kernel (``flash.indexed_attention``, the one blockwise attention uses too) of its query
chunk against the full [B, T] K/V. The kernel's causal mask uses each token's *original* index
in the row (explicit index arrays, not offsets), so any layout of the sequence over devices is
exact. The kernel's backward is a ``custom_vjp``; the all-gather sits outside it, so JAX
transposes it to a reduce-scatter of dK / dV. Batch and heads stay sharded as the logical
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

Axes: B batch, T local query length, S full key length, N query heads, K kv heads, H head_dim.
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
from covenant_jax.model.flash import check_self_attention, indexed_attention
from covenant_jax.parallel import sharding as sharding_lib

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
    check_self_attention("context", q_BTNH, k_BSKH)
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
        local,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec),
        out_specs=qkv_spec,
        check_vma=False,
    )(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT.astype(jnp.int32))


def make_context_attention(layout: Layout = "contiguous", block_q: int = 512, block_kv: int = 512):
    """An ``AttentionFn`` with a fixed layout and block sizes (for ``attention.register_backend``)."""
    return functools.partial(context_attention, layout=layout, block_q=block_q, block_kv=block_kv)
