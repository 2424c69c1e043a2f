"""Model configuration <-> HF ``config.json``.

The model's shape always comes from the checkpoint's config.json; recipes never repeat it.
Both transformers spellings of RoPE are read: v4 (``rope_theta`` + ``rope_scaling`` with
``type`` or ``rope_type``) and v5 (``rope_parameters`` with ``rope_type`` and ``rope_theta``).
Writing keeps the spelling the source used, so a round trip leaves config.json unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from covenant_jax import storage
from covenant_jax.errors import UserError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# RoPE fields each type reads (beyond theta); anything else in the dict is kept but unused.
_ROPE_KNOBS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
        "mscale_all_dim", "attention_factor", "truncate",
    ),
}


class ConfigError(UserError):
    """A config.json (or recipe) field is missing, unsupported or inconsistent."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Every RoPE knob transformers reads for the supported types (None = its default)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool | None = None

    def scaling_dict(self) -> dict[str, Any]:
        """The knobs of this type that are set, keyed as transformers spells them."""
        return {
            k: getattr(self, k) for k in _ROPE_KNOBS[self.rope_type] if getattr(self, k) is not None
        }


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder's shape, read from (and written back to) config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    rope: RopeConfig = RopeConfig()
    architecture: str = "LlamaForCausalLM"
    # The source config.json, so fields we do not model (bos/eos ids, dtype, ...) survive export.
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def num_query_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_params(self) -> int:
        d, f, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        n, k, h = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = d * h * (2 * n + 2 * k) + (h * (n + 2 * k) + d if self.attention_bias else 0)
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        embed = v * d * (1 if self.tie_word_embeddings else 2)
        return l * (attn + mlp + 2 * d) + embed + d

    # ---- config.json ----------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        arch = _architecture(hf)
        if hf.get("sliding_window") not in (None, 0) and hf["sliding_window"] < hf.get(
            "max_position_embeddings", math.inf
        ):
            raise ConfigError(
                f"config.json: sliding_window={hf['sliding_window']} is not supported "
                "(only full attention); set it to null"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if not isinstance(hf.get(key), int) or hf[key] <= 0:
                raise ConfigError(f"config.json: '{key}' must be a positive integer, got {hf.get(key)!r}")
        heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ConfigError(
                f"config.json: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}"
            )
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        max_pos = hf.get("max_position_embeddings", 2048)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6 if arch == "MistralForCausalLM" else 1e-5)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            rope=_read_rope(hf, max_pos),
            architecture=arch,
            hf_config=copy.deepcopy(hf),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = storage.path(path)  # local or gs://
        try:
            return cls.from_hf_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json for transformers and vLLM; unchanged fields keep the source's spelling."""
        hf = copy.deepcopy(self.hf_config)
        hf["architectures"] = [self.architecture]
        hf.setdefault("model_type", "mistral" if self.architecture == "MistralForCausalLM" else "llama")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                    "rms_norm_eps", "tie_word_embeddings"):
            hf[key] = getattr(self, key)
        optional = {"head_dim": self.hidden_size // self.num_attention_heads,
                    "attention_bias": False, "mlp_bias": False}
        for key, default in optional.items():
            if key in hf or getattr(self, key) != default:
                hf[key] = getattr(self, key)
        _write_rope(hf, self.rope)
        return hf

    def with_rope(self, rope: RopeConfig, max_position_embeddings: int) -> "ModelConfig":
        return dataclasses.replace(self, rope=rope, max_position_embeddings=max_position_embeddings)


def _architecture(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(
        hf.get("model_type"), None
    )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"config.json: architecture {arch or hf.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _read_rope(hf: dict[str, Any], max_pos: int) -> RopeConfig:
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError("config.json: 'rope_parameters' must be an object")
    scaling = params if params is not None else (hf.get("rope_scaling") or {})
    theta = float(scaling.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    field = "rope_parameters" if params is not None else "rope_scaling"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"config.json: {field}.rope_type={rope_type!r} is not supported; supported: "
            f"{', '.join(ROPE_TYPES)}"
        )
    knobs = {k: scaling[k] for k in _ROPE_KNOBS[rope_type] if scaling.get(k) is not None}
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                "yarn": ("factor",)}
    for k in required.get(rope_type, ()):
        if k not in knobs:
            raise ConfigError(f"config.json: {field}.{k} is required for rope_type {rope_type!r}")
    if rope_type in ("llama3", "yarn"):
        # transformers' standardize_rope_params: a top-level value wins, else max_position_embeddings.
        knobs["original_max_position_embeddings"] = hf.get(
            "original_max_position_embeddings", knobs.get("original_max_position_embeddings", max_pos)
        )
    return RopeConfig(rope_type=rope_type, theta=theta, **knobs)


def _write_rope(hf: dict[str, Any], rope: RopeConfig) -> None:
    try:
        if _read_rope(hf, hf["max_position_embeddings"]) == rope:
            return  # unchanged: keep the source's fields verbatim
    except ConfigError:
        pass
    scaling = rope.scaling_dict()
    hf.pop("original_max_position_embeddings", None)  # now inside the scaling dict
    if "rope_parameters" in hf:  # transformers v5 spelling
        hf["rope_parameters"] = {"rope_type": rope.rope_type, "rope_theta": rope.theta, **scaling}
        return
    hf["rope_theta"] = rope.theta
    if rope.rope_type == "default":
        hf["rope_scaling"] = None
    else:
        # Both keys: transformers reads either; older vLLM and Gradients' tooling read "type".
        hf["rope_scaling"] = {"rope_type": rope.rope_type, "type": rope.rope_type, **scaling}
