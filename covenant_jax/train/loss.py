"""Token cross-entropy returned as (sum, token count), so accumulation and packing normalise by
the true global token count.

``token_nll`` never holds [tokens, vocab] logits: it walks the flattened tokens in chunks of
``chunk_size`` with ``lax.scan``, and its custom VJP recomputes each chunk's logits in the
backward pass from the saved per-token logsumexp, so peak memory in forward and backward is
bounded by chunk_size x V (plus the [D, V] kernel gradient). ``cross_entropy_sum`` is its masked
sum. Logits come from a matmul in the
input dtype with float32 accumulation; softmax statistics and the loss are float32.

Axes: B batch, T sequence, D hidden, V vocab, M = B*T tokens (padded), C chunk, J chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def plain_cross_entropy_sum(
    logits_BTV: jnp.ndarray, targets_BT: jnp.ndarray, loss_mask_BT: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The reference: sum of mask * (logsumexp(logits) - logits[target]) over all tokens."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    mask_BT = loss_mask_BT.astype(jnp.float32)
    loss_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - target_logit_BT
    return jnp.sum(mask_BT * loss_BT), jnp.sum(mask_BT)


def cross_entropy_sum(
    hidden_BTD: jnp.ndarray,
    kernel_DV: jnp.ndarray,
    targets_BT: jnp.ndarray,
    loss_mask_BT: jnp.ndarray,
    *,
    chunk_size: int = 4096,
    unroll: bool = False,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``plain_cross_entropy_sum(hidden @ kernel, ...)`` with logits only ever chunk_size x V.

    Differentiable in ``hidden_BTD`` and ``kernel_DV``."""
    mask_BT = loss_mask_BT.astype(jnp.float32)
    nll_BT = token_nll(hidden_BTD, kernel_DV, targets_BT, chunk_size=chunk_size, unroll=unroll)
    return jnp.sum(mask_BT * nll_BT), jnp.sum(mask_BT)


def token_nll(
    hidden_BTD: jnp.ndarray,
    kernel_DV: jnp.ndarray,
    targets_BT: jnp.ndarray,
    *,
    chunk_size: int = 4096,
    unroll: bool = False,
) -> jnp.ndarray:
    """float32 ``-log p(target)`` of every token [B, T], logits only ever chunk_size x V.

    The one chunked-logits kernel: the SFT loss masks and sums it, preference losses sum it per
    sequence, evaluation reads it. Differentiable in ``hidden_BTD`` and ``kernel_DV`` (any
    cotangent per token); tokens are padded up to a multiple of ``chunk_size`` (clipped to B*T).
    ``unroll``: the chunk loops unrolled (same result; for the compiler's cost model, which
    counts a loop body once).
    """
    b, t, d = hidden_BTD.shape
    m = b * t
    c = min(chunk_size, m)
    pad = -m % c
    j = (m + pad) // c
    hidden_JCD = jnp.pad(hidden_BTD.reshape(m, d), ((0, pad), (0, 0))).reshape(j, c, d)
    targets_JC = jnp.pad(targets_BT.reshape(m).astype(jnp.int32), (0, pad)).reshape(j, c)
    return _chunked_nll(hidden_JCD, kernel_DV, targets_JC, unroll).reshape(-1)[:m].reshape(b, t)


def _chunk_logits(hidden_CD, kernel_DV):
    return jnp.einsum("CD,DV->CV", hidden_CD, kernel_DV, preferred_element_type=jnp.float32)


def _forward(hidden_JCD, kernel_DV, targets_JC, unroll):
    """Per-token NLL and logsumexp, both [J, C] float32."""

    def chunk(_, xs):
        hidden_CD, targets_C = xs
        logits_CV = _chunk_logits(hidden_CD, kernel_DV)
        lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
        target_logit_C = jnp.take_along_axis(logits_CV, targets_C[:, None], axis=-1)[:, 0]
        return None, (lse_C - target_logit_C, lse_C)

    return lax.scan(chunk, None, (hidden_JCD, targets_JC), unroll=unroll)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_nll(hidden_JCD, kernel_DV, targets_JC, unroll):
    return _forward(hidden_JCD, kernel_DV, targets_JC, unroll)[0]


def _chunked_nll_fwd(hidden_JCD, kernel_DV, targets_JC, unroll):
    nll_JC, lse_JC = _forward(hidden_JCD, kernel_DV, targets_JC, unroll)
    return nll_JC, (hidden_JCD, kernel_DV, targets_JC, lse_JC)


def _chunked_nll_bwd(unroll, residuals, g_JC):
    """d nll / d logits = softmax - onehot(target), scaled by each token's cotangent, one chunk
    at a time: logits are recomputed from the saved logsumexp, never stored."""
    hidden_JCD, kernel_DV, targets_JC, lse_JC = residuals
    if unroll:  # unrolled, XLA would merge this recompute with the forward's logits (a scan cannot)
        hidden_JCD, kernel_DV = lax.optimization_barrier((hidden_JCD, kernel_DV))
    v = kernel_DV.shape[1]

    def chunk(dkernel_DV, xs):
        hidden_CD, targets_C, lse_C, g_C = xs
        probs_CV = jnp.exp(_chunk_logits(hidden_CD, kernel_DV) - lse_C[:, None])
        onehot_CV = jax.nn.one_hot(targets_C, v, dtype=jnp.float32)
        dlogits_CV = (g_C.astype(jnp.float32)[:, None] * (probs_CV - onehot_CV)).astype(hidden_CD.dtype)
        dhidden_CD = jnp.einsum("CV,DV->CD", dlogits_CV, kernel_DV, preferred_element_type=jnp.float32)
        dkernel_DV = dkernel_DV + jnp.einsum(
            "CD,CV->DV", hidden_CD, dlogits_CV, preferred_element_type=jnp.float32
        )
        return dkernel_DV, dhidden_CD.astype(hidden_CD.dtype)

    dkernel_DV, dhidden_JCD = lax.scan(
        chunk,
        jnp.zeros(kernel_DV.shape, jnp.float32),
        (hidden_JCD, targets_JC, lse_JC, g_JC),
        unroll=unroll,
    )
    return dhidden_JCD, dkernel_DV.astype(kernel_DV.dtype), None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)
