"""Blockwise attention == naive attention (values and gradients), never a [T, T] intermediate;
the fused backends' CPU behaviour (cudnn refuses clearly; splash runs in the Pallas interpreter,
alone and shard_map-ped over a data x fsdp x tensor mesh, and refuses meshes it cannot use)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from covenant_jax.config import ModelConfig
from covenant_jax.model import attention, gpu_attention
from covenant_jax.model.blockwise_attention import blockwise_attention, make_blockwise_attention
from covenant_jax.model.llama import Llama, ModelOptions
from covenant_jax.parallel.sharding import activation_sharding, make_mesh
from tests import helpers

# the real splash kernel in the Pallas interpreter, reachable by name like any backend
attention.register_backend("splash_interpret", gpu_attention.make_splash_attention(128, 128, interpret=True))
SPLASH_MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def _inputs(b=2, t=37, n=4, k=2, h=8, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q, key, v, w = (
        jnp.asarray(rng.normal(size=s), dtype)
        for s in [(b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h)]
    )
    # row 0: two packed samples then padding (id 0); row 1: two samples, no padding
    cut1, cut2 = t // 4, (2 * t) // 3
    seg = np.zeros((b, t), np.int32)
    seg[0, :cut1], seg[0, cut1:cut2] = 1, 2
    seg[1:, :cut2], seg[1:, cut2:] = 3, 4
    return q, key, v, jnp.asarray(seg), w


def _value_and_grads(fn, q, k, v, seg, w, jit):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, seg) * w)

    out = (jax.jit(fn) if jit else fn)(q, k, v, seg)
    grad = jax.grad(loss, argnums=(0, 1, 2))
    return out, (jax.jit(grad) if jit else grad)(q, k, v)


@pytest.mark.parametrize(
    "block_q,block_kv,heads,jit",
    [(8, 16, (4, 2), True), (16, 8, (4, 1), False), (512, 512, (2, 2), True)],
    ids=["q8_kv16_gqa_jit", "q16_kv8_mqa_nojit", "clipped_mha_jit"],
)
def test_matches_naive_values_and_grads(block_q, block_kv, heads, jit):
    """T=37 is not a multiple of any block: the padded tail must not leak into real rows."""
    n, k = heads
    q, key, v, seg, w = _inputs(n=n, k=k)
    fn = make_blockwise_attention(block_q, block_kv)
    out, grads = _value_and_grads(fn, q, key, v, seg, w, jit)
    ref_out, ref_grads = _value_and_grads(attention.naive_attention, q, key, v, seg, w, jit=True)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
    for name, got, want in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_bfloat16_close_to_float32_reference():
    q, key, v, seg, _ = _inputs()
    bf = [x.astype(jnp.bfloat16) for x in (q, key, v)]
    out = jax.jit(make_blockwise_attention(8, 8))(*bf, seg)
    assert out.dtype == jnp.bfloat16
    ref = attention.naive_attention(*[x.astype(jnp.float32) for x in bf], seg)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2, rtol=0)


# ---- memory: no [T, T] anywhere ------------------------------------------------------------

T_LONG = 4096


def _abstract(t, n=2, k=1, h=16):
    f32 = jnp.float32
    return (
        jax.ShapeDtypeStruct((1, t, n, h), f32),
        jax.ShapeDtypeStruct((1, t, k, h), f32),
        jax.ShapeDtypeStruct((1, t, k, h), f32),
        jax.ShapeDtypeStruct((1, t), jnp.int32),
    )


def _fwd_and_grad(fn):
    grad = jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s)), argnums=(0, 1, 2))
    return fn, grad


def _largest_intermediate(jaxpr) -> int:
    """Elements of the largest value any equation produces, nested jaxprs (loops, vjps) included."""
    sizes = [0]
    for eqn in jaxpr.eqns:
        sizes += [int(np.prod(var.aval.shape)) for var in eqn.outvars if hasattr(var.aval, "shape")]
        for param in eqn.params.values():
            for p in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(p, "jaxpr", p)
                if hasattr(inner, "eqns"):
                    sizes.append(_largest_intermediate(inner))
    return max(sizes)


def test_no_t_by_t_intermediate_in_jaxpr():
    args = _abstract(T_LONG)
    for f in _fwd_and_grad(blockwise_attention):
        assert _largest_intermediate(jax.make_jaxpr(f)(*args).jaxpr) < T_LONG * 512 * 2 + 1
    naive_grad = _fwd_and_grad(attention.naive_attention)[1]
    assert _largest_intermediate(jax.make_jaxpr(naive_grad)(*args).jaxpr) >= T_LONG * T_LONG


def test_compiled_temp_memory_is_bounded():
    """memory_analysis at T=4096: naive holds [N, T, T] float32 scores (128 MiB for N=2)."""
    args = _abstract(T_LONG)
    scores_bytes = 2 * T_LONG * T_LONG * 4

    def temp(f):
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    naive_fwd = temp(attention.naive_attention)
    assert naive_fwd >= scores_bytes
    for f in _fwd_and_grad(blockwise_attention):  # measured ~7 MiB forward, ~12 MiB with grads
        assert temp(f) < scores_bytes / 8


# ---- the model with the blockwise and splash backends ---------------------------------------


@pytest.mark.parametrize(
    "backend,mesh_shape",
    [("blockwise", None), ("blockwise_q8_kv8", None), ("splash_interpret", SPLASH_MESH)],
)
def test_llama_logits_match_naive(backend, mesh_shape):
    """splash: the model's sharded activations go through the shard_map (T=29 pads to 128)."""
    attention.register_backend("blockwise_q8_kv8", make_blockwise_attention(8, 8))
    cfg = ModelConfig.from_hf_dict({**helpers.TINY, "model_type": "llama"})
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 29)))
    seg = jnp.asarray(np.array([[1] * 12 + [2] * 13 + [0] * 4, [5] * 29]))
    positions = jnp.asarray(np.array([list(range(12)) + list(range(13)) + [0] * 4, range(29)]))

    def logits(name, mesh=None):
        model = Llama(cfg, ModelOptions(attention=name), rngs=nnx.Rngs(0))
        with activation_sharding(mesh):
            return np.asarray(nnx.jit(lambda m: m(tokens, positions, seg))(model))

    mesh = make_mesh(mesh_shape) if mesh_shape else None
    np.testing.assert_allclose(logits(backend, mesh), logits("naive"), atol=1e-5, rtol=0)


# ---- fused backends on CPU -----------------------------------------------------------------


def test_backends_are_registered():
    assert attention.get_backend("blockwise") is blockwise_attention
    assert attention.get_backend("cudnn") is gpu_attention.cudnn_attention
    assert attention.get_backend("splash") is gpu_attention.splash_attention


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off GPU")
def test_cudnn_refuses_before_compiling_off_gpu():
    q, key, v, seg, _ = _inputs(dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="attention backend 'cudnn' needs a GPU; use 'blockwise'"):
        jax.jit(attention.get_backend("cudnn")).lower(q, key, v, seg)


def test_segment_runs_in_cudnn_packed_convention():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [5] * 7, [1, 2, 3, 4, 5, 6, 7]])
    offsets, lengths, overflow = gpu_attention.segment_runs(seg, max_segments=3)
    np.testing.assert_array_equal(offsets, [[0, 3, 5, -1], [0, -1, -1, -1], [0, 1, 2, -1]])
    np.testing.assert_array_equal(lengths, [[3, 2, 2], [7, -1, -1], [1, 1, 1]])
    np.testing.assert_array_equal(overflow, [False, False, True])  # 7 runs > 3: 4 dropped


def _fake_cudnn_kernel(q, k, v, *, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale, mask_type, qkv_layout):
    """cuDNN's packed layout by its definition, traceable: run j of a row covers tokens
    [offset_j, offset_j + length_j) and attends causally within itself; tokens in no run come
    out zero (what the real kernel leaves there is unspecified)."""
    t = q.shape[1]
    off_BM, len_BM = q_offsets[:, :-1, None], q_seqlen[:, :, None]
    pos_T = jnp.arange(t)[None, None, :]
    in_run_BMT = (off_BM >= 0) & (len_BM >= 0) & (pos_T >= off_BM) & (pos_T < off_BM + len_BM)
    covered_BT = in_run_BMT.any(axis=1)
    seg_BT = jnp.where(covered_BT, jnp.argmax(in_run_BMT, axis=1) + 1, -1 - jnp.arange(t)[None])
    out = attention.naive_attention(q, k, v, seg_BT)
    return jnp.where(covered_BT[:, :, None, None], out, 0).astype(q.dtype)


@pytest.fixture
def fake_gpu(monkeypatch):
    """cudnn_attention's own code on CPU: the platform reads as a GPU and the private cuDNN entry
    point is the fake above."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(gpu_attention, "platform_in_use", lambda: "gpu")
    monkeypatch.setattr(fused_attention_stablehlo, "dot_product_attention", _fake_cudnn_kernel)


def _short_samples(counts, t):
    """Rows of 3-token samples (the worst case for a per-row bound), then padding."""
    seg = np.zeros((len(counts), t), np.int32)
    for row, n in enumerate(counts):
        seg[row, : 3 * n] = np.repeat(np.arange(1, n + 1), 3)
    return jnp.asarray(seg)


@pytest.mark.parametrize("bound", [None, 5])
def test_cudnn_never_drops_a_sample_past_its_bound(fake_gpu, bound):
    """A row within the bound (its padding run included) equals naive attention; a row with one
    sample too many comes out NaN, so the loss stops the run, where it used to lose its tail."""
    n = bound or gpu_attention.DEFAULT_MAX_SAMPLES_PER_ROW
    seg = _short_samples([n, n + 1], t=3 * (n + 1) + 4)
    q, k, v = _inputs(b=2, t=seg.shape[1], dtype=jnp.bfloat16)[:3]
    fn = attention.get_backend("cudnn", max_samples_per_row=bound or 0)
    out = np.asarray(jax.jit(fn)(q, k, v, seg), np.float32)
    ref = np.asarray(attention.naive_attention(q, k, v, seg), np.float32)
    real = np.asarray(seg[0] > 0)
    np.testing.assert_allclose(out[0, real], ref[0, real], atol=1e-2)
    assert np.isnan(out[1]).all()


def test_the_recipe_gives_the_packer_and_cudnn_one_bound(fake_gpu):
    """model.attention='cudnn' with no data.max_samples_per_row takes the backend's default; the
    packer (data section) and the model's kernel (ModelOptions) read the same number."""
    from covenant_jax.train import program, recipe

    cfg = recipe.default_config()
    cfg.model.update(attention="cudnn", param_dtype="bfloat16", dtype="bfloat16")
    recipe.bound_samples_per_row(cfg)
    assert cfg.data.max_samples_per_row == gpu_attention.DEFAULT_MAX_SAMPLES_PER_ROW
    cfg.data.max_samples_per_row = 3
    recipe.bound_samples_per_row(cfg)
    opts = program.model_options(cfg)
    assert cfg.data.max_samples_per_row == opts.max_samples_per_row == 3
    model = Llama(ModelConfig.from_hf_dict({**helpers.TINY, "model_type": "llama"}), opts, rngs=nnx.Rngs(0))
    seg = _short_samples([3, 4], t=16)
    tokens = jnp.ones(seg.shape, jnp.int32)
    logits = np.asarray(nnx.jit(lambda m: m(tokens, None, seg))(model), np.float32)
    assert np.isfinite(logits[0]).all() and np.isnan(logits[1]).all()


def _backend(name):
    """A fresh function per call: jit's trace cache keys on the function and the argument shapes,
    not on the enclosing activation_sharding, so a shared one would replay another mesh's trace."""
    fn = attention.get_backend(name)
    return lambda *args: fn(*args)


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="checks the refusal off TPU")
@pytest.mark.parametrize("mesh_shape", [None, {"fsdp": 8}], ids=["no_mesh", "cpu_mesh"])
def test_splash_refuses_off_tpu(mesh_shape):
    """The check reads the devices in use: the active mesh's (plan lowers on TPU topology
    devices from a CPU host and passes it), else the default backend's."""
    q, key, v, seg, _ = _inputs()
    with activation_sharding(make_mesh(mesh_shape) if mesh_shape else None):
        with pytest.raises(
            gpu_attention.AttentionBackendError,
            match="attention backend 'splash' needs a TPU; use 'blockwise' "
            "\\(the devices in use are 'cpu'\\)",
        ):
            jax.jit(_backend("splash")).lower(q, key, v, seg)


def _shard_map_outputs(fn, *args):
    """The per-device output shapes of the shard_maps in fn's jaxpr."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return [
        tuple(eqn.params["jaxpr"].outvars[0].aval.shape)
        for eqn in jaxpr.eqns
        if eqn.primitive.name == "shard_map"
    ]


@pytest.mark.parametrize(
    "mesh_shape,devices,local_out",
    [(None, None, None), ({"fsdp": 1}, 1, (4, 150, 4, 8)), (SPLASH_MESH, None, (1, 150, 2, 8))],
    ids=["no_mesh", "one_device", "data2_fsdp2_tensor2"],
)
def test_splash_interpreted_matches_naive(mesh_shape, devices, local_out):
    """The real splash kernel in the Pallas interpreter == naive, values and q/k/v gradients:
    packed segments, padding (id 0) in row 0, GQA (4 q heads on 2 kv heads); T=150 pads to two
    128-blocks. Under a mesh it runs in a shard_map whose per-device output is ``local_out``: on
    data2 x fsdp2 x tensor2 each device attends 1 row with 2 q heads on 1 kv head."""
    q, key, v, seg, w = _inputs(b=4, t=150, n=4, k=2, h=8)
    splash = _backend("splash_interpret")
    mesh = make_mesh(mesh_shape, jax.devices()[:devices] if devices else None) if mesh_shape else None
    with activation_sharding(mesh):
        out, grads = _value_and_grads(splash, q, key, v, seg, w, jit=True)
        assert _shard_map_outputs(splash, q, key, v, seg) == ([local_out] if local_out else [])
    ref_out, ref_grads = _value_and_grads(attention.naive_attention, q, key, v, seg, w, jit=True)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
    for name, got, want in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize(
    "mesh_shape,heads,match",
    [
        ({"context": 2, "fsdp": 4}, (4, 2), "splits it 2 ways \\(context axis\\); use attention 'context'"),
        ({"tensor": 2, "fsdp": 4}, (4, 1), "4 query heads split over \\('tensor',\\) but 1 kv heads do not"),
    ],
    ids=["context", "kv_heads_not_divisible"],
)
def test_splash_refuses_meshes_it_cannot_use(mesh_shape, heads, match):
    q, key, v, seg, _ = _inputs(b=4, t=128, n=heads[0], k=heads[1])
    with activation_sharding(make_mesh(mesh_shape)):
        with pytest.raises(gpu_attention.AttentionBackendError, match=match):
            jax.jit(_backend("splash_interpret")).lower(q, key, v, seg)
