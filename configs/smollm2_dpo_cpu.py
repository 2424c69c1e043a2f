"""DPO of SmolLM2-135M-Instruct on preference pairs built from real ShareGPT conversations, sized
for a 2-core CPU.

    python tools/fetch_material.py --what smollm2,sharegpt,sharegpt_pairs
    covenant-jax train configs/smollm2_dpo_cpu.py
    covenant-jax train configs/smollm2_dpo_cpu.py:runlocal      # a short smoke run

The pairs (material/sharegpt_pairs.jsonl, tools/material.py fetch_sharegpt_pairs): a short
English conversation's first user message is the prompt, its real reply the chosen answer, the
first reply of another conversation (a fixed rotation by half the list) the rejected one. The
reference is the starting model, run in the step (dpo.precompute_ref_log_probs=True scores every
pair once before training instead, so the step holds one model).
"""

from covenant_jax.train.recipe import check_variant, default_config


def get_config(variant: str = ""):
    variant = check_variant(variant, "runlocal")
    cfg = default_config()
    cfg.model.path = "material/smollm2-135m-instruct"
    cfg.mesh.fsdp = -1
    cfg.train.objective = "dpo"
    cfg.data.sources = [dict(path="material/sharegpt_pairs.jsonl", format="dpo")]
    cfg.data.template = "tokenizer"  # SmolLM2 ships a ChatML template
    cfg.data.seq_len = 384  # a pair's two sequences share a row (about 2 pairs a row here)
    cfg.data.batch_size = 4
    cfg.data.overlength = "truncate"  # the prompt, from the left
    cfg.data.eval_count = 32
    cfg.dpo.beta = 0.1
    cfg.dpo.loss_type = ("sigmoid",)
    cfg.optim.lr = 2e-5
    cfg.optim.warmup_steps = 0  # a short run: warmup's first step (lr 0) would be lost
    cfg.optim.schedule = "cosine"
    cfg.train.steps = 12
    cfg.train.eval_every = 6
    cfg.train.log_every = 1
    cfg.train.checkpoint_every = 6
    cfg.train.loss_chunk_size = 256
    cfg.train.run_dir = "runs/smollm2_dpo_cpu"
    if variant == "runlocal":
        cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = 4, 2, 4
        cfg.data.eval_count = 8
        cfg.train.run_dir = "runs/smollm2_dpo_cpu_runlocal"
    return cfg
