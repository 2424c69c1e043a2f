"""Fused accelerator attention backends: "cudnn" (NVIDIA GPU) and "splash" (TPU, Pallas).

Both keep ``attention.naive_attention``'s contract (causal, same segment id, GQA, scale
head_dim**-0.5) and check the platform at trace time, so a wrong choice fails with a plain
message before anything compiles. Nothing here is imported from jax's private modules at import
time, so this module loads on any platform.

cudnn: packed rows go to cuDNN's ragged ("packed") layout: each maximal run of one segment id
is one sequence, given by its start offset and length, and cuDNN applies causal masking inside
each. This equals the segment-id mask when every segment id occupies one contiguous run per row
(what packing produces; padding, id 0, is one more run at the end). The run table is static:
``max_samples_per_row`` samples plus the padding run (cuDNN's softmax statistics are
[B * runs, N, T], so the bound stays small). The kernel would drop the runs past the table; a row
that has them comes out NaN instead (the training loop stops on the non-finite loss), and the
packer never makes one: the recipe gives ``data.max_samples_per_row`` (Grain's
``max_sequences_per_bin``) and this bound the same number (``train.recipe.bound_samples_per_row``).
cuDNN needs bfloat16/float16 inputs and jax's private ``jax._src.cudnn`` entry point (the public
``jax.nn.dot_product_attention`` takes no offsets).

splash: jax.experimental.pallas.ops.tpu.splash_attention with a causal mask per head and
``SegmentIds``; GQA is native (q heads a multiple of kv heads). ``interpret=True`` runs the
kernel in the Pallas interpreter on any platform (slow; for tests). XLA cannot partition a
Pallas (Mosaic) kernel, so under an active mesh (``sharding.activation_sharding``) the kernel
runs inside ``jax.shard_map``: batch over the mesh axes of the ``batch`` rule (data, fsdp), q and
kv heads alike over the ``act_kv_heads`` rule's axes (tensor), the sequence whole on every
device. A mesh whose ``seq`` axes (context) are larger than 1 is refused (use the ``context``
backend), and so is a tensor size that divides the q heads but not the kv heads (see
:func:`splash_partition`). Without a mesh the kernel is called directly.

Platform checks look at the devices in use: the active mesh's (e.g. compile-only TPU topology
devices when ``covenant-jax plan`` lowers for a pod from a CPU host), else the default backend.
Refusals are :class:`AttentionBackendError`, a ``UserError`` (the CLI prints one line, exit 2).

Axes: B batch, T sequence, N query heads, K kv heads, H head_dim, M runs (segments) per row.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from covenant_jax.errors import AttentionBackendError
from covenant_jax.model import blockwise_attention as blockwise_lib
from covenant_jax.parallel import sharding as sharding_lib

_PAD_SEGMENT = -1


def platform_in_use() -> str:
    """The platform of the active mesh's devices, else of the default backend."""
    active = sharding_lib.active_sharding()
    if active is not None:
        return active[0].devices.flat[0].platform
    return jax.default_backend()


def _require_platform(platform: str, what: str, name: str) -> None:
    if (found := platform_in_use()) != platform:
        raise AttentionBackendError(
            f"attention backend {name!r} needs a {what}; use 'blockwise' (the devices in use are {found!r})"
        )


# ---- cuDNN ---------------------------------------------------------------------------------


# Packed samples per row cuDNN attends when the recipe sets no data.max_samples_per_row.
DEFAULT_MAX_SAMPLES_PER_ROW = 16


def segment_runs(
    segment_ids_BT: jnp.ndarray, max_segments: int
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Start offsets [B, M+1] and lengths [B, M] of each row's runs of equal segment id, in
    cuDNN's packed-layout convention (unused entries -1), and [B] whether a row has more runs
    than ``max_segments`` (the kernel would not attend the rest)."""
    b, t = segment_ids_BT.shape
    starts_BT = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
    )
    starts_BM1 = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments + 1, fill_value=-1)[0])(starts_BT)
    ends_BM = jnp.where(starts_BM1[:, 1:] >= 0, starts_BM1[:, 1:], t)
    lengths_BM = jnp.where(starts_BM1[:, :-1] >= 0, ends_BM - starts_BM1[:, :-1], -1)
    offsets_BM1 = starts_BM1.at[:, max_segments].set(-1)
    overflow_B = starts_BT.sum(axis=1) > max_segments
    return offsets_BM1.astype(jnp.int32), lengths_BM.astype(jnp.int32), overflow_B


def cudnn_attention(
    q_BTNH: jnp.ndarray,
    k_BSKH: jnp.ndarray,
    v_BSKH: jnp.ndarray,
    segment_ids_BT: jnp.ndarray,
    *,
    max_samples_per_row: int = DEFAULT_MAX_SAMPLES_PER_ROW,
) -> jnp.ndarray:
    """cuDNN flash attention over packed rows (see the module docstring for the contract); a row
    with more samples than the bound is NaN, never attended with samples missing."""
    _require_platform("gpu", "GPU", "cudnn")
    if q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention backend 'cudnn' needs bfloat16 or float16 activations, got {q_BTNH.dtype}; "
            "set ModelOptions(dtype='bfloat16') or use 'blockwise'"
        )
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    offsets_BM1, lengths_BM, overflow_B = segment_runs(segment_ids_BT, max_samples_per_row + 1)
    out_BTNH = dot_product_attention(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        q_seqlen=lengths_BM,
        kv_seqlen=lengths_BM,
        q_offsets=offsets_BM1,
        kv_offsets=offsets_BM1,
        scale=q_BTNH.shape[-1] ** -0.5,
        mask_type=MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH",
    )
    return jnp.where(overflow_B[:, None, None, None], jnp.nan, out_BTNH).astype(out_BTNH.dtype)


def make_cudnn_attention(max_samples_per_row: int):
    """An ``AttentionFn`` attending up to ``max_samples_per_row`` packed samples per row."""
    return functools.partial(cudnn_attention, max_samples_per_row=max_samples_per_row)


# ---- splash (TPU) --------------------------------------------------------------------------


def _splash_kernel(t: int, n: int, bq: int, bk: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.CausalMask((t, t)) for _ in range(n)])
    blocks = splash.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        block_q_dq=bq,
        block_kv_dq=bk,
    )
    return splash.make_splash_mha_single_device(mask, block_sizes=blocks, interpret=interpret)


def splash_partition(mesh, rules: Mapping, b: int, n: int, k: int) -> tuple[P, P]:
    """(q/k/v spec [B, T, heads, H], segment-id spec [B, T]) of splash's ``shard_map`` on
    ``mesh`` (anything with a ``.shape`` mapping axis -> size); refuses a mesh splash cannot use.

    Heads: q and kv heads are split over the same axes, so each device keeps whole GQA groups
    (local q head i reads local kv head i // G). When the tensor axis divides the q heads but not
    the kv heads, this refuses rather than repeating K/V heads up to the tensor size, as MaxText
    does on TPU: its splash ``shard_map`` gives K/V the same head axis as Q (so the kv heads must
    divide it) and repeats K/V heads only for its GPU Pallas kernel, which lacks native GQA.
    Repeating would multiply K/V memory and kernel traffic by tensor / K for a layout that a
    tensor size dividing the kv heads gives for free. (Neither divides: heads stay whole on every
    device, correct but redundant.)
    """
    context = math.prod(mesh.shape[a] for a in rules.get("seq") or ())
    if context > 1:
        raise AttentionBackendError(
            f"attention backend 'splash' keeps each row's sequence whole on a device, but the mesh "
            f"splits it {context} ways (context axis); use attention 'context' (or 'context_zigzag')"
        )
    q_heads = sharding_lib.logical_to_spec(("act_heads",), (n,), mesh, rules)[0]
    kv_heads = sharding_lib.logical_to_spec(("act_kv_heads",), (k,), mesh, rules)[0]
    if sharding_lib.spec_axes(q_heads) != sharding_lib.spec_axes(kv_heads):
        raise AttentionBackendError(
            f"attention backend 'splash' splits query and kv heads alike: {n} query heads split over "
            f"{sharding_lib.spec_axes(q_heads)} but {k} kv heads do not; use a tensor size that divides "
            "num_key_value_heads, or attention 'blockwise'"
        )
    batch = sharding_lib.logical_to_spec(("batch",), (b,), mesh, rules)[0]
    return P(batch, None, kv_heads, None), P(batch, None)


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
    """Splash attention, ``shard_map``-ped over the active mesh (see the module docstring)."""
    if not interpret:
        _require_platform("tpu", "TPU", "splash")
    blockwise_lib.check_self_attention("splash", q_BTNH, k_BSKH)
    b, _, n, _ = q_BTNH.shape
    kh = k_BSKH.shape[2]
    local = functools.partial(_splash_local, block_q=block_q, block_kv=block_kv, interpret=interpret)
    segment_ids_BT = segment_ids_BT.astype(jnp.int32)
    active = sharding_lib.active_sharding()
    if active is None:
        return local(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    mesh, rules = active
    qkv_spec, seg_spec = splash_partition(mesh, rules, b, n, kh)
    # check_vma=False: the kernel's pallas_call declares its outputs without the varying-manual-
    # axes types check_vma=True asks for; the out_spec is still true: the output varies as q does.
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec),
        out_specs=qkv_spec,
        check_vma=False,
    )(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)


def make_splash_attention(block_q: int = 512, block_kv: int = 512, interpret: bool = False):
    """An ``AttentionFn`` with fixed block sizes (``interpret=True``: the Pallas interpreter, for
    tests on any platform), for ``attention.register_backend``."""
    return functools.partial(splash_attention, block_q=block_q, block_kv=block_kv, interpret=interpret)


def _splash_local(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, block_q, block_kv, interpret):
    """The kernel on one device's arrays. Blocks are clipped to T rounded up to 128 (the kernel's
    lane width: its blocks must be multiples of it), and T is padded (segment id -1) up to them."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, n, h = q_BTNH.shape
    lanes = splash.splash_attention_kernel.NUM_LANES
    t_lanes = -(-t // lanes) * lanes
    bq, bk = min(block_q, t_lanes), min(block_kv, t_lanes)
    pad = -t % math.lcm(bq, bk)
    if pad:
        q_BTNH, k_BSKH, v_BSKH = (
            jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BTNH, k_BSKH, v_BSKH)
        )
        segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, pad)), constant_values=_PAD_SEGMENT)
    kernel = _splash_kernel(t + pad, n, bq, bk, interpret)
    q_BNTH = (q_BTNH * jnp.asarray(h**-0.5, q_BTNH.dtype)).transpose(0, 2, 1, 3)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)

    def one_row(q_NTH, k_KSH, v_KSH, seg_T):
        return kernel(q_NTH, k_KSH, v_KSH, segment_ids=splash.SegmentIds(q=seg_T, kv=seg_T))

    out_BNTH = jax.vmap(one_row)(q_BNTH, k_BKSH, v_BKSH, segment_ids_BT)
    return out_BNTH.transpose(0, 2, 1, 3)[:, :t]
