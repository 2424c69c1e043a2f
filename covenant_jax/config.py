"""Model configuration <-> HF ``config.json``, read exactly as transformers reads it.

config.json goes through transformers' own config class for its architecture (``LlamaConfig``,
``MistralConfig``), so the defaults are transformers' (rms_norm_eps 1e-6; Mistral's
sliding_window 4096), its strict type checks apply (a string where a bool or int belongs is an
error naming the field), and RoPE is standardised as the model does: ``rope_scaling``, when set,
wins over ``rope_parameters`` (transformers 4.x and 5.x alike), ``type`` means ``rope_type``,
``rope_theta`` comes from the RoPE dict else the top level, and a top-level
``original_max_position_embeddings`` wins. What covenant_jax cannot run (a quantized checkpoint,
sliding-window attention, an activation other than SiLU, a RoPE type other than default / linear /
llama3 / yarn) is refused in one line.

Writing keeps the source's fields and writes what was read: a field is written when the source
had it or its value changed, and RoPE is spelled so that transformers 4.x (``rope_theta`` +
``rope_scaling``, what vLLM releases pinned to 4.x read) and 5.x (``rope_parameters``, when the
source used it) read the same scaling.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Any

from covenant_jax import storage
from covenant_jax.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_CONFIG_CLASSES = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# The RoPE knobs (beyond rope_theta) transformers reads for each type.
ROPE_KNOBS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "truncate",
    ),
}
# Keys transformers requires in the RoPE dict (a KeyError at load otherwise); yarn's factor may be
# null (then max_position_embeddings / original_max_position_embeddings).
REQUIRED_ROPE_KNOBS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor",),
}
_NULLABLE_KNOBS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")
_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
_SILU = ("silu", "swish")  # transformers' ACT2FN: both are SiLU


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Every RoPE knob transformers reads for the supported types (None = not set: its default)."""

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
        return {k: getattr(self, k) for k in ROPE_KNOBS[self.rope_type] if getattr(self, k) is not None}


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
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    rope: RopeConfig = RopeConfig()
    architecture: str = "LlamaForCausalLM"
    # The source config.json, so fields we do not model (bos/eos ids, dtype, ...) survive export.
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

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
        _refuse_quantized(hf)
        _check_positive(hf)
        _check_rope_dict(hf)
        tf = _transformers_config(hf, arch)
        _check_runnable(hf, tf, arch)
        rope = _read_rope(tf.rope_parameters, tf.max_position_embeddings)
        _warn_conflicting_rope(hf, arch, rope, tf.max_position_embeddings)
        mistral = arch == "MistralForCausalLM"  # transformers' Mistral layers have no biases
        return cls(
            vocab_size=tf.vocab_size,
            hidden_size=tf.hidden_size,
            intermediate_size=tf.intermediate_size,
            num_hidden_layers=tf.num_hidden_layers,
            num_attention_heads=tf.num_attention_heads,
            num_key_value_heads=tf.num_key_value_heads,
            head_dim=tf.head_dim,
            max_position_embeddings=tf.max_position_embeddings,
            rms_norm_eps=tf.rms_norm_eps,
            tie_word_embeddings=tf.tie_word_embeddings,
            attention_bias=False if mistral else tf.attention_bias,
            mlp_bias=False if mistral else tf.mlp_bias,
            rope=rope,
            architecture=arch,
            hf_config=copy.deepcopy(hf),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = storage.path(path)  # local or gs://
        if not path.is_file():
            where = "does not exist" if not path.parent.exists() else f"has no {path.name}"
            raise ConfigError(f"{path.parent} {where}: expected a model folder (config.json and weights)")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(hf, dict):
            raise ConfigError(f"{path}: not a JSON object")
        return cls.from_hf_dict(hf)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json for transformers (4.x and 5.x) and vLLM: the source's fields, with each
        value that differs from what was read written explicitly."""
        hf = copy.deepcopy(self.hf_config)
        as_read = ModelConfig.from_hf_dict(self.hf_config) if self.hf_config else None
        hf["architectures"] = [self.architecture]
        hf.setdefault("model_type", "mistral" if self.architecture == "MistralForCausalLM" else "llama")
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "rms_norm_eps",
            "tie_word_embeddings",
            "attention_bias",
            "mlp_bias",
        ):
            if key in hf or as_read is None or getattr(as_read, key) != getattr(self, key):
                hf[key] = getattr(self, key)
        _write_rope(hf, self.rope, unchanged=as_read is not None and as_read.rope == self.rope)
        return hf

    def with_rope(self, rope: RopeConfig, max_position_embeddings: int) -> "ModelConfig":
        return dataclasses.replace(self, rope=rope, max_position_embeddings=max_position_embeddings)


# ---- reading ------------------------------------------------------------------------------------


def _architecture(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    arch = (
        archs[0]
        if archs
        else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(hf.get("model_type"), None)
    )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"config.json: architecture {arch or hf.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _refuse_quantized(hf: dict[str, Any]) -> None:
    """A quantized checkpoint's tensors are not the model's weights; never cast them silently."""
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown method") if isinstance(quant, dict) else quant
        raise ConfigError(
            f"config.json: the checkpoint is quantized ({method}, quantization_config); {DEQUANTIZE_HINT}"
        )


DEQUANTIZE_HINT = (
    "covenant_jax reads unquantized weights only: dequantize it with transformers first "
    "(model = AutoModelForCausalLM.from_pretrained(DIR); model.dequantize(); "
    "model.save_pretrained(NEW_DIR), where its quantizer supports that) and convert NEW_DIR"
)


def _check_positive(fields: dict[str, Any]) -> None:
    for key in _POSITIVE_INTS:
        value = fields.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"config.json: '{key}' must be a positive integer, got {value}")


def _rope_field(hf: dict[str, Any]) -> str:
    """Where transformers takes RoPE from: ``rope_scaling`` when set, else ``rope_parameters``
    (5.x: ``rope_scaling or rope_parameters``; 4.x never reads ``rope_parameters``)."""
    return "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"


def _check_rope_dict(hf: dict[str, Any]) -> None:
    """The RoPE dict's type, required knobs and value types, named as config.json spells them
    (transformers only logs a warning for a wrongly typed knob, then fails or computes garbage)."""
    field = _rope_field(hf)
    raw = hf.get(field)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json: '{field}' must be an object or null, got {raw!r}")
    type_key = "rope_type" if "rope_type" in raw else "type"
    rope_type = raw.get(type_key, "default")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"config.json: {field}.{type_key}={rope_type!r} is not supported; "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    for k in REQUIRED_ROPE_KNOBS.get(rope_type, ()):
        if k not in raw:
            raise ConfigError(f"config.json: {field}.{k} is required for rope_type {rope_type!r}")
    theta_field = f"{field}.rope_theta" if "rope_theta" in raw else "rope_theta"
    _check_number(theta_field, raw.get("rope_theta", hf.get("rope_theta", 10000.0)))
    for k in ROPE_KNOBS[rope_type]:
        if k not in raw or (
            raw[k] is None and (k in _NULLABLE_KNOBS or (rope_type, k) == ("yarn", "factor"))
        ):
            continue
        if k == "truncate":
            if not isinstance(raw[k], bool):
                raise ConfigError(
                    f"config.json: {field}.truncate must be true, false or null, got {raw[k]!r}"
                )
        elif k == "original_max_position_embeddings":
            if not isinstance(raw[k], int) or isinstance(raw[k], bool) or raw[k] <= 0:
                raise ConfigError(f"config.json: {field}.{k} must be a positive integer, got {raw[k]!r}")
        else:
            _check_number(f"{field}.{k}", raw[k])


def _check_number(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"config.json: {name} must be a number, got {type(value).__name__} {value!r}")


def _warn_conflicting_rope(hf: dict[str, Any], arch: str, used: RopeConfig, max_pos: int) -> None:
    """Both spellings set and disagreeing: follow transformers (``rope_scaling``), and say so."""
    if not (hf.get("rope_scaling") and hf.get("rope_parameters")):
        return
    without_scaling = {k: v for k, v in hf.items() if k != "rope_scaling"}
    try:
        _check_rope_dict(without_scaling)
        ignored = _read_rope(_transformers_config(without_scaling, arch).rope_parameters, max_pos)
    except ConfigError:
        ignored = None
    if ignored != used:
        warnings.warn(
            f"config.json has both rope_scaling={hf['rope_scaling']} and rope_parameters="
            f"{hf['rope_parameters']}, which disagree; transformers (4.x and 5.x) and vLLM use "
            "rope_scaling, and so does covenant_jax (an export writes both as rope_scaling says)",
            stacklevel=3,
        )


def _transformers_config(hf: dict[str, Any], arch: str):
    """transformers' own config object for ``hf``, RoPE standardised as the model's init does."""
    import transformers
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    config_cls = getattr(transformers, _CONFIG_CLASSES[arch])
    try:
        tf = config_cls.from_dict(copy.deepcopy(hf))
    except StrictDataclassFieldValidationError as e:
        raise ConfigError(_type_error_message(config_cls, hf, e)) from None
    except (ValueError, KeyError, TypeError, ArithmeticError) as e:
        raise ConfigError(
            f"config.json: transformers' {config_cls.__name__} refuses it: {' '.join(str(e).split())}"
        ) from None
    tf.standardize_rope_params()  # the rotary embedding does this again at init, with every attribute set
    return tf


def _type_error_message(config_cls, hf: dict[str, Any], error: Exception) -> str:
    m = re.search(r"field '([^']+)'", str(error))
    field = m.group(1) if m else "?"
    spec = config_cls.__dataclass_fields__.get(field)
    expected = getattr(spec.type, "__name__", str(spec.type)) if spec is not None else "another type"
    value = hf.get(field)
    return (
        f"config.json: '{field}' is {type(value).__name__} {value!r}, but transformers' "
        f"{config_cls.__name__} needs {expected}"
    )


def _check_runnable(hf: dict[str, Any], tf, arch: str) -> None:
    """What transformers accepts but this model cannot run (or run as transformers does)."""
    _check_positive({k: getattr(tf, k) for k in _POSITIVE_INTS})
    if tf.num_attention_heads % tf.num_key_value_heads:
        raise ConfigError(
            f"config.json: num_attention_heads={tf.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={tf.num_key_value_heads}"
        )
    if tf.hidden_act not in _SILU:
        raise ConfigError(f"config.json: hidden_act={tf.hidden_act!r} is not supported (only 'silu')")
    _refuse_sliding_window(hf, tf, arch)


def _refuse_sliding_window(hf: dict[str, Any], tf, arch: str) -> None:
    """transformers' Mistral attends within ``sliding_window`` (4096 when the field is absent);
    Llama ignores the field. covenant_jax has full attention only."""
    if arch != "MistralForCausalLM" or tf.sliding_window is None:
        return
    if tf.sliding_window < tf.max_position_embeddings:
        origin = "" if "sliding_window" in hf else " (absent: transformers' MistralConfig default)"
        raise ConfigError(
            f"config.json: sliding_window={tf.sliding_window}{origin} is less than "
            f"max_position_embeddings={tf.max_position_embeddings}: sliding-window attention is not "
            'supported (only full attention); set "sliding_window": null if the model was trained '
            "with full attention"
        )


def _read_rope(params: dict[str, Any], max_pos: int) -> RopeConfig:
    """A RopeConfig from transformers' standardised RoPE dict, knob values as transformers uses
    them: ``truncate`` null means no truncation, yarn's null ``factor`` is the length ratio."""
    rope_type = params.get("rope_type", "default")
    knobs: dict[str, Any] = {}
    for k in ROPE_KNOBS[rope_type]:
        if k == "truncate" and k in params:
            knobs[k] = bool(params[k])  # _compute_yarn_parameters: `if truncate:`
        elif params.get(k) is not None:
            knobs[k] = params[k]
    if rope_type == "yarn" and "factor" not in knobs:
        knobs["factor"] = max_pos / knobs["original_max_position_embeddings"]
    return RopeConfig(rope_type=rope_type, theta=params["rope_theta"], **knobs)


# ---- writing ------------------------------------------------------------------------------------


def _write_rope(hf: dict[str, Any], rope: RopeConfig, unchanged: bool) -> None:
    """Unchanged v4-spelled RoPE stays verbatim (both transformers lines read it). Otherwise the
    RoPE keys are rewritten from ``rope``: ``rope_theta`` + ``rope_scaling`` (with ``rope_type``
    and ``type``, which transformers 4.x and vLLM on it read) always, and ``rope_parameters``
    (5.x) where the source had it, so no reader falls back to unscaled RoPE."""
    if unchanged and "rope_parameters" not in hf:
        return
    scaling = rope.scaling_dict()
    hf.pop("original_max_position_embeddings", None)  # inside the scaling dict now
    hf["rope_theta"] = rope.theta
    hf["rope_scaling"] = (
        None
        if rope.rope_type == "default"
        else {"rope_type": rope.rope_type, "type": rope.rope_type, **scaling}
    )
    if "rope_parameters" in hf:
        hf["rope_parameters"] = {"rope_type": rope.rope_type, "rope_theta": rope.theta, **scaling}
