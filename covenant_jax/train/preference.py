"""Preference optimisation (DPO and its TRL variants): the ``dpo`` recipe section, the per-pair
losses, the DPO objective on packed pairs, and where the reference log-probs come from.

Definitions follow TRL's ``DPOTrainer`` (trl 1.16.0, ``_compute_loss``) term for term, so the
platform's DPO eval loss and TRL's logged metrics mean the same thing here:

* ``logratio = policy_logp - ref_logp`` per answer (summed over the answer's scored tokens);
  ``delta = logratio_chosen - logratio_rejected``;
* ``sigmoid`` (DPO): ``-log sigmoid(beta * delta)``;
* ``hinge``: ``relu(1 - beta * delta)``;
* ``ipo``: ``(delta_per_token - 1 / (2 beta))^2``, each log-ratio divided by its answer's
  token count first (TRL's normalisation, confirmed with the IPO authors);
* ``robust`` (label smoothing eps as the flip probability): ``(-(1-eps) log s(beta delta) +
  eps log s(-beta delta)) / (1 - 2 eps)``;
* ``exo_pair`` (label smoothing eps): ``q_w (log q_w - log(1-eps)) + q_l (log q_l - log eps)``
  with ``q_w = sigmoid(beta delta)``;
* ``sft``: the chosen answers' token-mean NLL (what older TRL called ``rpo_alpha``: the loss
  ``["sigmoid", "sft"]`` with weights ``[1, rpo_alpha]``).

Several types combine with weights, as TRL's ``loss_type`` / ``loss_weights`` do. Each pair
loss is a mean over the batch's valid pairs and ``sft`` a mean over its chosen answer tokens,
both counted across all micro-batches (TRL's per-batch means, for any micro-batching). Rewards
are ``beta * logratio``; the metrics carry TRL's names.

A packed pair batch (``covenant_jax.data.preference``) carries, besides the SFT fields,
``pair_slot`` [B, T] (the pair's index within its row, -1 on padding) and ``chosen`` [B, T]
(1 on the chosen sequence, 0 on the rejected one); a pair never spans rows, so per-sequence
sums are a per-row ``segment_sum`` over ``2 * pairs_per_row`` slots, right wherever the rows
are sharded. ``ref_logp`` [B, T] (per target, 0 where not scored) is there when the reference
log-probs were precomputed.

Axes: B rows, T sequence, K pairs per row, P pairs (B*K).
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from covenant_jax import fields, storage
from covenant_jax.config import ModelConfig
from covenant_jax.errors import RecipeError
from covenant_jax.train import state as state_lib
from covenant_jax.train.loss import token_nll
from covenant_jax.train.step import DROPOUT_KEY, Batch, Objective, Sums, mean

PAIR_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair")
LOSS_TYPES = PAIR_LOSSES + ("sft",)
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
RULES = {
    "beta": fields.positive(),
    "label_smoothing": fields.within(0, 1, high_open=True),
}


def default_config() -> ml_collections.ConfigDict:
    """The ``dpo`` section (read when ``train.objective="dpo"``), TRL's names and defaults."""
    return ml_collections.ConfigDict(
        dict(
            beta=0.1,
            loss_type=("sigmoid",),
            loss_weights=(),
            label_smoothing=0.0,
            # "": the starting model (model.path) is the reference; else another folder of the same shape
            ref_model_path="",
            # one pass before training stores each sequence's reference log-probs with the data,
            # so the step holds one model
            precompute_ref_log_probs=False,
        )
    )


def check(section) -> None:
    """Recipe values that cannot run, named before anything is read or compiled."""
    fields.check("dpo", section, RULES)
    loss_types, weights = tuple(section.loss_type), tuple(section.loss_weights)
    unknown = [t for t in loss_types if t not in LOSS_TYPES]
    if not loss_types or unknown or len(set(loss_types)) != len(loss_types):
        raise RecipeError(
            f"dpo.loss_type={list(loss_types)}: each must be one of {', '.join(LOSS_TYPES)} "
            "(each at most once)"
        )
    if weights and len(weights) != len(loss_types):
        raise RecipeError(f"dpo.loss_weights={list(weights)}: one weight per loss type {list(loss_types)}")
    eps = section.label_smoothing
    if "robust" in loss_types and not eps < 0.5:
        raise RecipeError(f"dpo.label_smoothing={eps}: the robust loss needs it in [0, 0.5)")
    if "exo_pair" in loss_types and not eps > 0:
        raise RecipeError(
            f"dpo.label_smoothing={eps}: the exo_pair loss needs it in (0, 1) (the EXO paper recommends 1e-3)"
        )
    if eps and not {"robust", "exo_pair"} & set(loss_types):
        raise RecipeError(
            f"dpo.label_smoothing={eps} is read only by the robust and exo_pair losses "
            f"(TRL 1.16), not by {list(loss_types)}: use dpo.loss_type=robust for "
            "conservative DPO"
        )


# What the reference must share with the policy for its log-probs to score the same tokens.
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
)


def check_reference(policy_path: str, reference_path: str) -> None:
    """A reference folder (``dpo.ref_model_path``) of another shape or vocabulary than the
    policy's, named from the two config.json files before any weight is read."""
    configs = []
    for path in (policy_path, reference_path):
        config_json = storage.path(path) / "config.json"
        if not config_json.is_file():
            raise RecipeError(
                f"{'dpo.ref_model_path' if path == reference_path else 'model.path'}={path}: "
                f"no config.json there"
            )
        configs.append(ModelConfig.from_json_file(config_json))
    policy, reference = configs
    differ = [
        f"{k} {getattr(reference, k)} (the policy's: {getattr(policy, k)})"
        for k in SHAPE_FIELDS
        if getattr(reference, k) != getattr(policy, k)
    ]
    if differ:
        raise RecipeError(
            f"dpo.ref_model_path={reference_path}: the reference disagrees with the policy "
            f"(model.path) in {', '.join(differ)}; it must be the same model shape and vocabulary"
        )


# ---- per-pair losses and metrics ----------------------------------------------------------------


def pair_loss(
    kind: str,
    chosen_logratio_P,
    rejected_logratio_P,
    chosen_tokens_P,
    rejected_tokens_P,
    beta: float,
    label_smoothing: float,
) -> jnp.ndarray:
    """Per-pair loss [P] of one of ``PAIR_LOSSES``."""
    delta_P = chosen_logratio_P - rejected_logratio_P
    eps = label_smoothing
    if kind == "sigmoid":
        return -jax.nn.log_sigmoid(beta * delta_P)
    if kind == "hinge":
        return jax.nn.relu(1.0 - beta * delta_P)
    if kind == "ipo":
        per_token_P = chosen_logratio_P / jnp.maximum(
            chosen_tokens_P, 1.0
        ) - rejected_logratio_P / jnp.maximum(rejected_tokens_P, 1.0)
        return (per_token_P - 1.0 / (2.0 * beta)) ** 2
    if kind == "robust":
        clean_P = -(1.0 - eps) * jax.nn.log_sigmoid(beta * delta_P)
        flipped_P = -eps * jax.nn.log_sigmoid(-beta * delta_P)
        return (clean_P - flipped_P) / (1.0 - 2.0 * eps)
    if kind == "exo_pair":
        log_qw_P, log_ql_P = jax.nn.log_sigmoid(beta * delta_P), jax.nn.log_sigmoid(-beta * delta_P)
        return jnp.exp(log_qw_P) * (log_qw_P - jnp.log1p(-eps)) + jnp.exp(log_ql_P) * (
            log_ql_P - jnp.log(eps)
        )
    raise RecipeError(f"unknown preference loss {kind!r}; one of {PAIR_LOSSES}")


def metric_sums(
    chosen_logps_P, rejected_logps_P, chosen_logratio_P, rejected_logratio_P, pair_mask_P, beta: float
) -> Mapping[str, jnp.ndarray]:
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


# ---- per-sequence sums over packed pairs --------------------------------------------------------


def sequence_sums(
    values_BT: jnp.ndarray, batch: Batch, pairs_per_row: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(chosen [P], rejected [P]) sums of ``values_BT * loss_mask`` per pair, P = rows x K.

    Each row sums its own tokens into 2K slots (slot 2k: pair k's chosen answer, 2k + 1: its
    rejected one), so rows stay where they are sharded. Padding (``pair_slot`` -1) has no loss
    mask, so it adds 0 to slot 0."""
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    slot_BT = batch["pair_slot"]
    index_BT = jnp.where(slot_BT >= 0, 2 * slot_BT + 1 - batch["chosen"], 0)
    per_row = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=2 * pairs_per_row))
    sums_BS = per_row(values_BT.astype(jnp.float32) * mask_BT, index_BT)
    sums_P2 = sums_BS.reshape(-1, 2)
    return sums_P2[:, 0], sums_P2[:, 1]


def pair_totals(batch: Batch, pairs_per_row: int) -> Sums:
    """Counts known from the batch alone (any leading axes): valid pairs (both answers scored),
    their chosen answer tokens (``sft``'s denominator) and all scored tokens."""
    rows = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}
    ones_BT = jnp.ones(rows["loss_mask"].shape, jnp.float32)
    chosen_tokens_P, rejected_tokens_P = sequence_sums(ones_BT, rows, pairs_per_row)
    valid_P = ((chosen_tokens_P > 0) & (rejected_tokens_P > 0)).astype(jnp.float32)
    return {
        "pairs": jnp.sum(valid_P),
        "chosen_tokens": jnp.sum(valid_P * chosen_tokens_P),
        "tokens": jnp.sum(valid_P * (chosen_tokens_P + rejected_tokens_P)),
    }


# ---- where the reference log-probs come from ----------------------------------------------------

# reference(params, frozen, batch) -> per-target log-probs [B, T] (anything where not scored).
Reference = Callable[[dict, dict, Batch], jnp.ndarray]


def frozen_model_reference(
    graphdef: nnx.GraphDef, rest: nnx.State, chunk_size: int, unroll: bool = False
) -> Reference:
    """The frozen copy in ``state["frozen"]["ref_params"]``, run in the step on the same mesh."""

    def reference(params, frozen, batch):
        del params
        model = nnx.merge(graphdef, jax.lax.stop_gradient(frozen["ref_params"]), rest)
        return -policy_token_nll(model, batch, chunk_size, unroll)

    return reference


def adapters_off_reference(
    graphdef: nnx.GraphDef, rest: nnx.State, chunk_size: int, unroll: bool = False
) -> Reference:
    """A LoRA model's own frozen base with the adapters switched off (TRL and PEFT's
    ``disable_adapter``): the reference costs no second copy of the weights."""

    def reference(params, frozen, batch):
        model = state_lib.merge_trained(graphdef, jax.lax.stop_gradient(params), frozen, rest)
        return -policy_token_nll(model, batch, chunk_size, unroll, adapters=False)

    return reference


def precomputed_reference(params, frozen, batch) -> jnp.ndarray:
    """Stored with the data before training (``dpo.precompute_ref_log_probs``)."""
    del params, frozen
    return batch["ref_logp"]


def policy_token_nll(
    model, batch: Batch, chunk_size: int, unroll: bool = False, adapters: bool = True
) -> jnp.ndarray:
    """Per-target NLL [B, T] of ``model`` (``adapters`` False: a LoRA model's base alone; a batch
    field ``dropout_key`` turns adapter dropout on)."""
    hidden_BTD = model.hidden_states(
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
        adapters=adapters,
        dropout_key=batch.get(DROPOUT_KEY) if adapters else None,
    )
    return token_nll(
        hidden_BTD, model.output_kernel(), batch["targets"], chunk_size=chunk_size, unroll=unroll
    )


# ---- the objective ------------------------------------------------------------------------------


def loss_weights(section) -> dict[str, float]:
    """loss type -> weight (TRL: 1.0 each unless ``loss_weights`` is given)."""
    weights = tuple(section.loss_weights) or (1.0,) * len(section.loss_type)
    return dict(zip(tuple(section.loss_type), map(float, weights), strict=True))


def dpo_objective(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    section,
    *,
    chunk_size: int,
    pairs_per_row: int,
    reference: Reference,
    unroll: bool = False,
) -> Objective:
    """DPO on packed pairs: ``section`` is the recipe's ``dpo`` section (checked)."""
    weights = loss_weights(section)
    beta, eps = float(section.beta), float(section.label_smoothing)

    def totals(batch: Batch) -> Sums:
        return pair_totals(batch, pairs_per_row)

    def loss(params, frozen, batch, totals):
        model = state_lib.merge_trained(graphdef, params, frozen, rest)
        nll_BT = policy_token_nll(model, batch, chunk_size, unroll)
        ref_BT = jax.lax.stop_gradient(reference(params, frozen, batch))
        logps_c, logps_r = sequence_sums(-nll_BT, batch, pairs_per_row)
        ref_c, ref_r = sequence_sums(ref_BT, batch, pairs_per_row)
        tokens_c, tokens_r = sequence_sums(jnp.ones_like(nll_BT), batch, pairs_per_row)
        valid_P = ((tokens_c > 0) & (tokens_r > 0)).astype(jnp.float32)
        ratio_c, ratio_r = logps_c - ref_c, logps_r - ref_r
        parts = {}
        for kind in weights:
            if kind == "sft":  # the chosen answers' NLL = minus their log-probs, over valid pairs
                parts[kind] = -jnp.sum(valid_P * logps_c)
            else:
                per_pair = pair_loss(kind, ratio_c, ratio_r, tokens_c, tokens_r, beta, eps)
                parts[kind] = jnp.sum(valid_P * per_pair)
        loss = sum(weights[k] * mean(parts[k], _denominator(k, totals)) for k in parts)
        sums = {f"loss/{k}": jax.lax.stop_gradient(v) for k, v in parts.items()}
        sums.update(metric_sums(logps_c, logps_r, ratio_c, ratio_r, valid_P, beta))
        return loss, sums

    def report(sums, totals):
        parts = {k: mean(sums[f"loss/{k}"], _denominator(k, totals)) for k in weights}
        out = {
            "loss": sum(weights[k] * parts[k] for k in parts),
            "tokens": totals["tokens"],
            "pairs": totals["pairs"],
        }
        out.update({name: mean(sums[name], totals["pairs"]) for name in METRICS})
        if len(parts) > 1:
            out.update({f"loss/{k}": v for k, v in parts.items()})
        return out

    return Objective(totals, loss, report)


def _denominator(kind: str, totals: Sums) -> jnp.ndarray:
    return totals["chosen_tokens"] if kind == "sft" else totals["pairs"]
