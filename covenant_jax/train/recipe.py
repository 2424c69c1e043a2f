"""The training recipe: defaults for every section, and the checks made before anything compiles.

Sections: ``model`` (where the weights are and how to run them), ``mesh``, ``data`` (see
covenant_jax.data.pipeline), ``optim`` (covenant_jax.train.optimizer), ``train`` (the objective,
steps, batch layout, logging, checkpoints, export), ``dpo`` (covenant_jax.train.preference; read
when ``train.objective="dpo"``). The model's shape is never here: it comes from the
checkpoint's config.json. ``model.rope`` optionally replaces the checkpoint's RoPE scaling (the
long-context recipes; every knob transformers reads) together with ``model.max_position_embeddings``.
``model.lora`` trains LoRA adapters on a frozen base instead of every weight (model/lora.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import ml_collections
from ml_collections import config_dict

from covenant_jax import fields
from covenant_jax.config import REQUIRED_ROPE_KNOBS, ROPE_KNOBS, ROPE_TYPES, ModelConfig, RopeConfig
from covenant_jax.data import pairs, pipeline as data_pipeline
from covenant_jax.errors import RecipeError, UserError
from covenant_jax.model import attention, gpu_attention, llama
from covenant_jax.model import lora as lora_lib
from covenant_jax.parallel.sharding import MESH_AXES
from covenant_jax.train import optimizer, preference, program

RULES = {
    "model": {
        "param_dtype": fields.one_of(fields.DTYPES),
        "dtype": fields.one_of(fields.DTYPES),
        "remat": fields.one_of(llama.REMAT_POLICIES),
        "attention": fields.one_of(attention.backend_names()),
        "max_position_embeddings": fields.at_least(0),
    },
    "mesh": {axis: fields.mesh_size() for axis in MESH_AXES},
    "data": data_pipeline.RULES,
    "optim": optimizer.RULES,
    "train": {
        "objective": fields.one_of(program.OBJECTIVES),
        "steps": fields.at_least(1),
        "micro_batches": fields.at_least(1),
        "log_every": fields.at_least(1),
        "eval_every": fields.at_least(0),
        "eval_batches": fields.at_least(0),
        "checkpoint_every": fields.at_least(1),
        "keep_checkpoints": fields.at_least(1),
        "loss_chunk_size": fields.at_least(1),
        "export_dtype": fields.one_of(("",) + fields.DTYPES),
        "peak_tflops_per_device": fields.at_least(0),
    },
}


def default_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict(
        dict(
            path="",
            param_dtype="float32",
            dtype="float32",
            remat="none",
            attention="naive",
            rope=rope_section(),
            max_position_embeddings=0,
            lora=lora_section(),
        )
    )
    cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, context=1, tensor=1))
    cfg.data = data_pipeline.default_config()
    cfg.optim = optimizer.default_config()
    cfg.dpo = preference.default_config()
    cfg.train = ml_collections.ConfigDict(
        dict(
            objective="sft",  # "sft" (token cross-entropy) | "dpo" (preference pairs; the dpo section)
            steps=100,
            micro_batches=1,
            seed=0,
            run_dir="runs/default",
            resume=True,
            log_every=10,
            eval_every=50,
            eval_batches=0,
            checkpoint_every=50,
            keep_checkpoints=3,
            async_checkpoint=True,
            loss_chunk_size=4096,
            export=True,
            export_dtype="",
            peak_tflops_per_device=0.0,
            progress=True,
            allow_recipe_change=False,  # resume a run_dir whose checkpoint has another recipe (train/resume.py)
        )
    )
    return cfg


def lora_section() -> ml_collections.ConfigDict:
    """``model.lora``: off unless ``enabled``. Targets take our names or PEFT's (q_proj, ...,
    "all-linear"); ``base_dtype`` "" keeps model.param_dtype for the frozen base (the adapters are
    always in model.param_dtype); ``adapter`` continues a PEFT adapter folder; the run exports the
    adapter to RUN_DIR/export, and with ``export_merged`` also the merged weights to
    RUN_DIR/export_merged."""
    return ml_collections.ConfigDict(
        dict(
            enabled=False,
            rank=8,
            alpha=16.0,
            dropout=0.0,
            targets=lora_lib.TARGETS,
            rslora=False,
            base_dtype="",
            adapter="",
            export_merged=False,
        )
    )


def from_file(path: str | Path, variant: str = "") -> ml_collections.ConfigDict:
    """The config of the recipe file at ``path`` (a recipe built on another one: recipe files are
    loaded by path, not imported as a package)."""
    spec = importlib.util.spec_from_file_location(f"_covenant_recipe_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*([variant] if variant else []))


def check_variant(variant: str, *known: str) -> str:
    """A recipe's ``get_config(variant)`` calls this first, so a mistyped ``FILE:variant`` is an
    error rather than the default run."""
    if variant not in ("",) + known:
        raise RecipeError(
            f"recipe variant {variant!r} does not exist; this recipe has: "
            f"{', '.join(known) or 'no variants'} (or none)"
        )
    return variant


def rope_section() -> ml_collections.ConfigDict:
    """``model.rope``: every knob transformers reads, as transformers spells it; None = not set
    (transformers' default), any other value -- 0 and False included -- is passed on as given.
    ``rope_type`` "" keeps the checkpoint's RoPE (knobs set then change just those knobs)."""
    knobs = {
        k: config_dict.placeholder(float) for k in ("rope_theta",) + ROPE_KNOBS["yarn"] + ROPE_KNOBS["llama3"]
    }
    knobs.update(
        original_max_position_embeddings=config_dict.placeholder(int), truncate=config_dict.placeholder(bool)
    )
    return ml_collections.ConfigDict(dict(rope_type="", **knobs))


def rope_override(model_cfg: ModelConfig, section) -> ModelConfig:
    """The checkpoint's config with ``model.rope`` / ``model.max_position_embeddings`` applied."""
    rope = recipe_rope(model_cfg, section.rope)
    max_pos = section.max_position_embeddings or model_cfg.max_position_embeddings
    if rope.rope_type == "yarn" and rope != model_cfg.rope:
        original = rope.original_max_position_embeddings
        if abs(rope.factor * original - max_pos) > 1e-6 * max_pos:
            raise UserError(
                f"model.rope: yarn factor {rope.factor} x original_max_position_embeddings {original} "
                f"= {rope.factor * original:g}, but model.max_position_embeddings is {max_pos}; "
                "make them agree (e.g. factor 16 with 2048 -> 32768)"
            )
    if rope == model_cfg.rope and max_pos == model_cfg.max_position_embeddings:
        return model_cfg
    return model_cfg.with_rope(rope, max_pos)


def check_fields(cfg: ml_collections.ConfigDict) -> None:
    """Every field's own value (names, ranges), before anything is read, loaded or compiled."""
    if not cfg.model.path:
        raise RecipeError("model.path is empty: point it at an HF folder or a converted checkpoint")
    for section, rules in RULES.items():
        fields.check(section, cfg[section], rules)
    check_objective(cfg)


def check_objective(cfg: ml_collections.ConfigDict) -> None:
    """DPO's own fields, and data that suits the objective: pairs for ``dpo``, none for ``sft``
    (mapping ``chosen`` to an SFT completion would silently drop the rejected answers)."""
    dpo = cfg.train.objective == "dpo"
    if dpo:
        preference.check(cfg.dpo)
        if cfg.dpo.ref_model_path and program.lora_config(cfg) is not None:
            raise RecipeError(
                f"dpo.ref_model_path={cfg.dpo.ref_model_path}: with model.lora the reference is the "
                "base with the adapters off (as TRL with a PEFT model); leave dpo.ref_model_path empty"
            )
    sources = [s.to_dict() if hasattr(s, "to_dict") else dict(s) for s in cfg.data.sources]
    if sources and pairs.is_pair_data(sources) != dpo:
        raise RecipeError(
            "train.objective='dpo' needs preference pairs: data sources of format 'dpo'"
            if dpo
            else "data sources of format 'dpo' are preference pairs: set train.objective='dpo'"
        )


def bound_samples_per_row(cfg: ml_collections.ConfigDict) -> None:
    """cudnn attends a fixed number of packed samples per row: without data.max_samples_per_row,
    take its default, so the packer and the kernel (``ModelOptions``) read one number."""
    if cfg.model.attention == "cudnn" and not cfg.data.max_samples_per_row:
        cfg.data.max_samples_per_row = gpu_attention.DEFAULT_MAX_SAMPLES_PER_ROW


def recipe_rope(model_cfg: ModelConfig, section) -> RopeConfig:
    """``model.rope`` over the checkpoint's RoPE: a new ``rope_type`` starts from that type's
    defaults (original_max_position_embeddings: the checkpoint's context), else the checkpoint's
    knobs stay and those set replace theirs. A knob the type does not read is an error."""
    knobs = {k: v for k, v in section.to_dict().items() if k != "rope_type" and v is not None}
    if "rope_theta" in knobs:
        knobs["theta"] = knobs.pop("rope_theta")
    if not section.rope_type:
        base = model_cfg.rope
    elif section.rope_type not in ROPE_TYPES:
        raise UserError(
            f"model.rope.rope_type={section.rope_type!r} is not supported; "
            f"supported: {', '.join(ROPE_TYPES)} ('' keeps the checkpoint's)"
        )
    else:
        base = RopeConfig(section.rope_type, theta=model_cfg.rope.theta)
        if "original_max_position_embeddings" in ROPE_KNOBS[base.rope_type]:
            base = dataclasses.replace(
                base, original_max_position_embeddings=model_cfg.max_position_embeddings
            )
    read = ROPE_KNOBS[base.rope_type]
    for k in knobs:
        if k != "theta" and k not in read:
            raise UserError(
                f"model.rope.{k} is not read by rope_type {base.rope_type!r}, which reads: "
                f"{', '.join(('rope_theta',) + read)}"
            )
    rope = dataclasses.replace(base, **knobs)
    for k in REQUIRED_ROPE_KNOBS.get(rope.rope_type, ()):
        if getattr(rope, k) is None:
            raise UserError(f"model.rope.{k} is required for rope_type {rope.rope_type!r}")
    return rope


def validate(
    cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, num_data_shards: int, context: int = 1
) -> None:
    """Mistakes that would otherwise surface as a failed compile or a silent wrong run."""
    check_fields(cfg)
    t, d = cfg.train, cfg.data
    if d.seq_len > model_cfg.max_position_embeddings:
        raise UserError(
            f"data.seq_len={d.seq_len} exceeds the model's max_position_embeddings="
            f"{model_cfg.max_position_embeddings}; shorten it or extend the context with model.rope"
        )
    if d.batch_size % t.micro_batches:
        raise UserError(
            f"data.batch_size={d.batch_size} is not divisible by train.micro_batches={t.micro_batches}"
        )
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
