"""HF folder -> parameters, two ways.

:func:`load_hf` builds a live Llama whose parameters are created directly on their mesh
shardings, never whole on one host: the model is built abstractly (``nnx.eval_shape``),
shardings come from the logical axes, and each array is made with ``jax.make_array_from_callback``: each
device's callback reads just that device's slice from the memory-mapped file. With several
processes, each process only reads the slices its own devices hold.

:func:`stream_hf` writes the converted checkpoint without a live model: each parameter goes
to disk a unit (a range of HF rows of one layer) at a time (``param_store``), so converting
costs a few units of memory, not the model's size. Units follow the target mesh's shard
boundaries, so a restore onto that mesh reads whole chunks.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh

from covenant_jax import storage
from covenant_jax.config import DEQUANTIZE_HINT, ModelConfig
from covenant_jax.convert import keymap, param_store
from covenant_jax.convert.hf_files import WeightSource, open_weights
from covenant_jax.model.llama import Llama, ModelOptions, abstract_model
from covenant_jax.parallel.sharding import DEFAULT_RULES, make_mesh, spec_axes, state_shardings
from covenant_jax.errors import CheckpointError


def open_checked(hf_dir: str | Path) -> tuple[ModelConfig, WeightSource]:
    """An HF folder's config and weights, every tensor checked against the config."""
    hf_dir = storage.path(hf_dir)
    cfg = ModelConfig.from_json_file(hf_dir / "config.json")
    source = open_weights(hf_dir)
    check_weights(source, cfg)
    return cfg, source


# Tensors quantization methods store beside (or instead of) ``.weight``, and the method they mean.
_QUANTIZATION_TENSORS = (
    (re.compile(r".*\.(qweight|qzeros|scales|g_idx)"), "GPTQ/AWQ"),
    (re.compile(r".*\.(SCB|weight_format)"), "bitsandbytes int8"),
    (
        re.compile(r".*\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..*)"),
        "bitsandbytes 4-bit",
    ),
    (re.compile(r".*\.(weight_scale|weight_scale_inv|input_scale)"), "fp8"),
)
_WEIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_not_quantized(source: WeightSource) -> None:
    """No quantized tensors (int8, packed int32, fp8, scales): cast to floats they would convert
    into a different model, silently."""
    for key in source.keys():
        method = next((m for pattern, m in _QUANTIZATION_TENSORS if pattern.fullmatch(key)), None)
        try:
            dtype = np.dtype(source.dtype(key)).name
        except TypeError as e:  # a torch dtype numpy cannot hold (float8 in a .bin)
            dtype = f"not a numpy dtype (torch: {e})"
        if method or dtype not in _WEIGHT_DTYPES:
            raise CheckpointError(
                f"the checkpoint is quantized: tensor {key!r} is {dtype}"
                f"{f' ({method})' if method else ''}; {DEQUANTIZE_HINT}"
            )


def check_weights(source: WeightSource, cfg: ModelConfig) -> None:
    """Unquantized, every expected tensor present with its config.json shape, nothing unexpected."""
    check_not_quantized(source)
    expected = keymap.expected_hf_shapes(cfg)
    present = set(source.keys())
    problems = [
        f"missing tensor {k!r} (expected shape {list(s)})" for k, s in expected.items() if k not in present
    ]
    problems += [
        f"unexpected tensor {k!r} {list(source.shape(k))}: not part of a {cfg.architecture} "
        "with this config.json"
        for k in sorted(present - expected.keys())
        if not keymap.is_ignored(cfg, k)
    ]
    problems += [
        f"tensor {k!r} has shape {list(source.shape(k))} but config.json implies {list(s)}"
        for k, s in expected.items()
        if k in present and source.shape(k) != s
    ]
    if problems:
        shown = "\n  ".join(problems[:20]) + (
            f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        )
        raise CheckpointError(f"checkpoint does not match config.json:\n  {shown}")


def source_dtype(source: WeightSource, cfg: ModelConfig) -> str:
    """The checkpoint's dtype (its embedding's), as a jnp dtype name."""
    return np.dtype(source.dtype(keymap.tensor_maps(cfg)[0].hf_name())).name


def _place(source: WeightSource, m: keymap.TensorMap, sharding, dtype, num_layers: int) -> jax.Array:
    shape = ((num_layers,) if m.stacked else ()) + m.shape

    def shard_data(index: tuple[slice, ...]) -> np.ndarray:
        if not m.stacked:
            return m.read(source.tensor(m.hf_name()), index).astype(dtype)
        layers = range(*index[0].indices(num_layers))
        return np.stack([m.read(source.tensor(m.hf_name(l)), index[1:]).astype(dtype) for l in layers])

    return jax.make_array_from_callback(shape, sharding, shard_data)


def load_hf(
    hf_dir: str | Path,
    opts: ModelOptions | None = None,
    mesh: Mesh | None = None,
    rules: Mapping = DEFAULT_RULES,
) -> Llama:
    """Loads an HF folder's weights onto ``mesh``; ``opts.param_dtype`` None keeps the file's dtype."""
    cfg, source = open_checked(hf_dir)
    opts = opts or ModelOptions(param_dtype=source_dtype(source, cfg), dtype=source_dtype(source, cfg))
    return load_weights(source, cfg, opts, mesh or make_mesh(), rules)


def load_weights(
    source: WeightSource, cfg: ModelConfig, opts: ModelOptions, mesh: Mesh, rules: Mapping = DEFAULT_RULES
) -> Llama:
    graphdef, state = nnx.split(abstract_model(cfg, opts))
    shardings = state_shardings(state, mesh, rules)
    flat_state, flat_shardings = nnx.to_flat_state(state), dict(nnx.to_flat_state(shardings))
    by_path = {m.path: m for m in keymap.tensor_maps(cfg)}
    dtype = jnp.dtype(opts.param_dtype)
    for path, variable in flat_state:
        if path not in by_path:
            raise AssertionError(f"parameter {'.'.join(path)} has no entry in the key map")
        variable.set_value(_place(source, by_path[path], flat_shardings[path], dtype, cfg.num_hidden_layers))
    return nnx.merge(graphdef, nnx.from_flat_state(flat_state))


def _shards_along(sharding, axis: int) -> int:
    entry = sharding.spec[axis] if axis < len(sharding.spec) else None
    return math.prod(sharding.mesh.shape[n] for n in spec_axes(entry))


def _streamed(
    source: WeightSource, m: keymap.TensorMap, dtype: np.dtype, num_layers: int, sharding
) -> param_store.StreamedParam:
    layer_axis = 1 if m.stacked else 0
    pieces = param_store.row_ranges(
        m.shape, dtype.itemsize, m.split_axis, shards=_shards_along(sharding, m.split_axis + layer_axis)
    )

    def read(index: param_store.Index) -> np.ndarray:  # whole HF rows: one pread, a fresh buffer
        if m.stacked:
            return m.read(source.tensor(m.hf_name(index[0].start)), index[1:])[None]
        return m.read(source.tensor(m.hf_name()), index)

    if m.stacked:
        shape = (num_layers,) + m.shape
        units = tuple((slice(layer, layer + 1),) + p for layer in range(num_layers) for p in pieces)
    else:
        shape, units = m.shape, tuple(pieces)
    return param_store.StreamedParam(
        shape, dtype, units, read, source.dtype(m.hf_name(0 if m.stacked else None)), m.storage_order
    )


def stream_hf(
    source: WeightSource,
    cfg: ModelConfig,
    dtype: str,
    mesh: Mesh,
    params_dir: Path,
    rules: Mapping = DEFAULT_RULES,
) -> None:
    """Writes ``source``'s weights (see :func:`check_weights`) as the Orbax checkpoint ``params_dir``
    (a folder inside ``io.atomic_output_dir``, which fsyncs it: see ``param_store.save_streamed``)."""
    _, state = nnx.split(abstract_model(cfg, ModelOptions(param_dtype=dtype, dtype=dtype)))
    shardings = dict(nnx.to_flat_state(state_shardings(state, mesh, rules)))
    np_dtype = np.dtype(jnp.dtype(dtype))
    flat = {
        m.path: _streamed(source, m, np_dtype, cfg.num_hidden_layers, shardings[m.path])
        for m in keymap.tensor_maps(cfg)
    }
    param_store.save_streamed(params_dir, traverse_util.unflatten_dict(flat))
