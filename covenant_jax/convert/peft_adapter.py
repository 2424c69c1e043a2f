"""PEFT LoRA adapter folders <-> covenant_jax adapters.

A PEFT adapter folder is ``adapter_config.json`` + ``adapter_model.safetensors``, whose tensors
are named as ``PeftModelForCausalLM`` saves them and vLLM's loader parses them
(``parse_fine_tuned_lora_name``): ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
[r, in] and ``...lora_B.weight`` [out, r], for q/k/v/o_proj (``self_attn``) and
gate/up/down_proj (``mlp``). Ours are the same numbers transposed and stacked over layers
(``model/lora.py``): A [L, in, r], B [L, r, out]; conversion is a transpose per layer, so a
round trip is bit-exact. The config fields vLLM reads (``PEFTHelper``) are ``r``,
``lora_alpha``, ``target_modules``, ``use_rslora``, ``bias`` ("none"), ``modules_to_save``
(null) and ``use_dora`` (false); PEFT's ``LoraConfig`` reads every field written here.

Reading refuses, in one line each, what covenant_jax cannot represent: another PEFT method,
DoRA, bias training, extra saved modules, per-layer ranks, adapters on some layers only, on
modules other than the seven projections, and tensors whose shapes disagree with the model
(an adapter trained on another base).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from covenant_jax import storage
from covenant_jax.convert.jax_to_hf import to_host
from covenant_jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from covenant_jax.errors import AdapterError, UserError
from covenant_jax.io import copy_aux_files, write_json
from covenant_jax.model import lora as lora_lib

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
_BY_PEFT_NAME = {p: t for t, p in lora_lib.PEFT_NAMES.items()}

# PEFT config fields whose non-default values change what the adapter computes, and how.
_UNSUPPORTED = {
    "use_dora": (lambda v: bool(v), "DoRA (use_dora)"),
    "bias": (lambda v: v not in (None, "none"), "trained biases (bias={!r})"),
    "lora_bias": (lambda v: bool(v), "LoRA biases (lora_bias)"),
    "modules_to_save": (lambda v: bool(v), "fully trained extra modules (modules_to_save={!r})"),
    "rank_pattern": (lambda v: bool(v), "per-module ranks (rank_pattern)"),
    "alpha_pattern": (lambda v: bool(v), "per-module alphas (alpha_pattern)"),
    "layers_to_transform": (lambda v: v is not None, "adapters on some layers only (layers_to_transform)"),
    "layer_replication": (lambda v: bool(v), "replicated layers (layer_replication)"),
    "fan_in_fan_out": (lambda v: bool(v), "transposed (Conv1D) weights (fan_in_fan_out)"),
    "target_parameters": (lambda v: bool(v), "adapters on parameters (target_parameters)"),
    "trainable_token_indices": (lambda v: bool(v), "trainable tokens (trainable_token_indices)"),
    "use_qalora": (lambda v: bool(v), "QALoRA (use_qalora)"),
    "alora_invocation_tokens": (lambda v: bool(v), "activated LoRA (alora_invocation_tokens)"),
}


def peft_key(layer: int, target: str, which: str) -> str:
    """PEFT's tensor name for layer ``layer``'s adapter on ``target``; ``which`` is "A" or "B"."""
    return (
        f"base_model.model.model.layers.{layer}.{lora_lib.HF_MODULES[target]}."
        f"{lora_lib.PEFT_NAMES[target]}.lora_{which}.weight"
    )


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A checked PEFT adapter folder: what it is (``lora``), its raw config, and its weights file."""

    folder: storage.Path
    lora: lora_lib.LoraConfig
    raw_config: dict
    weights: SafetensorsFile
    num_layers: int


def _config_error(folder, message: str) -> AdapterError:
    return AdapterError(f"adapter {folder}: {message}")


def _read_config(folder: storage.Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise _config_error(folder, f"no {CONFIG} (a PEFT LoRA adapter folder holds {CONFIG} and {WEIGHTS})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _config_error(folder, f"{CONFIG} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise _config_error(folder, f"{CONFIG} holds {type(raw).__name__}, not a JSON object")
    return raw


def _check_features(folder, raw: dict) -> None:
    if raw.get("peft_type", "LORA") != "LORA":
        raise _config_error(folder, f"peft_type {raw['peft_type']!r}: only LoRA adapters are supported")
    for field, (unsupported, what) in _UNSUPPORTED.items():
        if unsupported(raw.get(field)):
            raise _config_error(
                folder, f"uses {what.format(raw.get(field))}, which covenant_jax does not support"
            )
    for field in ("r", "lora_alpha"):
        value = raw.get(field)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _config_error(folder, f"{CONFIG} field {field!r} is {value!r}, not a number")


def _inventory(folder, weights: SafetensorsFile) -> dict[str, set[int]]:
    """{target: the layers it has A and B for}; a tensor of anything else is refused."""
    found: dict[tuple[str, str], set[int]] = {}
    for key in weights.keys():
        m = _KEY.fullmatch(key)
        target = _BY_PEFT_NAME.get(m.group(3)) if m else None
        if target is None or lora_lib.HF_MODULES[target] != m.group(2):
            raise _config_error(
                folder,
                f"tensor {key!r} is not a LoRA A/B weight of q/k/v/o_proj or "
                "gate/up/down_proj, the modules covenant_jax adapts",
            )
        found.setdefault((target, m.group(4)), set()).add(int(m.group(1)))
    layers = {}
    for target in lora_lib.TARGETS:
        a, b = found.get((target, "A"), set()), found.get((target, "B"), set())
        if a != b:
            raise _config_error(
                folder,
                f"{lora_lib.PEFT_NAMES[target]} has lora_A for layers {sorted(a)} but lora_B for {sorted(b)}",
            )
        if a:
            layers[target] = a
    return layers


def read_adapter(folder: str | Path, num_layers: int, dropout: float = 0.0) -> Adapter:
    """Opens and checks a PEFT adapter folder for a model of ``num_layers`` layers."""
    folder = storage.path(folder)
    storage.check_complete(folder)
    raw = _read_config(folder)
    _check_features(folder, raw)
    if not (folder / WEIGHTS).is_file():
        extra = (
            " (adapter_model.bin: save it with safe_serialization=True)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise _config_error(folder, f"no {WEIGHTS}{extra}")
    weights = SafetensorsFile(folder / WEIGHTS)
    layers = _inventory(folder, weights)
    if not layers:
        raise _config_error(folder, f"{WEIGHTS} holds no LoRA weights")
    for target, present in layers.items():
        if present != set(range(num_layers)):
            extra = sorted(present - set(range(num_layers)))
            missing = sorted(set(range(num_layers)) - present)
            why = (
                f"layers {extra} do not exist in the model ({num_layers} layers): trained on another base"
                if extra
                else f"adapts only some layers (missing {missing[:8]}); covenant_jax adapts every layer"
            )
            raise _config_error(folder, f"{lora_lib.PEFT_NAMES[target]}: {why}")
    rank = weights.shape(peft_key(0, next(iter(layers)), "A"))[0]
    if rank != raw["r"]:
        raise _config_error(folder, f"{CONFIG} says r={raw['r']} but the weights have rank {rank}")
    lora = lora_lib.LoraConfig(
        rank=int(raw["r"]),
        alpha=float(raw["lora_alpha"]),
        dropout=dropout,
        targets=tuple(layers),
        rslora=bool(raw.get("use_rslora", False)),
    )
    return Adapter(folder, lora, raw, weights, num_layers)


def check_matches(adapter: Adapter, recipe: lora_lib.LoraConfig) -> None:
    """The recipe's model.lora describes the adapter it continues (rank, alpha, targets, rsLoRA)."""
    ours, theirs = dataclasses.asdict(recipe), dataclasses.asdict(adapter.lora)
    for field, peft_field in (
        ("rank", "r"),
        ("alpha", "lora_alpha"),
        ("targets", "target_modules"),
        ("rslora", "use_rslora"),
    ):
        if ours[field] != theirs[field]:
            raise _config_error(
                adapter.folder,
                f"it has {peft_field}={theirs[field]!r} but the recipe's "
                f"model.lora.{field} is {ours[field]!r}; set "
                f"--config.model.lora.{field} to match",
            )


def _peft_tensors(path: tuple[str, ...]) -> tuple[str, str]:
    """(target, "A" | "B") for our adapter param path (..., "{target}_lora", "lora_a" | "lora_b")."""
    return path[-2].removesuffix("_lora"), path[-1][-1].upper()


def check_shapes(adapter: Adapter, abstract: dict) -> None:
    """Every tensor has the shape the model's adapters need: ``abstract`` is the model's adapter
    state as a pure dict of arrays or ShapeDtypeStructs (A [L, in, r], B [L, r, out])."""
    for path, spec in traverse_util.flatten_dict(abstract).items():
        target, which = _peft_tensors(path)
        expected = tuple(spec.shape[1:][::-1])
        if peft_key(0, target, which) not in adapter.weights.keys():
            raise _config_error(adapter.folder, f"no {peft_key(0, target, which)!r}")
        for layer in range(adapter.num_layers):
            got = adapter.weights.shape(peft_key(layer, target, which))
            if got != expected:
                raise _config_error(
                    adapter.folder,
                    f"tensor {peft_key(layer, target, which)!r} has shape "
                    f"{list(got)} but this model's needs {list(expected)}: "
                    "the adapter was trained on another base model",
                )


def load_weights(adapter: Adapter, abstract: dict) -> dict:
    """The adapter's weights as our arrays, each created on its sharding: ``abstract`` is the
    model's adapter state as a pure dict of sharded ShapeDtypeStructs."""
    check_shapes(adapter, abstract)
    flat = traverse_util.flatten_dict(abstract)
    return traverse_util.unflatten_dict({path: _place(adapter, path, spec) for path, spec in flat.items()})


def _place(adapter: Adapter, path: tuple[str, ...], spec: jax.ShapeDtypeStruct) -> jax.Array:
    target, which = _peft_tensors(path)
    stacked = np.stack(
        [
            np.asarray(adapter.weights.tensor(peft_key(layer, target, which))).T
            for layer in range(adapter.num_layers)
        ]
    ).astype(spec.dtype)
    return jax.make_array_from_callback(spec.shape, spec.sharding, lambda index: stacked[index])


def adapter_config(lora: lora_lib.LoraConfig, base: str, source: dict | None = None) -> dict:
    """adapter_config.json: ours, over the source adapter's fields when continuing one (a field
    that means the same keeps the source's spelling, e.g. its order of target_modules)."""
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    source = dict(source or {})
    ours = {
        "peft_type": "LORA",
        "task_type": source.get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": source.get("base_model_name_or_path") or base,
        "r": lora.rank,
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora_lib.PEFT_NAMES[t] for t in lora.targets),
        "use_rslora": lora.rslora,
        "use_dora": False,
        "bias": "none",
        "lora_bias": False,
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": source.get("init_lora_weights", True),
        "inference_mode": True,
    }

    def same(key, theirs, value) -> bool:
        if key == "target_modules":
            try:
                return lora_lib.normalize_targets(theirs) == lora.targets
            except UserError:
                return False
        return theirs == value or (not theirs and not value and key not in ("r", "lora_alpha"))

    return {**source, **{k: v for k, v in ours.items() if k not in source or not same(k, source[k], v)}}


def save_adapter(
    adapters: dict,
    lora: lora_lib.LoraConfig,
    out_dir: str | Path,
    base: str,
    aux_dir: str | Path | None = None,
    source_config: dict | None = None,
    dtype: str | None = None,
) -> None:
    """Writes a PEFT adapter folder into ``out_dir`` (an existing, empty folder): every process
    takes part in the gathers, process 0 writes. Tensors are in PEFT's (sorted) key order."""
    tensors = {}
    for path, value in traverse_util.flatten_dict(adapters).items():
        target, which = _peft_tensors(path)
        host = to_host(value)
        host = host.astype(jax.numpy.dtype(dtype)) if dtype else host
        for layer in range(host.shape[0]):
            tensors[peft_key(layer, target, which)] = np.ascontiguousarray(host[layer].T)
    if jax.process_index() != 0:
        return
    out_dir = storage.path(out_dir)
    names = sorted(tensors)
    write_safetensors(
        out_dir / WEIGHTS,
        [(k, tensors[k].shape, tensors[k].dtype) for k in names],
        (tensors[k] for k in names),
    )
    write_json(out_dir / CONFIG, adapter_config(lora, base, source_config))
    if aux_dir is not None:
        copy_aux_files(aux_dir, out_dir)
