"""Covenant-72B long-context extension 2k -> 32k with YaRN (factor 16), on a TPU pod.

    covenant-jax train configs/covenant72b_yarn32k.py --config.model.path=CKPT_AFTER_SFT \
        --config.data.sources='[{"path": "data/long_docs.jsonl", "format": "text"}]'
    covenant-jax plan configs/covenant72b_yarn32k.py --topology v5p-256

Follows the YaRN paper's recipe (400 steps at lr 2e-5, batch 64, long documents) scaled to the
model: raw text packed to 32,768 tokens, one sequence spread over a context axis. The export
writes rope_scaling {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048}
and max_position_embeddings 32768, which transformers and vLLM read.
"""

from covenant_jax.train.recipe import default_config


def get_config():
    cfg = default_config()
    cfg.model.path = "configs/models/covenant-72b"
    cfg.model.param_dtype = "float32"
    cfg.model.dtype = "bfloat16"
    cfg.model.remat = "full"
    # splash: the Pallas TPU kernel, run per device in a shard_map (rows over fsdp, heads over
    # tensor: 64 q and 8 kv heads divide by 8); "blockwise" is the pure-JAX alternative
    cfg.model.attention = "splash"
    cfg.model.rope.rope_type = "yarn"
    cfg.model.rope.factor = 16.0
    cfg.model.rope.original_max_position_embeddings = 2048
    cfg.model.max_position_embeddings = 32768
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.context, cfg.mesh.tensor = 1, 16, 1, 8
    cfg.data.sources = [dict(path="data/long_docs.jsonl", format="text")]
    cfg.data.seq_len = 32768
    cfg.data.batch_size = 64
    cfg.data.overlength = "split"  # long documents become consecutive seq_len pieces
    cfg.optim.lr = 2e-5
    cfg.optim.warmup_steps = 20
    cfg.optim.schedule = "constant"
    cfg.optim.weight_decay = 0.0
    cfg.train.steps = 400
    # `covenant-jax plan` on v5p-256, splash: 4 rows of 32k per chip need 191 GiB (temporaries
    # 185 GiB); 4 micro-batches of one row per chip fit at 66.5 GiB of 95 (blockwise: 66.2).
    cfg.train.micro_batches = 4
    cfg.train.loss_chunk_size = 1024
    cfg.train.eval_every = 100
    cfg.train.checkpoint_every = 50
    cfg.train.run_dir = "runs/covenant72b_yarn32k"
    cfg.train.export_dtype = "bfloat16"
    return cfg
