"""LoRA SFT of SmolLM2-135M-Instruct on real ShareGPT conversations, sized for a 2-core CPU.

    python tools/fetch_material.py --what smollm2,sharegpt
    covenant-jax train configs/smollm2_lora_cpu.py
    covenant-jax train configs/smollm2_lora_cpu.py:runlocal      # ~1 minute smoke run
    python tools/bench_lora.py                                     # LoRA vs full fine-tuning, same data

The data, batch and schedule are smollm2_sft_cpu.py's; only ``model.lora`` and the learning rate
differ (adapters start at zero and move ~10x further per step than full fine-tuning's weights).
Rank 8, alpha 16 on every linear layer: the Covenant-72B post-training platform's default. The
run exports the PEFT adapter to RUN_DIR/export and the merged weights to RUN_DIR/export_merged.
"""

from pathlib import Path

from covenant_jax.train.recipe import check_variant, from_file


def get_config(variant: str = ""):
    variant = check_variant(variant, "runlocal")
    cfg = from_file(Path(__file__).with_name("smollm2_sft_cpu.py"), variant)
    # targets: the default, all seven projections (PEFT's "all-linear")
    cfg.model.lora.update(dict(enabled=True, rank=8, alpha=16.0, dropout=0.05, export_merged=True))
    cfg.optim.lr = 1e-3
    cfg.train.run_dir = "runs/smollm2_lora_cpu" + ("_runlocal" if variant else "")
    return cfg
