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
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from covenant_jax.config import ModelConfig, RopeConfig
from covenant_jax.errors import RecipeError
from covenant_jax.model import attention as attention_lib
from covenant_jax.model import lora as lora_lib
from covenant_jax.model import rope as rope_lib
from covenant_jax.parallel.sharding import DEFAULT_RULES, shard, state_shardings

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
    time estimate compiles this way.
    ``lora``: adapters on the projections (model/lora.py); the trained adapters are then in
    ``param_dtype`` and the frozen base weights in ``base_dtype``."""

    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "naive"
    max_samples_per_row: int = 0
    scan_unroll: bool = False
    lora: lora_lib.LoraConfig | None = None

    @property
    def base_dtype(self) -> str:
        """The dtype of every weight that is not an adapter."""
        return (self.lora.base_dtype or self.param_dtype) if self.lora else self.param_dtype

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise RecipeError(
                f"model.remat={self.remat!r}: must be one of {', '.join(map(repr, REMAT_POLICIES))}"
            )
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in ("float32", "bfloat16", "float16"):
                raise RecipeError(
                    f"model.{field}={getattr(self, field)!r}: must be float32, bfloat16 or float16"
                )


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


def _add_adapters(module: nnx.Module, opts: ModelOptions, projections: dict, rngs: nnx.Rngs) -> None:
    """An adapter ``{name}_lora`` for each projection the recipe targets; ``projections`` maps a
    name to (inputs, their logical axis, outputs, theirs), flattened over heads."""
    module.lora = opts.lora
    for name, (size_in, axis_in, size_out, axis_out) in projections.items():
        if opts.lora is not None and name in opts.lora.targets:
            setattr(
                module,
                f"{name}_lora",
                lora_lib.new_adapter(
                    opts.lora, size_in, axis_in, size_out, axis_out, opts.dtype, opts.param_dtype, rngs
                ),
            )


def _adapted(
    module: nnx.Module, name: str, out: jnp.ndarray, x_in: jnp.ndarray, adapters: lora_lib.AdapterCall | None
) -> jnp.ndarray:
    """``out`` (projection ``name`` of ``x_in`` [B, T, ...]) plus its adapter's output, if it has
    one and adapters are on."""
    adapter = getattr(module, f"{name}_lora", None)
    if adapter is None or adapters is None or not adapters.on:
        return out
    x_flat = x_in.reshape(*x_in.shape[:2], -1)
    return out + lora_lib.delta(adapter, module.lora, x_flat, adapters.dropout_key(name)).reshape(out.shape)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, opts: ModelOptions, std: float, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        pd = opts.base_dtype
        self.q = _param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), pd, std)
        self.k = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, std)
        self.v = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, std)
        self.o = _param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), pd, std)
        if cfg.attention_bias:
            self.q_bias = _param(rngs, (n, h), ("q_heads", "head_dim"), pd, 0)
            self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), pd, 0)
            self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), pd, 0)
            self.o_bias = _param(rngs, (d,), ("embed",), pd, 0)
        _add_adapters(
            self,
            opts,
            {
                "q": (d, "embed", n * h, "q_heads"),
                "k": (d, "embed", k * h, "kv_heads"),
                "v": (d, "embed", k * h, "kv_heads"),
                "o": (n * h, "q_heads", d, "embed"),
            },
            rngs,
        )
        self.has_bias = cfg.attention_bias
        self.dtype = opts.dtype
        self.attend = attention_lib.get_backend(opts.attention, max_samples_per_row=opts.max_samples_per_row)

    def _project(self, x_BTD, name: str, adapters) -> jnp.ndarray:
        out = jnp.einsum("BTD,DNH->BTNH", x_BTD, getattr(self, name)[...].astype(self.dtype))
        if self.has_bias:
            out = out + getattr(self, f"{name}_bias")[...].astype(self.dtype)
        return _adapted(self, name, out, x_BTD, adapters)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, segment_ids_BT, adapters=None) -> jnp.ndarray:
        q_BTNH = shard(self._project(x_BTD, "q", adapters), ("batch", "seq", "act_heads", None))
        k_BTKH = shard(self._project(x_BTD, "k", adapters), ("batch", "seq", "act_kv_heads", None))
        v_BTKH = shard(self._project(x_BTD, "v", adapters), ("batch", "seq", "act_kv_heads", None))
        q_BTNH = rope_lib.apply_rope(q_BTNH, cos_BTH, sin_BTH)
        k_BTKH = rope_lib.apply_rope(k_BTKH, cos_BTH, sin_BTH)
        out_BTNH = self.attend(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
        out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.o[...].astype(self.dtype))
        if self.has_bias:
            out_BTD = out_BTD + self.o_bias[...].astype(self.dtype)
        return _adapted(self, "o", out_BTD, out_BTNH, adapters)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, opts: ModelOptions, std: float, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, opts.base_dtype
        self.gate = _param(rngs, (d, f), ("embed", "mlp"), pd, std)
        self.up = _param(rngs, (d, f), ("embed", "mlp"), pd, std)
        self.down = _param(rngs, (f, d), ("mlp", "embed"), pd, std)
        if cfg.mlp_bias:
            self.gate_bias = _param(rngs, (f,), ("mlp",), pd, 0)
            self.up_bias = _param(rngs, (f,), ("mlp",), pd, 0)
            self.down_bias = _param(rngs, (d,), ("embed",), pd, 0)
        _add_adapters(
            self,
            opts,
            {"gate": (d, "embed", f, "mlp"), "up": (d, "embed", f, "mlp"), "down": (f, "mlp", d, "embed")},
            rngs,
        )
        self.has_bias = cfg.mlp_bias
        self.dtype = opts.dtype

    def _dense(self, x, name: str, spec: str, adapters) -> jnp.ndarray:
        out = jnp.einsum(spec, x, getattr(self, name)[...].astype(self.dtype))
        if self.has_bias:
            out = out + getattr(self, f"{name}_bias")[...].astype(self.dtype)
        return _adapted(self, name, out, x, adapters)

    def __call__(self, x_BTD, adapters=None) -> jnp.ndarray:
        gate_BTF = self._dense(x_BTD, "gate", "BTD,DF->BTF", adapters)
        up_BTF = self._dense(x_BTD, "up", "BTD,DF->BTF", adapters)
        hidden_BTF = shard(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "seq", "act_mlp"))
        return self._dense(hidden_BTF, "down", "BTF,FD->BTD", adapters)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, opts: ModelOptions, std: float, rngs: nnx.Rngs):
        self.input_norm = _param(rngs, (cfg.hidden_size,), ("norm",), opts.base_dtype, None)
        self.attn = Attention(cfg, opts, std, rngs)
        self.post_attention_norm = _param(rngs, (cfg.hidden_size,), ("norm",), opts.base_dtype, None)
        self.mlp = MLP(cfg, opts, std, rngs)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x_BTD, cos_BTH, sin_BTH, segment_ids_BT, adapters=None) -> jnp.ndarray:
        h_BTD = rms_norm(x_BTD, self.input_norm[...].astype(x_BTD.dtype), self.eps)
        x_BTD = x_BTD + self.attn(h_BTD, cos_BTH, sin_BTH, segment_ids_BT, adapters)
        h_BTD = rms_norm(x_BTD, self.post_attention_norm[...].astype(x_BTD.dtype), self.eps)
        x_BTD = x_BTD + self.mlp(h_BTD, adapters)
        return shard(x_BTD, ("batch", "seq", "act_embed"))


class Llama(nnx.Module):
    """``model(tokens, positions, segment_ids) -> logits``; ``hidden_states`` + ``logits`` split it
    so a chunked loss never holds [tokens, vocab] logits at once."""

    def __init__(self, cfg: ModelConfig, opts: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.config, self.options = cfg, opts
        std = float(cfg.hf_config.get("initializer_range", 0.02))
        pd = opts.base_dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, std)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={"axes": "layers", nnx.PARTITION_NAME: None})
        def make_layers(layer_rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, opts, std, layer_rngs)

        self.layers = make_layers(rngs)
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("norm",), pd, None)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, std)

    def hidden_states(
        self,
        tokens_BT,
        positions_BT=None,
        segment_ids_BT=None,
        *,
        adapters: bool = True,
        dropout_key: jax.Array | None = None,
    ) -> jnp.ndarray:
        """Final-normed hidden states [B, T, D] in the compute dtype. ``adapters=False`` runs the
        frozen base alone (a LoRA model's reference); ``dropout_key`` turns adapter dropout on."""
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
        layer_keys = (
            None if dropout_key is None else jax.random.split(dropout_key, self.config.num_hidden_layers)
        )

        def body(x_BTD, layer_xs):
            one_layer_state, key = layer_xs
            layer = nnx.merge(graphdef, one_layer_state)
            return layer(x_BTD, cos_BTH, sin_BTH, segment_ids_BT, lora_lib.AdapterCall(adapters, key)), None

        if self.options.remat != "none":
            # inside a rolled scan the recompute cannot be merged with the forward; unrolled it can
            body = jax.checkpoint(
                body, policy=REMAT_POLICIES[self.options.remat], prevent_cse=self.options.scan_unroll
            )
        x_BTD, _ = jax.lax.scan(body, x_BTD, (layer_state, layer_keys), unroll=self.options.scan_unroll)
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

    def __call__(
        self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, adapters: bool = True
    ) -> jnp.ndarray:
        return self.logits(self.hidden_states(tokens_BT, positions_BT, segment_ids_BT, adapters=adapters))


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


def base_options(opts: ModelOptions) -> ModelOptions:
    """The options of a LoRA model's base alone: no adapters, weights in the base's dtype."""
    return dataclasses.replace(opts, lora=None, param_dtype=opts.base_dtype)


def add_adapters(
    base: Llama,
    opts: ModelOptions,
    mesh,
    *,
    seed: int = 0,
    load: Callable | None = None,
    rules: Mapping = DEFAULT_RULES,
) -> Llama:
    """``base`` (a model without adapters, in ``opts.base_dtype``) with the adapters ``opts.lora``
    describes, each created on its sharding: PEFT's initialisation from ``seed``, or ``load``'s
    arrays (called with the adapters' sharded ShapeDtypeStructs, a pure dict). The base's
    arrays are reused as they are."""
    graphdef, adapters, params, rest = nnx.split(
        abstract_model(base.config, opts), nnx.LoRAParam, nnx.Param, ...
    )
    shardings = nnx.to_pure_dict(state_shardings(adapters, mesh, rules))
    if load is not None:
        abstract = jax.tree.map(
            lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
            nnx.to_pure_dict(adapters),
            shardings,
        )
        values = load(abstract)
    else:
        init = lambda: nnx.to_pure_dict(
            nnx.state(Llama(base.config, opts, rngs=nnx.Rngs(seed)), nnx.LoRAParam)
        )
        values = jax.jit(init, out_shardings=shardings)()
    nnx.replace_by_pure_dict(adapters, values)
    nnx.replace_by_pure_dict(params, nnx.to_pure_dict(nnx.state(base, nnx.Param)))
    return nnx.merge(graphdef, adapters, params, rest)


def merge_adapters(model: Llama) -> Llama:
    """A plain model (no adapters, weights in the base's dtype) computing what ``model`` does:
    every adapted weight becomes W + scale · A @ B (``lora.merged_kernel``, as PEFT's
    ``merge_and_unload``), on the weight's own sharding; the other weights are shared."""
    lora = model.options.lora
    _, adapters, params, _ = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    adapters, params = nnx.to_pure_dict(adapters), nnx.to_pure_dict(params)

    def merged(params, adapters):
        out = jax.tree.map(lambda x: x, params)
        for module in ("attn", "mlp"):
            for name in lora.targets:
                if f"{name}_lora" in adapters["layers"].get(module, {}):
                    pair = adapters["layers"][module][f"{name}_lora"]
                    out["layers"][module][name] = lora_lib.merged_kernel(
                        params["layers"][module][name], pair["lora_a"], pair["lora_b"], lora.scale
                    )
        return out

    shardings = jax.tree.map(lambda x: x.sharding, params)
    plain_graphdef, plain_params, rest = nnx.split(
        abstract_model(model.config, base_options(model.options)), nnx.Param, ...
    )
    nnx.replace_by_pure_dict(plain_params, jax.jit(merged, out_shardings=shardings)(params, adapters))
    return nnx.merge(plain_graphdef, plain_params, rest)
