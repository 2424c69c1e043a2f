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

from covenant_jax.train.recipe import check_variant, default_config


def get_config(variant: str = ""):
    variant = check_variant(variant, "precompute")
    cfg = default_config()
    cfg.model.path = "configs/models/covenant-72b"
    cfg.model.param_dtype = "float32"  # fp32 master weights and moments, sharded by fsdp
    cfg.model.dtype = "bfloat16"
    cfg.model.remat = "full"
    cfg.model.attention = "splash"  # as covenant72b_sft.py
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.context, cfg.mesh.tensor = 1, 16, 1, 8
    cfg.train.objective = "dpo"
    cfg.data.sources = [dict(path="data/preferences.jsonl", format="dpo")]
    cfg.data.template = "gemma"  # Gemma-3 vocabulary: <start_of_turn>/<end_of_turn>
    cfg.data.seq_len = 2048
    cfg.data.batch_size = 256  # rows; 256 or more pairs a step, by their length
    cfg.data.overlength = "truncate"  # the prompt, from the left
    cfg.data.eval_fraction = 0.01
    cfg.dpo.beta = 0.1
    cfg.dpo.loss_type = ("sigmoid",)
    cfg.optim.lr = 5e-7
    cfg.optim.warmup_steps = 50
    cfg.optim.schedule = "cosine"
    cfg.optim.weight_decay = 0.0
    cfg.optim.clip_norm = 1.0
    cfg.train.steps = 1000
    cfg.train.micro_batches = 1
    cfg.train.loss_chunk_size = 1024  # 1024 x 262144 fp32 logits = 1 GiB per chunk
    cfg.train.eval_every = 100
    cfg.train.checkpoint_every = 100
    cfg.train.run_dir = "runs/covenant72b_dpo"
    cfg.train.export_dtype = "bfloat16"
    if variant == "precompute":
        cfg.dpo.precompute_ref_log_probs = True
        cfg.train.run_dir = "runs/covenant72b_dpo_precompute"
    return cfg
