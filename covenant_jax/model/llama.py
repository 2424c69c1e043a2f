"""Llama-family decoder (Llama, Mistral without sliding window) in Flax NNX.

HF layout inside: split-half RoPE, kernels stored [in, out] with heads split out (q kernel is
[D, N, H]), nothing folded into weights, so conversion is transpose / reshape / stack only and
round trips are bit-exact. Layers are stacked on a leading axis and run with ``lax.scan``, so an
80-layer model compiles as fast as a 2-layer one.
Parameters are kept in ``param_dtype`` and cast to the compute ``dtype`` at use; norms,
softmax and RoPE tables are computed in float32.

Axes: B batch, T sequence, D hidden, N query heads, K kv heads, H head_dim, F mlp, V vocab,
L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from covenant_jax.config import ModelConfig, RopeConfig
from covenant_jax.errors import RecipeError
from covenant_jax.model import attention as attention_lib
from covenant_jax.model import rope as rope_lib
from covenant_jax.parallel.sharding import shard

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # keep the projections' outputs, recompute attention and elementwise work
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # like save_dots, but the saved activations live in host memory
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How to run a model (not what it is): dtypes, remat and attention backend.
    ``max_samples_per_row``: the packer's bound (data.max_samples_per_row), which sizes the
    per-row sample table of a backend that has one (cudnn); 0 = the backend's default.
    ``scan_unroll``: run the layers as an unrolled loop (same result, one copy of the layer per
    layer in the program): the compiler's cost model counts a loop body once, so ``plan``'s step
    time estimate compiles this way."""

    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "naive"
    max_samples_per_row: int = 0
    scan_unroll: bool = False

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise RecipeError(f"model.remat={self.remat!r}: must be one of {', '.join(map(repr, REMAT_POLICIES))}")
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in ("float32", "bfloat16", "float16"):
                raise RecipeError(f"model.{field}={getattr(self, field)!r}: must be float32, bfloat16 or float16")


def _param(rngs: nnx.Rngs, shape, axes, dtype, std: float | None) -> nnx.Param:
    """std None means ones (norm scales); 0 means zeros (biases)."""
    if std is None:
        value = jnp.ones(shape, dtype)
    elif std == 0:
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float) -> jnp.ndarray:
    """transformers' LlamaRMSNorm: normalise in float32, cast back, then multiply by the scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale * normed.astype(x.dtype)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, opts: ModelOptions, std: float, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        pd = opts.param_dtype
        self.q = _param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), pd, std)
        self.k = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, std)
        self.v = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, std)
        self.o = _param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), pd, std)
        if cfg.attention_bias:
            self.q_bias = _param(rngs, (n, h), ("q_heads", "head_dim"), pd, 0)
            self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), pd, 0)
            self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), pd, 0)
            self.o_bias = _param(rngs, (d,), ("embed",), pd, 0)
        self.has_bias = cfg.attention_bias
        self.dtype = opts.dtype
        self.attend = attention_lib.get_backend(opts.attention, max_samples_per_row=opts.max_samples_per_row)

    def _project(self, x_BTD, name: str) -> jnp.ndarray:
        out = jnp.einsum("BTD,DNH->BTNH", x_BTD, getattr(self, name)[...].astype(self.dtype))
        if self.has_bias:
            out = out + getattr(self, f"{name}_bias")[...].astype(self.dtype)
        return out

    def __call__(self, x_BTD, cos_BTH, sin_BTH, segment_ids_BT) -> jnp.ndarray:
        q_BTNH = shard(self._project(x_BTD, "q"), ("batch", "seq", "act_heads", None))
        k_BTKH = shard(self._project(x_BTD, "k"), ("batch", "seq", "act_kv_heads", None))
        v_BTKH = shard(self._project(x_BTD, "v"), ("batch", "seq", "act_kv_heads", None))
        q_BTNH = rope_lib.apply_rope(q_BTNH, cos_BTH, sin_BTH)
        k_BTKH = rope_lib.apply_rope(k_BTKH, cos_BTH, sin_BTH)
        out_BTNH = self.attend(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
        out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.o[...].astype(self.dtype))
        if self.has_bias:
            out_BTD = out_BTD + self.o_bias[...].astype(self.dtype)
        return out_BTD


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, opts: ModelOptions, std: float, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, opts.param_dtype
        self.gate = _param(rngs, (d, f), ("embed", "mlp"), pd, std)
        self.up = _param(rngs, (d, f), ("embed", "mlp"), pd, std)
        self.down = _param(rngs, (f, d), ("mlp", "embed"), pd, std)
        if cfg.mlp_bias:
            self.gate_bias = _param(rngs, (f,), ("mlp",), pd, 0)
            self.up_bias = _param(rngs, (f,), ("mlp",), pd, 0)
            self.down_bias = _param(rngs, (d,), ("embed",), pd, 0)
        self.has_bias = cfg.mlp_bias
        self.dtype = opts.dtype

    def _dense(self, x, name: str, spec: str) -> jnp.ndarray:
        out = jnp.einsum(spec, x, getattr(self, name)[...].astype(self.dtype))
        if self.has_bias:
            out = out + getattr(self, f"{name}_bias")[...].astype(self.dtype)
        return out

    def __call__(self, x_BTD) -> jnp.ndarray:
        gate_BTF = self._dense(x_BTD, "gate", "BTD,DF->BTF")
        up_BTF = self._dense(x_BTD, "up", "BTD,DF->BTF")
        hidden_BTF = shard(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "seq", "act_mlp"))
        return self._dense(hidden_BTF, "down", "BTF,FD->BTD")


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, opts: ModelOptions, std: float, rngs: nnx.Rngs):
        self.input_norm = _param(rngs, (cfg.hidden_size,), ("norm",), opts.param_dtype, None)
        self.attn = Attention(cfg, opts, std, rngs)
        self.post_attention_norm = _param(rngs, (cfg.hidden_size,), ("norm",), opts.param_dtype, None)
        self.mlp = MLP(cfg, opts, std, rngs)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x_BTD, cos_BTH, sin_BTH, segment_ids_BT) -> jnp.ndarray:
        h_BTD = rms_norm(x_BTD, self.input_norm[...].astype(x_BTD.dtype), self.eps)
        x_BTD = x_BTD + self.attn(h_BTD, cos_BTH, sin_BTH, segment_ids_BT)
        h_BTD = rms_norm(x_BTD, self.post_attention_norm[...].astype(x_BTD.dtype), self.eps)
        x_BTD = x_BTD + self.mlp(h_BTD)
        return shard(x_BTD, ("batch", "seq", "act_embed"))


class Llama(nnx.Module):
    """``model(tokens, positions, segment_ids) -> logits``; ``hidden_states`` + ``logits`` split it
    so a chunked loss never holds [tokens, vocab] logits at once."""

    def __init__(self, cfg: ModelConfig, opts: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.config, self.options = cfg, opts
        std = float(cfg.hf_config.get("initializer_range", 0.02))
        pd = opts.param_dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, std)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={"axes": "layers", nnx.PARTITION_NAME: None})
        def make_layers(layer_rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, opts, std, layer_rngs)

        self.layers = make_layers(rngs)
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("norm",), pd, None)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, std)

    def hidden_states(self, tokens_BT, positions_BT=None, segment_ids_BT=None) -> jnp.ndarray:
        """Final-normed hidden states [B, T, D] in the compute dtype."""
        dtype = self.options.dtype
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones(tokens_BT.shape, jnp.int32)
        x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dtype)
        x_BTD = shard(x_BTD, ("batch", "seq", "act_embed"))
        # From the config at trace time, so a model whose RoPE scaling is changed (long-context
        # extension) needs no rebuild.
        inv_freq, scale = rope_lib.inverse_frequencies(self.config.rope, self.config.head_dim)
        cos_BTH, sin_BTH = rope_lib.rope_cos_sin(positions_BT, inv_freq, scale, dtype)

        graphdef, layer_state = nnx.split(self.layers)

        def body(x_BTD, one_layer_state):
            layer = nnx.merge(graphdef, one_layer_state)
            return layer(x_BTD, cos_BTH, sin_BTH, segment_ids_BT), None

        if self.options.remat != "none":
            # inside a rolled scan the recompute cannot be merged with the forward; unrolled it can
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.options.remat],
                                  prevent_cse=self.options.scan_unroll)
        x_BTD, _ = jax.lax.scan(body, x_BTD, layer_state, unroll=self.options.scan_unroll)
        return rms_norm(x_BTD, self.final_norm[...].astype(dtype), self.config.rms_norm_eps)

    def output_kernel(self) -> jnp.ndarray:
        """[D, V] in the compute dtype (the embedding, transposed, when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed[...].T.astype(self.options.dtype)
        return self.lm_head[...].astype(self.options.dtype)

    def logits(self, hidden_BTD) -> jnp.ndarray:
        """float32 logits; the matmul runs in the compute dtype with float32 accumulation."""
        logits_BTV = jnp.einsum(
            "BTD,DV->BTV", hidden_BTD, self.output_kernel(), preferred_element_type=jnp.float32
        )
        return shard(logits_BTV, ("batch", "seq", "act_vocab"))

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None) -> jnp.ndarray:
        return self.logits(self.hidden_states(tokens_BT, positions_BT, segment_ids_BT))


def abstract_model(cfg: ModelConfig, opts: ModelOptions = ModelOptions()) -> Llama:
    """The model with ShapeDtypeStructs for weights (``nnx.eval_shape``): shapes, dtypes and
    logical axes to derive shardings from, before (or instead of) any weight exists."""
    return nnx.eval_shape(lambda: Llama(cfg, opts, rngs=nnx.Rngs(0)))


def with_rope(model: Llama, rope: RopeConfig, max_position_embeddings: int) -> Llama:
    """The same parameters under another RoPE (a long-context recipe, YaRN at evaluation): the
    one way to change it. The forward reads RoPE from ``model.config`` at trace time, so this is
    a new model object over the same (unchanged, not copied) arrays with the config swapped."""
    graphdef, state = nnx.split(model)
    swapped = nnx.merge(graphdef, state)
    swapped.config = model.config.with_rope(rope, max_position_embeddings)
    return swapped
