"""The one declarative table between HF tensor names and covenant_jax parameter paths.

Every mapping is a transpose and/or a reshape (plus stacking over layers), never arithmetic,
so HF -> JAX -> HF is bit-exact. Slices of our (per-layer) array map back to slices of the HF
tensor, so a device's shard is read without reading the whole tensor.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from covenant_jax.config import ModelConfig

# HF keys that carry no parameters (old checkpoints store RoPE buffers).
IGNORED_HF_KEYS = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter: ``ours = (hf.T if transpose else hf).reshape(shape)``, per layer if stacked."""

    hf_key: str  # "{layer}" is replaced by the layer index when stacked
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    transpose: bool = False
    stacked: bool = False

    def hf_name(self, layer: int | None = None) -> str:
        return self.hf_key.format(layer=layer)

    @property
    def _t_shape(self) -> tuple[int, ...]:
        return self.hf_shape[::-1] if self.transpose else self.hf_shape

    def _groups(self) -> list[tuple[int, int]]:
        """(first axis, axis count) of ours for each axis of the (transposed) HF tensor."""
        groups, axis = [], 0
        for t_dim in self._t_shape:
            start = axis
            axis += 1
            while math.prod(self.shape[start:axis]) < t_dim:
                axis += 1
            groups.append((start, axis - start))
        return groups

    @property
    def split_axis(self) -> int:
        """Our axis whose ranges are contiguous HF rows (HF axis 0): the unit to stream by."""
        groups = self._groups()
        return (groups[-1] if self.transpose else groups[0])[0] if groups else 0

    @property
    def hf_axis_order(self) -> tuple[int, ...]:
        """Our axes in HF memory order: ``ours.transpose(hf_axis_order)`` is C-contiguous HF."""
        groups = self._groups()[::-1] if self.transpose else self._groups()
        return tuple(a for start, n in groups for a in range(start, start + n))

    @property
    def storage_order(self) -> tuple[int, ...]:
        """:attr:`hf_axis_order` of the stored array (layers first when stacked)."""
        if self.stacked:
            return (0,) + tuple(a + 1 for a in self.hf_axis_order)
        return self.hf_axis_order

    def piece_to_hf(self, piece: np.ndarray) -> np.ndarray:
        """HF rows for ``piece``, a range of :attr:`split_axis` of one layer (other axes whole)."""
        t_shape = [math.prod(piece.shape[a : a + n]) for a, n in self._groups()]
        t = piece.reshape(t_shape)
        return t.T if self.transpose else t

    def read(self, hf_tensor, index: tuple[slice, ...]) -> np.ndarray:
        """``(hf.T if transpose else hf).reshape(shape)[index]``, reading only the HF rows/columns the slice needs."""
        t_index, post_index, t_out_shape = [], [], []
        for start, n in self._groups():
            dims, slices = self.shape[start : start + n], index[start : start + n]
            first_range = range(*slices[0].indices(dims[0]))
            rest_full = all(s.indices(d) == (0, d, 1) for d, s in zip(dims[1:], slices[1:]))
            inner = math.prod(dims[1:])
            if rest_full and first_range.step == 1:
                t_index.append(slice(first_range.start * inner, first_range.stop * inner))
                post_index.extend(slice(None) for _ in dims)
                t_out_shape.extend((len(first_range),) + dims[1:])
            else:
                t_index.append(slice(None))
                post_index.extend(slices)
                t_out_shape.extend(dims)
        hf_index = tuple(t_index[::-1]) if self.transpose else tuple(t_index)
        part = np.asarray(hf_tensor[hf_index])
        part = part.T if self.transpose else part
        part = part.reshape(t_out_shape)
        return part if all(s == slice(None) for s in post_index) else part[tuple(post_index)]


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """The full table for a config, in HF state-dict order."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layer = "model.layers.{layer}."

    def per_layer(hf_suffix, path, hf_shape, shape, transpose=False):
        return TensorMap(layer + hf_suffix, ("layers",) + path, hf_shape, shape, transpose, True)

    maps = [TensorMap("model.embed_tokens.weight", ("embed",), (v, d), (v, d))]
    for name, heads in (("q", n), ("k", k), ("v", k)):
        maps.append(
            per_layer(f"self_attn.{name}_proj.weight", ("attn", name), (heads * h, d), (d, heads, h), True)
        )
        if cfg.attention_bias:
            maps.append(
                per_layer(f"self_attn.{name}_proj.bias", ("attn", f"{name}_bias"), (heads * h,), (heads, h))
            )
    maps.append(per_layer("self_attn.o_proj.weight", ("attn", "o"), (d, n * h), (n, h, d), True))
    if cfg.attention_bias:
        maps.append(per_layer("self_attn.o_proj.bias", ("attn", "o_bias"), (d,), (d,)))
    for name, (hf_shape, shape) in {
        "gate": ((f, d), (d, f)),
        "up": ((f, d), (d, f)),
        "down": ((d, f), (f, d)),
    }.items():
        maps.append(per_layer(f"mlp.{name}_proj.weight", ("mlp", name), hf_shape, shape, True))
        if cfg.mlp_bias:
            bias = (d,) if name == "down" else (f,)
            maps.append(per_layer(f"mlp.{name}_proj.bias", ("mlp", f"{name}_bias"), bias, bias))
    maps.append(per_layer("input_layernorm.weight", ("input_norm",), (d,), (d,)))
    maps.append(per_layer("post_attention_layernorm.weight", ("post_attention_norm",), (d,), (d,)))
    maps.append(TensorMap("model.norm.weight", ("final_norm",), (d,), (d,)))
    if not cfg.tie_word_embeddings:
        maps.append(TensorMap("lm_head.weight", ("lm_head",), (v, d), (d, v), True))
    return maps


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF key the checkpoint must hold, with its shape."""
    shapes = {}
    for m in tensor_maps(cfg):
        for layer in range(cfg.num_hidden_layers) if m.stacked else [None]:
            shapes[m.hf_name(layer)] = m.hf_shape
    return shapes


def is_ignored(cfg: ModelConfig, hf_key: str) -> bool:
    # Tied checkpoints sometimes also store lm_head.weight (a copy of the embedding).
    if cfg.tie_word_embeddings and hf_key == "lm_head.weight":
        return True
    return any(p.fullmatch(hf_key) for p in IGNORED_HF_KEYS)
