"""Fused accelerator attention backends: "cudnn" (NVIDIA GPU) and "splash" (TPU, Pallas).

Both keep ``attention.naive_attention``'s contract (causal, same segment id, GQA, scale
head_dim**-0.5) and check the platform at trace time, so a wrong choice fails with a plain
message before anything compiles. Nothing here is imported from jax's private modules at import
time, so this module loads on any platform.

cudnn: packed rows go to cuDNN's ragged ("packed") layout: each maximal run of one segment id
is one sequence, given by its start offset and length, and cuDNN applies causal masking inside
each. This equals the segment-id mask when every segment id occupies one contiguous run per row
(what packing produces; padding, id 0, is one more run at the end). ``max_segments`` is a static
upper bound on runs per row: cuDNN's softmax statistics are [B * max_segments, N, T], so keep it
small, and a row with more runs than the bound is attended wrongly (the tail runs are dropped),
so set it from the packer's limit. cuDNN needs bfloat16/float16 inputs and jax's private
``jax._src.cudnn`` entry point (the public ``jax.nn.dot_product_attention`` takes no offsets).

splash: jax.experimental.pallas.ops.tpu.splash_attention with a causal mask per head and
``SegmentIds``; GQA is native (q heads a multiple of kv heads). ``interpret=True`` runs the
kernel in the Pallas interpreter on any platform (slow; for tests).

Axes: B batch, T sequence, N query heads, K kv heads, H head_dim, M max segments per row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_PAD_SEGMENT = -1


def _require_platform(platform: str, what: str, name: str) -> None:
    if jax.default_backend() != platform:
        raise ValueError(
            f"attention backend {name!r} needs a {what}; use 'blockwise' "
            f"(this process runs on {jax.default_backend()!r})"
        )


# ---- cuDNN ---------------------------------------------------------------------------------


def segment_runs(segment_ids_BT: jnp.ndarray, max_segments: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Start offsets [B, M+1] and lengths [B, M] of each row's runs of equal segment id, in
    cuDNN's packed-layout convention (unused entries -1)."""
    b, t = segment_ids_BT.shape
    starts_BT = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
    )
    starts_BM1 = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments + 1, fill_value=-1)[0])(starts_BT)
    ends_BM = jnp.where(starts_BM1[:, 1:] >= 0, starts_BM1[:, 1:], t)
    lengths_BM = jnp.where(starts_BM1[:, :-1] >= 0, ends_BM - starts_BM1[:, :-1], -1)
    offsets_BM1 = starts_BM1.at[:, max_segments].set(-1)  # runs past the bound are dropped
    return offsets_BM1.astype(jnp.int32), lengths_BM.astype(jnp.int32)


def cudnn_attention(
    q_BTNH: jnp.ndarray,
    k_BSKH: jnp.ndarray,
    v_BSKH: jnp.ndarray,
    segment_ids_BT: jnp.ndarray,
    *,
    max_segments: int = 16,
) -> jnp.ndarray:
    """cuDNN flash attention over packed rows (see the module docstring for the contract)."""
    _require_platform("gpu", "GPU", "cudnn")
    if q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention backend 'cudnn' needs bfloat16 or float16 activations, got {q_BTNH.dtype}; "
            "set ModelOptions(dtype='bfloat16') or use 'blockwise'"
        )
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    offsets_BM1, lengths_BM = segment_runs(segment_ids_BT, max_segments)
    return dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH,
        q_seqlen=lengths_BM, kv_seqlen=lengths_BM, q_offsets=offsets_BM1, kv_offsets=offsets_BM1,
        scale=q_BTNH.shape[-1] ** -0.5, mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
    )


# ---- splash (TPU) --------------------------------------------------------------------------


def _splash_kernel(t: int, n: int, bq: int, bk: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.CausalMask((t, t)) for _ in range(n)])
    blocks = splash.BlockSizes(
        block_q=bq, block_kv=bk, block_kv_compute=bk,
        block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
        block_q_dq=bq, block_kv_dq=bk,
    )
    return splash.make_splash_mha_single_device(mask, block_sizes=blocks, interpret=interpret)


def splash_attention(
    q_BTNH: jnp.ndarray,
    k_BSKH: jnp.ndarray,
    v_BSKH: jnp.ndarray,
    segment_ids_BT: jnp.ndarray,
    *,
    block_q: int = 512,
    block_kv: int = 512,
    interpret: bool = False,
) -> jnp.ndarray:
    """Splash attention; T is padded (segment id -1) up to a multiple of the block sizes."""
    if not interpret:
        _require_platform("tpu", "TPU", "splash")
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, n, h = q_BTNH.shape
    bq, bk = min(block_q, t), min(block_kv, t)
    pad = -t % math.lcm(bq, bk)
    if pad:
        q_BTNH, k_BSKH, v_BSKH = (
            jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BTNH, k_BSKH, v_BSKH)
        )
        segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, pad)), constant_values=_PAD_SEGMENT)
    kernel = _splash_kernel(t + pad, n, bq, bk, interpret)
    q_BNTH = (q_BTNH * jnp.asarray(h**-0.5, q_BTNH.dtype)).transpose(0, 2, 1, 3)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    segment_ids_BT = segment_ids_BT.astype(jnp.int32)

    def one_row(q_NTH, k_KSH, v_KSH, seg_T):
        return kernel(q_NTH, k_KSH, v_KSH, segment_ids=splash.SegmentIds(q=seg_T, kv=seg_T))

    out_BNTH = jax.vmap(one_row)(q_BNTH, k_BKSH, v_BKSH, segment_ids_BT)
    return out_BNTH.transpose(0, 2, 1, 3)[:, :t]
