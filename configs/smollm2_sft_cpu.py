"""SFT of SmolLM2-135M-Instruct on real ShareGPT conversations, sized for a 2-core CPU.

    python tools/fetch_material.py --what smollm2,sharegpt
    covenant-jax train configs/smollm2_sft_cpu.py
    covenant-jax train configs/smollm2_sft_cpu.py:runlocal      # ~1 minute smoke run

The model's shape comes from its config.json; nothing here repeats it.
"""

from covenant_jax.train.recipe import check_variant, default_config


def get_config(variant: str = ""):
    variant = check_variant(variant, "runlocal")
    cfg = default_config()
    cfg.model.path = "material/smollm2-135m-instruct"
    cfg.mesh.fsdp = -1
    cfg.data.sources = [
        dict(
            path="material/sharegpt.jsonl",
            format="sharegpt",
            max_rows=1500,
            # ShareGPT also names the assistant chatgpt/bing/bard and the user "user".
            role_map=dict(chatgpt="assistant", bing="assistant", bard="assistant", user="user"),
        )
    ]
    cfg.data.template = "tokenizer"  # SmolLM2 ships a ChatML template
    # A third of ShareGPT's conversations start with the assistant (the rest of a longer one,
    # cut): trained as before rather than skipped as role_order.
    cfg.data.role_order = "any"
    cfg.data.loss_on = "assistant"
    cfg.data.seq_len = 256
    cfg.data.batch_size = 4
    cfg.data.overlength = "truncate"
    cfg.data.eval_count = 16
    cfg.optim.lr = 5e-5
    cfg.optim.warmup_steps = 2
    cfg.optim.schedule = "cosine"
    cfg.train.steps = 12
    cfg.train.eval_every = 6
    cfg.train.eval_batches = 4
    cfg.train.log_every = 1
    cfg.train.checkpoint_every = 6
    cfg.train.loss_chunk_size = 256
    cfg.train.run_dir = "runs/smollm2_sft_cpu"
    if variant == "runlocal":
        cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = 4, 2, 4
        cfg.train.run_dir = "runs/smollm2_sft_cpu_runlocal"
    return cfg
