"""Covenant-72B SFT on a TPU pod (v5p-256: 128 chips), chat data with assistant-only loss.

    # on every worker of the pod (see docs/launch.md):
    covenant-jax train configs/covenant72b_sft.py \
        --config.model.path=gs://.../covenant-72b-jax --config.data.sources=...
    covenant-jax plan configs/covenant72b_sft.py --topology v5p-256     # fit check, no TPU needed

The model's shape comes from its config.json (configs/models/covenant-72b/config.json is a
copy of the published one, for planning without the weights). Variant ``8k`` trains at 8,192
tokens (the chat variant's context).
"""

from covenant_jax.train.recipe import check_variant, default_config


def get_config(variant: str = ""):
    variant = check_variant(variant, "8k")
    cfg = default_config()
    cfg.model.path = "configs/models/covenant-72b"
    cfg.model.param_dtype = "float32"  # fp32 master weights and moments, sharded by fsdp
    cfg.model.dtype = "bfloat16"
    cfg.model.remat = "full"
    # splash: the Pallas TPU kernel, run per device in a shard_map (rows over fsdp, heads over
    # tensor: 64 q and 8 kv heads divide by 8); "blockwise" is the pure-JAX alternative
    cfg.model.attention = "splash"
    # 128 chips: 16-way fsdp x 8-way tensor (heads 64 and kv heads 8 divide by 8).
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.context, cfg.mesh.tensor = 1, 16, 1, 8
    cfg.data.sources = [dict(path="data/chat.jsonl", format="sharegpt")]
    cfg.data.template = "gemma"  # Gemma-3 vocabulary: <start_of_turn>/<end_of_turn>
    cfg.data.loss_on = "assistant"
    cfg.data.seq_len = 2048
    cfg.data.batch_size = 256
    cfg.data.eval_fraction = 0.01
    cfg.optim.lr = 1e-5
    cfg.optim.warmup_steps = 100
    cfg.optim.schedule = "cosine"
    cfg.optim.weight_decay = 0.0
    cfg.optim.clip_norm = 1.0
    cfg.train.steps = 2000
    cfg.train.micro_batches = 1
    cfg.train.loss_chunk_size = 1024  # 1024 x 262144 fp32 logits = 1 GiB per chunk
    cfg.train.eval_every = 200
    cfg.train.checkpoint_every = 200
    cfg.train.run_dir = "runs/covenant72b_sft"
    cfg.train.export_dtype = "bfloat16"
    if variant == "8k":
        cfg.data.seq_len = 8192
        cfg.data.batch_size = 64
        cfg.model.max_position_embeddings = 8192  # the chat variant's context; rope unchanged
        cfg.train.run_dir = "runs/covenant72b_sft_8k"
    return cfg
