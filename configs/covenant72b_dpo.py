"""Covenant-72B DPO on a TPU pod (v5p-256: 128 chips), after SFT: preference pairs
(prompt / chosen / rejected, TRL's rows) with the reference model in the step.

    # on every worker of the pod (see docs/launch.md):
    covenant-jax train configs/covenant72b_dpo.py \
        --config.model.path=gs://.../covenant-72b-sft-jax --config.data.sources=...
    covenant-jax plan configs/covenant72b_dpo.py --topology v5p-256     # fit check, no TPU needed

The reference is the starting model (model.path, the SFT result): a second copy of the weights
sharded like the policy's, never updated (2.3 GiB per chip in float32 on 128 chips). Variant
``precompute`` scores every pair with it once before training instead, so the step holds one
model. A pair's two sequences share a packed row: seq_len 2048 (the model's context) holds a
pair of two 1,024-token sequences, TRL's default max_length.
"""

from pathlib import Path

from covenant_jax.train.recipe import check_variant, default_config, from_file


def get_config(variant: str = ""):
    """covenant72b_sft.py's model, mesh and optimizer, with DPO's data, loss and schedule."""
    variant = check_variant(variant, "precompute")
    cfg = from_file(Path(__file__).with_name("covenant72b_sft.py"))
    cfg.train.objective = "dpo"
    cfg.data.sources = [dict(path="data/preferences.jsonl", format="dpo")]
    cfg.data.loss_on = default_config().data.loss_on  # pairs score their answers only
    cfg.data.batch_size = 256  # rows; 256 or more pairs a step, by their length
    cfg.data.overlength = "truncate"  # the prompt, from the left
    cfg.dpo.beta = 0.1
    cfg.dpo.loss_type = ("sigmoid",)
    cfg.optim.lr = 5e-7
    cfg.optim.warmup_steps = 50
    cfg.train.steps = 1000
    cfg.train.eval_every = 100
    cfg.train.checkpoint_every = 100
    cfg.train.run_dir = "runs/covenant72b_dpo"
    if variant == "precompute":
        cfg.dpo.precompute_ref_log_probs = True
        cfg.train.run_dir = "runs/covenant72b_dpo_precompute"
    return cfg
