"""LoRA adapters on the decoder's projections, with Flax NNX's own ``nnx.LoRA`` and ``LoRAParam``.

Each targeted projection W (q, k, v, o, gate, up, down) gets an ``nnx.LoRA`` holding A [in, r]
and B [r, out], with in / out flattened over heads where W has them (q: D -> N·H, o: N·H -> D),
which is PEFT's ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r] transposed. The forward
adds ``scale · (dropout(x) @ A @ B)`` to the projection's output, exactly as PEFT's ``Linear``:
``scale = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA. A starts as PEFT's (kaiming-uniform,
a = sqrt(5): U(±1/sqrt(in))), B at zero, so a fresh adapter leaves the model unchanged.

Created inside the layers' ``nnx.vmap``, the adapters are stacked on the layers axis like the
weights they adapt, and carry logical axes: A (W's input axis, ``lora_rank``), B (``lora_rank``,
W's output axis); ``lora_rank`` is replicated by the rule table. ``LoRAParam`` subclasses
``Param``, so ``nnx.split(model, nnx.LoRAParam, nnx.Param, ...)`` separates the trained
adapters from the frozen base.

Why not qwix (docs/architecture.md, Model): its LoRA provider creates A and B lazily, at the
first call, inside whatever module runs the einsum: in our scanned layers that is a temporary
module merged in the scan body, so the adapters never reach the stacked state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from covenant_jax import fields
from covenant_jax.errors import RecipeError

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
PEFT_NAMES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
# The HF submodule each projection lives in (PEFT's key names follow the HF model).
HF_MODULES = {
    "q": "self_attn",
    "k": "self_attn",
    "v": "self_attn",
    "o": "self_attn",
    "gate": "mlp",
    "up": "mlp",
    "down": "mlp",
}
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head
_BY_NAME = {**{t: t for t in TARGETS}, **{p: t for t, p in PEFT_NAMES.items()}}


def normalize_targets(names: str | Iterable[str], what: str = "model.lora.targets") -> tuple[str, ...]:
    """Our names or PEFT's (``q_proj`` ...), or ``all-linear``, -> our names in a fixed order; a
    name may list several, comma-separated (``--config.model.lora.targets=q,v``)."""
    names = [names] if isinstance(names, str) else list(names)
    names = [part.strip() for name in names for part in str(name).split(",") if part.strip()]
    if ALL_LINEAR in names:
        return TARGETS
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown or not names:
        raise RecipeError(
            f"{what}={tuple(names)!r}: {'no target' if not names else repr(unknown[0]) + ' matches no module'}; "
            f"targets are {', '.join(TARGETS)} (or PEFT's {', '.join(PEFT_NAMES.values())}, or "
            f"{ALL_LINEAR!r})"
        )
    chosen = {_BY_NAME[n] for n in names}
    return tuple(t for t in TARGETS if t in chosen)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What the adapters are: rank, alpha, dropout, targets, rsLoRA; and the frozen base's dtype
    (``base_dtype``; "" keeps the model's ``param_dtype``, which the adapters always have)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    rslora: bool = False
    base_dtype: str = ""

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise RecipeError(f"model.lora.rank={self.rank!r}: must be an integer >= 1")
        checks = {
            "alpha": fields.positive(),
            "dropout": fields.within(0, 1, high_open=True),
            "base_dtype": fields.one_of(("",) + fields.DTYPES),
        }
        fields.check("model.lora", dataclasses.asdict(self), checks)
        object.__setattr__(self, "targets", normalize_targets(self.targets))

    @property
    def scale(self) -> float:
        """PEFT's ``scaling``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def num_params(cfg, lora: LoraConfig) -> int:
    """The adapters' parameter count on a model of config ``cfg`` (a ModelConfig): r·(in + out)
    per targeted projection and layer."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * h, cfg.num_key_value_heads * h
    sizes = {"q": d + q, "k": d + kv, "v": d + kv, "o": q + d, "gate": d + f, "up": d + f, "down": f + d}
    return cfg.num_hidden_layers * lora.rank * sum(sizes[t] for t in lora.targets)


# PEFT's default init of lora_A: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)).
A_INIT = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def new_adapter(
    cfg: LoraConfig,
    size_in: int,
    axis_in: str,
    size_out: int,
    axis_out: str,
    dtype: str,
    param_dtype: str,
    rngs: nnx.Rngs,
) -> nnx.LoRA:
    """An ``nnx.LoRA`` for a projection [size_in -> size_out] whose flattened input and output
    axes are sharded as ``axis_in`` / ``axis_out``; computes in ``dtype``."""
    return nnx.LoRA(
        size_in,
        cfg.rank,
        size_out,
        dtype=jnp.dtype(dtype),
        param_dtype=jnp.dtype(param_dtype),
        a_initializer=A_INIT,
        rngs=rngs,
        a_metadata={"axes": (axis_in, "lora_rank")},
        b_metadata={"axes": ("lora_rank", axis_out)},
    )


@dataclasses.dataclass(frozen=True)
class AdapterCall:
    """How the adapters run in one forward pass: on or off (the frozen base alone, e.g. DPO's
    reference), and the dropout key of this layer (None: no dropout, as in evaluation)."""

    on: bool = True
    key: jax.Array | None = None

    def dropout_key(self, target: str) -> jax.Array | None:
        return None if self.key is None else jax.random.fold_in(self.key, TARGETS.index(target))


def delta(adapter: nnx.LoRA, cfg: LoraConfig, x_in: jax.Array, key: jax.Array | None) -> jax.Array:
    """``scale · (dropout(x) @ A @ B)`` for inputs [..., in]: what the adapter adds to W's output."""
    if key is not None and cfg.dropout > 0:
        x_in = nnx.Dropout(cfg.dropout)(x_in, rngs=key)
    return adapter(x_in) * jnp.asarray(cfg.scale, adapter.dtype)


def merged_kernel(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
    """W + scale · A @ B in W's shape and dtype, as PEFT's ``merge_and_unload``: the product in
    float32 (full precision also on TPU), added to W in float32 and rounded to W's dtype once.
    Shapes: kernel [L, *in, *out] (stacked), A [L, in, r], B [L, r, out]."""
    delta_LIO = jnp.einsum(
        "LIr,LrO->LIO",
        lora_a.astype(jnp.float32),
        lora_b.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    ) * jnp.float32(scale)
    return (kernel.astype(jnp.float32) + delta_LIO.reshape(kernel.shape)).astype(kernel.dtype)
