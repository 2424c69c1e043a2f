"""Preference-optimisation losses (DPO and its TRL variants) on per-sequence log-probabilities.

Definitions follow TRL's ``DPOTrainer`` (trl 1.16, ``_compute_loss``) term for term, so the
platform's DPO eval loss and TRL's logged metrics mean the same thing here:

* ``logratio = policy_logp - ref_logp`` per answer (summed over the answer's tokens);
  ``delta = logratio_chosen - logratio_rejected``;
* ``sigmoid`` (DPO): ``-log sigmoid(beta * delta)``;
* ``hinge``: ``relu(1 - beta * delta)``;
* ``ipo``: ``(delta_per_token - 1 / (2 beta))^2``, each log-ratio divided by its answer's
  token count first (TRL's normalisation, confirmed with the IPO authors);
* ``robust`` (label smoothing eps as the flip probability): ``(-(1-eps) log s(beta delta) +
  eps log s(-beta delta)) / (1 - 2 eps)``;
* ``exo_pair`` (label smoothing eps): ``q_w (log q_w - log(1-eps)) + q_l (log q_l - log eps)``
  with ``q_w = sigmoid(beta delta)``;
* ``sft``: the chosen answers' token-mean NLL (TRL's ``rpo_alpha`` of old, now a loss type).

Several types combine with weights, as TRL's ``loss_type`` / ``loss_weights`` do. Rewards are
``beta * logratio``; the metrics carry TRL's names. Everything here is per pair, float32; the
train step sums per-pair losses and divides by the global pair count.

Axes: P pairs.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from covenant_jax.errors import RecipeError

PAIR_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair")
LOSS_TYPES = PAIR_LOSSES + ("sft",)


def check(loss_types: Sequence[str], loss_weights: Sequence[float], beta: float, label_smoothing: float) -> None:
    """Recipe values that cannot run, named before anything compiles."""
    unknown = [t for t in loss_types if t not in LOSS_TYPES]
    if not loss_types or unknown:
        raise RecipeError(f"dpo.loss_type={list(loss_types)}: each must be one of {', '.join(LOSS_TYPES)}")
    if loss_weights and len(loss_weights) != len(loss_types):
        raise RecipeError(f"dpo.loss_weights={list(loss_weights)}: one weight per loss type {list(loss_types)}")
    if not beta > 0:
        raise RecipeError(f"dpo.beta={beta}: must be > 0")
    if "robust" in loss_types and not 0 <= label_smoothing < 0.5:
        raise RecipeError(f"dpo.label_smoothing={label_smoothing}: the robust loss needs it in [0, 0.5)")
    if "exo_pair" in loss_types and not 0 < label_smoothing < 1:
        raise RecipeError(f"dpo.label_smoothing={label_smoothing}: the exo_pair loss needs it in (0, 1)")


def pair_loss(kind: str, chosen_logratio_P, rejected_logratio_P, chosen_tokens_P, rejected_tokens_P,
              beta: float, label_smoothing: float) -> jnp.ndarray:
    """Per-pair loss [P] of one of ``PAIR_LOSSES``."""
    delta_P = chosen_logratio_P - rejected_logratio_P
    eps = label_smoothing
    if kind == "sigmoid":
        return -jax.nn.log_sigmoid(beta * delta_P)
    if kind == "hinge":
        return jax.nn.relu(1.0 - beta * delta_P)
    if kind == "ipo":
        per_token_P = (chosen_logratio_P / jnp.maximum(chosen_tokens_P, 1.0)
                       - rejected_logratio_P / jnp.maximum(rejected_tokens_P, 1.0))
        return (per_token_P - 1.0 / (2.0 * beta)) ** 2
    if kind == "robust":
        clean_P = -(1.0 - eps) * jax.nn.log_sigmoid(beta * delta_P)
        flipped_P = -eps * jax.nn.log_sigmoid(-beta * delta_P)
        return (clean_P - flipped_P) / (1.0 - 2.0 * eps)
    if kind == "exo_pair":
        log_qw_P, log_ql_P = jax.nn.log_sigmoid(beta * delta_P), jax.nn.log_sigmoid(-beta * delta_P)
        return (jnp.exp(log_qw_P) * (log_qw_P - jnp.log1p(-eps))
                + jnp.exp(log_ql_P) * (log_ql_P - jnp.log(eps)))
    raise RecipeError(f"unknown preference loss {kind!r}; one of {PAIR_LOSSES}")


def metric_sums(chosen_logps_P, rejected_logps_P, chosen_logratio_P, rejected_logratio_P, pair_mask_P,
                beta: float) -> Mapping[str, jnp.ndarray]:
    """Per-pair metrics summed over valid pairs (divide by the pair count for TRL's means)."""
    chosen_rewards_P = beta * chosen_logratio_P
    rejected_rewards_P = beta * rejected_logratio_P
    per_pair = {
        "rewards/chosen": chosen_rewards_P,
        "rewards/rejected": rejected_rewards_P,
        "rewards/accuracies": (chosen_rewards_P > rejected_rewards_P).astype(jnp.float32),
        "rewards/margins": chosen_rewards_P - rejected_rewards_P,
        "logps/chosen": chosen_logps_P,
        "logps/rejected": rejected_logps_P,
    }
    return {name: jnp.sum(jax.lax.stop_gradient(v) * pair_mask_P) for name, v in per_pair.items()}
