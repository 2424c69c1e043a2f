"""Optax AdamW with warmup + decay schedule, global-norm clipping and a weight-decay mask.

Config (``optim`` section)::

    lr, warmup_steps, schedule ("cosine" | "linear" | "constant"), min_lr_ratio,
    b1, b2, eps, weight_decay, decay_exclude (substrings of param paths: no decay there),
    clip_norm (0 disables), mu_dtype ("" = param dtype; "bfloat16" halves the first moment)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections
import optax

from covenant_jax import fields

SCHEDULES = ("cosine", "linear", "constant")
RULES = {
    "lr": fields.at_least(0),
    "warmup_steps": fields.at_least(0),
    "schedule": fields.one_of(SCHEDULES),
    "min_lr_ratio": fields.within(0, 1),
    "b1": fields.within(0, 1, high_open=True),
    "b2": fields.within(0, 1, high_open=True),
    "eps": fields.at_least(0),
    "weight_decay": fields.at_least(0),
    "clip_norm": fields.at_least(0),
    "mu_dtype": fields.one_of(("",) + fields.DTYPES),
}


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            lr=2e-5,
            warmup_steps=0,
            schedule="cosine",
            min_lr_ratio=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.0,
            decay_exclude=("norm", "bias", "embed"),
            clip_norm=1.0,
            mu_dtype="",
        )
    )


def make_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    fields.check("optim", cfg, RULES)
    lr, warmup = cfg["lr"], min(cfg["warmup_steps"], total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = lr * cfg["min_lr_ratio"]
    decay = {
        "cosine": optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg["min_lr_ratio"]),
        "linear": optax.linear_schedule(lr, end, decay_steps),
        "constant": optax.constant_schedule(lr),
    }[cfg["schedule"]]
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params: Any, exclude: tuple[str, ...]) -> Any:
    """True where weight decay applies: every path that contains none of ``exclude``."""

    def keep(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not any(part in name for part in exclude)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(
    cfg: Mapping[str, Any], total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=cfg["b1"],
        b2=cfg["b2"],
        eps=cfg["eps"],
        weight_decay=cfg["weight_decay"],
        mu_dtype=cfg["mu_dtype"] or None,
        mask=lambda params: decay_mask(params, tuple(cfg["decay_exclude"])),
    )
    chain = [optax.clip_by_global_norm(cfg["clip_norm"])] if cfg["clip_norm"] > 0 else []
    # A non-finite gradient leaves params and moments untouched; the loop then stops the run.
    return optax.apply_if_finite(optax.chain(*chain, adamw), max_consecutive_errors=10**9), schedule
