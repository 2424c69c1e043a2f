"""Context parallelism (T over the ``context`` mesh axis) == one device: attention values and
q/k/v gradients, the Llama forward and a loss gradient, contiguous and zigzag layouts; the
activations really are T-sharded (compiled HLO); no mesh falls back to blockwise."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from covenant_jax.config import ModelConfig
from covenant_jax.model import attention, context_parallel as cp
from covenant_jax.model.blockwise_attention import blockwise_attention
from covenant_jax.model.llama import Llama, ModelOptions
from covenant_jax.parallel.sharding import activation_sharding, make_mesh
from tests import helpers

T = 32


def _segments(b, t):
    """Row 0: two packed samples, then padding (id 0); row 1: two samples (a boundary mid-chunk)."""
    seg = np.zeros((b, t), np.int32)
    seg[0, :7], seg[0, 7:25] = 1, 2
    seg[1:, :19], seg[1:, 19:] = 3, 4
    return seg


def _positions(seg):
    pos = np.zeros_like(seg)
    for r in range(seg.shape[0]):
        for s in np.unique(seg[r]):
            idx = np.nonzero(seg[r] == s)[0]
            pos[r, idx] = np.arange(len(idx))
    return pos


def _attn_inputs(n, k, b=2, t=T, h=8, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h)]
    q, key, v, w = (rng.normal(size=s).astype(np.float32) for s in shapes)
    return q, key, v, _segments(b, t), w


def _attn_value_and_grads(fn, q, k, v, seg, w):
    def loss(q, k, v):
        out = fn(q, k, v, seg)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(out), [np.asarray(g) for g in grads]


def test_zigzag_order():
    np.testing.assert_array_equal(cp.zigzag_order(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
    order = cp.zigzag_order(T, 4)
    assert sorted(order) == list(range(T))
    x = np.arange(2 * T).reshape(2, T)
    np.testing.assert_array_equal(cp.zigzag_unpermute(cp.zigzag_permute({"x": x}, 4)["x"], 4), x)
    with pytest.raises(ValueError, match="multiple of 2 \\* context"):
        cp.zigzag_order(12, 4)


@pytest.mark.parametrize(
    "mesh_shape,heads,layout",
    [
        ({"context": 4, "fsdp": 2}, (4, 2), "contiguous"),
        ({"context": 2, "tensor": 2, "fsdp": 2}, (4, 1), "zigzag"),
    ],
    ids=["context4_fsdp2_gqa", "context2_tensor2_mqa_zigzag"],
)
def test_attention_matches_single_device(mesh_shape, heads, layout):
    """Segment ids + GQA + causal; small blocks so several key blocks are skipped or visited."""
    q, k, v, seg, w = _attn_inputs(*heads)
    ref_out, ref_grads = _attn_value_and_grads(attention.naive_attention, q, k, v, seg, w)
    mesh = make_mesh(mesh_shape)
    c = mesh.shape["context"]
    order = cp.zigzag_order(T, c) if layout == "zigzag" else np.arange(T)
    inverse = np.argsort(order)
    with activation_sharding(mesh):
        out, grads = _attn_value_and_grads(
            cp.make_context_attention(layout, block_q=4, block_kv=4),
            *(x[:, order] for x in (q, k, v, seg, w)),
        )
    np.testing.assert_allclose(out[:, inverse], ref_out, atol=1e-5, rtol=0)
    for name, got, want in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(got[:, inverse], want, atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_indexed_kernel_pads_lengths_that_blocks_do_not_divide():
    """The local kernel alone (what each device runs), T=37 with blocks 8 / 16: padded query rows
    and keys must not leak; keys given in a shuffled order with their indices."""
    q, k, v, seg, w = _attn_inputs(4, 2, t=37)
    ref_out, ref_grads = _attn_value_and_grads(attention.naive_attention, q, k, v, seg, w)
    perm = np.random.default_rng(0).permutation(37)

    def fn(q, k, v, seg):
        return cp.indexed_attention(q, k[:, perm], v[:, perm], seg, seg[:, perm], np.arange(37), perm, 8, 16)

    out, grads = _attn_value_and_grads(fn, q, k, v, seg, w)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
    for name, got, want in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_no_mesh_falls_back_to_blockwise():
    q, k, v, seg, _ = _attn_inputs(4, 2)
    want = jax.jit(blockwise_attention)(q, k, v, seg)
    for mesh in (None, make_mesh({"fsdp": 8})):  # no mesh; a mesh with context size 1
        with activation_sharding(mesh):
            out = jax.jit(attention.get_backend("context"))(q, k, v, seg)
        np.testing.assert_array_equal(out, want)


# ---- the Llama model -----------------------------------------------------------------------


CFG = ModelConfig.from_hf_dict({**helpers.TINY, "model_type": "llama"})


@pytest.fixture(scope="module")
def params():
    """Random values from numpy into the abstract model's state (jax.random init compiles a
    threefry kernel per parameter shape: ~7 CPU-seconds here); norm scales around 1."""
    state = nnx.split(nnx.eval_shape(lambda: Llama(CFG, rngs=nnx.Rngs(0))))[1]
    rng = np.random.default_rng(0)

    def init(path, x):
        noise = rng.normal(size=x.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if "norm" in jax.tree_util.keystr(path) else 0.05 * noise)

    return jax.tree_util.tree_map_with_path(init, state)


def _model_loss_fn(backend):
    graphdef = nnx.split(
        nnx.eval_shape(lambda: Llama(CFG, ModelOptions(attention=backend), rngs=nnx.Rngs(0)))
    )[0]

    def loss(params, batch):
        logits = nnx.merge(graphdef, params)(batch["tokens"], batch["positions"], batch["segment_ids"])
        logp = jax.nn.log_softmax(logits, axis=-1)
        token_logp = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return -jnp.sum(token_logp * batch["loss_mask"]), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _batch():
    rng = np.random.default_rng(1)
    seg = _segments(2, T)
    tokens = rng.integers(0, helpers.TINY["vocab_size"], (2, T)).astype(np.int32)
    targets = np.roll(tokens, -1, axis=1)
    mask = ((seg != 0) & (seg == np.roll(seg, -1, axis=1))).astype(np.float32)
    return {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": mask,
        "segment_ids": seg,
        "positions": _positions(seg),
    }


@pytest.fixture(scope="module")
def reference(params):
    (loss, logits), grads = _model_loss_fn("naive")(params, _batch())
    return float(loss), np.asarray(logits), jax.tree.map(np.asarray, grads)


def _check(reference, loss, logits, grads):
    ref_loss, ref_logits, ref_grads = reference
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-5, rtol=0)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(
            np.asarray(got), want, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path)
        )


def test_llama_context4_equals_single_device_and_is_t_sharded(reference, params):
    fn = _model_loss_fn("context")
    batch = _batch()
    mesh = make_mesh({"context": 4, "fsdp": 2})
    with activation_sharding(mesh):
        compiled = fn.lower(params, batch).compile()
    (loss, logits), grads = compiled(params, batch)
    _check(reference, loss, logits, grads)

    # T really is sharded: logits leave as [B/fsdp, T/context], each layer's projections run on
    # B/2 * T/4 = 8 rows per device, and K/V (f32[1, 32, 2, 16]) are all-gathered over the 4
    # devices of a context group along T.
    assert tuple(compiled.output_shardings[0][1].spec)[:2] == ("fsdp", "context")
    hlo = compiled.as_text()
    gathers = re.findall(
        r"f32\[1,32,2,16\]\S* all-gather\(.*replica_groups=\{\{0,1,2,3\},\{4,5,6,7\}\}, dimensions=\{1\}", hlo
    )
    assert len(gathers) >= 2, "K and V all-gathered along T over context"
    forward_proj = [
        re.search(r"= f32\[(\d+),\d+\]", line).group(1)
        for line in hlo.splitlines()
        if " dot(" in line and "BTD,DNH->BTNH" in line and "transpose(" not in line
    ]
    assert forward_proj and set(forward_proj) == {"8"}, forward_proj


def test_llama_zigzag_permuted_batch_equals_single_device(reference, params):
    """Permute the whole batch (never un-permuted): the loss and its gradient are unchanged,
    the logits come back in token order with zigzag_unpermute."""
    fn = _model_loss_fn("context_zigzag")
    batch = cp.zigzag_permute(_batch(), 4)
    with activation_sharding(make_mesh({"context": 4, "fsdp": 2})):
        (loss, logits), grads = fn(params, batch)
    _check(reference, loss, cp.zigzag_unpermute(logits, 4), grads)
