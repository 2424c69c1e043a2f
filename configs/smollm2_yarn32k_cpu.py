"""SmolLM2-135M-Instruct (native 8,192) extended to 32,768 with YaRN factor 4, CPU demo.

    python tools/fetch_material.py --what smollm2,gensim
    covenant-jax train configs/smollm2_yarn32k_cpu.py

Trains on long real English text (gensim's test data: Wikipedia articles and news) packed to
the target length with blockwise attention and remat, so no [T, T] scores and no full logits
are ever held. 32k tokens per step on 2 CPU cores is slow: ``:runlocal`` trains at 4,096.
"""

from covenant_jax.train.recipe import check_variant, default_config


def get_config(variant: str = ""):
    variant = check_variant(variant, "runlocal")
    cfg = default_config()
    cfg.model.path = "material/smollm2-135m-instruct"
    cfg.model.attention = "blockwise"
    cfg.model.remat = "full"
    cfg.model.rope.rope_type = "yarn"
    cfg.model.rope.factor = 4.0
    cfg.model.rope.original_max_position_embeddings = 8192
    cfg.model.max_position_embeddings = 32768
    cfg.data.sources = [dict(path="material/long_text.jsonl", format="text")]
    cfg.data.seq_len = 32768
    cfg.data.batch_size = 1
    cfg.data.overlength = "split"  # long documents become consecutive seq_len pieces
    cfg.data.eval_count = 2
    cfg.optim.lr = 2e-5
    cfg.optim.warmup_steps = 1
    cfg.optim.schedule = "constant"
    cfg.train.steps = 10
    cfg.train.eval_every = 5
    cfg.train.checkpoint_every = 5
    cfg.train.log_every = 1
    cfg.train.loss_chunk_size = 1024
    cfg.train.run_dir = "runs/smollm2_yarn32k_cpu"
    if variant == "runlocal":
        cfg.data.seq_len = 4096
        cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = 4, 2, 4
        cfg.train.run_dir = "runs/smollm2_yarn32k_cpu_runlocal"
    return cfg
