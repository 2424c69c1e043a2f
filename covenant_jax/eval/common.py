"""What both evaluations share: loading the model and tokenizer, swapping RoPE, and a jitted
forward that turns hidden states into what the host needs without [T, V] logits on the host.

Axes: B batch (windows or prompts), T sequence, D hidden, V vocab, A answer tokens,
J chunks, C chunk length.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from covenant_jax import storage
from covenant_jax.config import ModelConfig, RopeConfig
from covenant_jax.errors import EvalInputError
from covenant_jax.model.llama import Llama, ModelOptions, with_rope
from covenant_jax.parallel.sharding import activation_sharding
from covenant_jax.train import loss as loss_lib


# ---- inputs -----------------------------------------------------------------------------------


def load_texts(path: str | Path, field: str = "text", limit: int | None = None) -> list[str]:
    """The ``field`` of each JSONL row (rows without it, or empty, are an error)."""
    path = storage.path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such file")
    texts = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line).get(field)
            except (json.JSONDecodeError, AttributeError) as e:
                raise EvalInputError(f"{path}:{line_no}: not a JSON object ({e})") from e
            if not isinstance(text, str) or not text:
                raise EvalInputError(f"{path}:{line_no}: no non-empty string field {field!r}")
            texts.append(text)
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise EvalInputError(f"{path}: no rows")
    return texts


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---- model ------------------------------------------------------------------------------------


def yarn_rope(
    cfg: ModelConfig, factor: float, original_max_position_embeddings: int | None = None, **knobs
) -> tuple[RopeConfig, int]:
    """(YaRN RopeConfig, new max_position_embeddings) scaling ``cfg``'s context by ``factor``."""
    original = original_max_position_embeddings or cfg.max_position_embeddings
    rope = RopeConfig(
        rope_type="yarn",
        theta=cfg.rope.theta,
        factor=float(factor),
        original_max_position_embeddings=original,
        **knobs,
    )
    return rope, int(original * factor)


def load_eval_model(
    path: str | Path, dtype: str = "float32", mesh: Mesh | None = None, yarn_factor: float | None = None
) -> Llama:
    """A model for evaluation; ``yarn_factor`` applies YaRN on top of its stored RoPE."""
    from covenant_jax.convert.api import load_model

    model = load_model(path, ModelOptions(param_dtype=dtype, dtype=dtype), mesh)
    if yarn_factor:
        model = with_rope(model, *yarn_rope(model.config, yarn_factor))
    return model


# ---- jitted forward pieces ----------------------------------------------------------------------


def token_nll(model: Llama, hidden_BTD: jnp.ndarray, targets_BT: jnp.ndarray, chunk: int) -> jnp.ndarray:
    """float32 -log p(target) [B, T]; logits exist only ``chunk`` positions at a time (the
    training loss's kernel)."""
    return loss_lib.token_nll(hidden_BTD, model.output_kernel(), targets_BT, chunk_size=chunk)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _apply(fn: Callable, graphdef, mesh: Mesh | None, state, *arrays):
    with activation_sharding(mesh):
        return fn(nnx.merge(graphdef, state), *arrays)


def jit_model_fn(model: Llama, fn: Callable, mesh: Mesh | None = None) -> Callable:
    """``fn(model, *arrays)`` jitted over the model's state; compiles once per input shape, and
    calls with the same ``fn`` object, model graph and mesh share the compilation cache.

    With ``mesh``, tracing happens under :func:`activation_sharding` so the model's activation
    constraints apply.
    """
    graphdef, state = nnx.split(model)
    return functools.partial(_apply, fn, graphdef, mesh, state)


def batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def pad_rows(rows: np.ndarray, batch_size: int, fill) -> np.ndarray:
    """Pads the leading axis to ``batch_size`` with ``fill`` so every batch has one shape."""
    missing = batch_size - rows.shape[0]
    if missing <= 0:
        return rows
    return np.concatenate([rows, np.full((missing, *rows.shape[1:]), fill, rows.dtype)])
