"""The training recipe: defaults for every section, and the checks made before anything compiles.

Sections: ``model`` (where the weights are and how to run them), ``mesh``, ``data`` (see
covenant_jax.data.pipeline), ``optim`` (covenant_jax.train.optimizer), ``train`` (steps, batch
layout, logging, checkpoints, export). The model's shape is never here: it comes from the
checkpoint's config.json. ``model.rope`` optionally replaces the checkpoint's RoPE scaling (the
long-context recipes) together with ``model.max_position_embeddings``.
"""

from __future__ import annotations

import ml_collections

from covenant_jax.config import ModelConfig, RopeConfig
from covenant_jax.data import pipeline as data_pipeline
from covenant_jax.errors import UserError
from covenant_jax.train import optimizer


def default_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict(dict(
        path="", param_dtype="float32", dtype="float32", remat="none", attention="naive",
        # RoPE override; rope_type "" keeps the checkpoint's.
        rope=dict(rope_type="", factor=0.0, original_max_position_embeddings=0, beta_fast=0.0,
                  beta_slow=0.0, low_freq_factor=0.0, high_freq_factor=0.0),
        max_position_embeddings=0,
    ))
    cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, context=1, tensor=1))
    cfg.data = data_pipeline.default_config()
    cfg.optim = optimizer.default_config()
    cfg.train = ml_collections.ConfigDict(dict(
        steps=100, micro_batches=1, seed=0, run_dir="runs/default", resume=True,
        log_every=10, eval_every=50, eval_batches=0, checkpoint_every=50, keep_checkpoints=3,
        async_checkpoint=True, loss_chunk_size=4096, export=True, export_dtype="",
        peak_tflops_per_device=0.0, progress=True,
        allow_recipe_change=False,  # resume a run_dir whose checkpoint has another recipe (train/resume.py)
    ))
    return cfg


def rope_override(model_cfg: ModelConfig, section) -> ModelConfig:
    """The checkpoint's config with ``model.rope`` / ``model.max_position_embeddings`` applied."""
    if not section.rope.rope_type:
        if section.max_position_embeddings:
            return model_cfg.with_rope(model_cfg.rope, section.max_position_embeddings)
        return model_cfg
    knobs = {k: v for k, v in section.rope.to_dict().items() if k != "rope_type" and v}
    rope = RopeConfig(rope_type=section.rope.rope_type, theta=model_cfg.rope.theta, **knobs)
    max_pos = section.max_position_embeddings or model_cfg.max_position_embeddings
    if rope.rope_type == "yarn":
        original = rope.original_max_position_embeddings or model_cfg.max_position_embeddings
        rope = RopeConfig(**{**rope.__dict__, "original_max_position_embeddings": original})
        if abs(rope.factor * original - max_pos) > 1e-6 * max_pos:
            raise UserError(
                f"model.rope: yarn factor {rope.factor} x original_max_position_embeddings {original} "
                f"= {rope.factor * original:g}, but model.max_position_embeddings is {max_pos}; "
                "make them agree (e.g. factor 16 with 2048 -> 32768)"
            )
    return model_cfg.with_rope(rope, max_pos)


def validate(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, num_data_shards: int,
             context: int = 1) -> None:
    """Mistakes that would otherwise surface as a failed compile or a silent wrong run."""
    t, d = cfg.train, cfg.data
    if not cfg.model.path:
        raise UserError("model.path is empty: point it at an HF folder or a converted checkpoint")
    if d.seq_len > model_cfg.max_position_embeddings:
        raise UserError(
            f"data.seq_len={d.seq_len} exceeds the model's max_position_embeddings="
            f"{model_cfg.max_position_embeddings}; shorten it or extend the context with model.rope"
        )
    if d.batch_size % t.micro_batches:
        raise UserError(f"data.batch_size={d.batch_size} is not divisible by train.micro_batches={t.micro_batches}")
    micro = d.batch_size // t.micro_batches
    if micro % num_data_shards:
        raise UserError(
            f"micro-batch of {micro} rows (data.batch_size / train.micro_batches) does not divide "
            f"over the {num_data_shards} data-parallel shards (mesh data x fsdp)"
        )
    chunks = 2 * context if cfg.model.attention == "context_zigzag" else context
    if d.seq_len % chunks:
        raise UserError(
            f"data.seq_len={d.seq_len} must be divisible by {chunks} "
            f"({'2 x ' if chunks != context else ''}mesh.context={context})"
        )
    if t.steps <= 0:
        raise UserError(f"train.steps={t.steps} must be positive")
    if t.keep_checkpoints < 1:
        raise UserError(f"train.keep_checkpoints={t.keep_checkpoints} must be at least 1 (the run resumes from the last)")
