"""Device backends vs the blockwise reference, values and gradients (run on a GPU or TPU host).

    python tools/check_gpu_attention.py            # cudnn on GPU, splash on TPU; exit 1 on mismatch

Packed rows with padding (segment ids), GQA, causal; bf16 inputs, compared in float32 against
`blockwise` on the same inputs. Prints max |difference| of the output and of dq, dk, dv.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from covenant_jax.model.attention import get_backend


def packed_segments(batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(64, seq - 64), size=3, replace=False))
        row = np.zeros(seq, np.int32)
        for i, (a, b) in enumerate(zip([0, *cuts[:-1]], cuts), start=1):
            row[a:b] = i
        rows.append(row)  # after the last cut: padding (segment 0)
    return np.stack(rows)


def main(seq: int = 2048, heads: int = 16, kv_heads: int = 4, head_dim: int = 128, tol: float = 2e-2) -> int:
    backend = {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend())
    if backend is None:
        print(f"no device backend on {jax.default_backend()!r}: run this on a GPU or TPU host")
        return 1
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.standard_normal((2, seq, n, head_dim)), jnp.bfloat16)
        for n in (heads, kv_heads, kv_heads)
    )
    seg = jnp.asarray(packed_segments(2, seq, rng))
    valid = (seg > 0)[:, :, None, None]

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(valid, fn(q, k, v, seg).astype(jnp.float32), 0.0) ** 2)

    results = {}
    for name in ("blockwise", backend):
        fn = get_backend(name)
        out = jax.jit(fn)(q, k, v, seg)
        grads = jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(q, k, v)
        results[name] = [out, *grads]
    ok = True
    for label, a, b in zip(("out", "dq", "dk", "dv"), results["blockwise"], results[backend]):
        mask = valid if label in ("out", "dq") else True
        diff = float(jnp.max(jnp.where(mask, jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)), 0)))
        scale = float(jnp.max(jnp.abs(a.astype(jnp.float32)))) or 1.0
        ok &= diff <= tol * scale
        print(f"{backend} vs blockwise {label}: max |diff| {diff:.3e} (scale {scale:.3e})")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
