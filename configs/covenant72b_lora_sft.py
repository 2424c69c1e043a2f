"""Covenant-72B LoRA SFT on a sixteenth of the full fine-tuning pod: v5p-16 (8 chips).

    covenant-jax train configs/covenant72b_lora_sft.py \
        --config.model.path=gs://.../covenant-72b-jax --config.data.sources=...
    covenant-jax plan configs/covenant72b_lora_sft.py --topology v5p-16     # fit check, no TPU needed

covenant72b_sft.py's data, batch and schedule with rank-8, alpha-16 adapters on every linear
layer (the Covenant-72B post-training platform's default) on a frozen bfloat16 base: the base
has no gradient and no optimizer state (145 GB in bf16, 18 GB per chip over fsdp 8), the adapters
(0.2% of the weights) train in float32 with AdamW. The run exports the PEFT adapter (megabytes;
vLLM / SGLang load it beside the shared base) to RUN_DIR/export and the merged bf16 weights to
RUN_DIR/export_merged.
"""

from pathlib import Path

from covenant_jax.train.recipe import check_variant, from_file


def get_config(variant: str = ""):
    variant = check_variant(variant, "8k")
    cfg = from_file(Path(__file__).with_name("covenant72b_sft.py"), variant)
    cfg.model.lora.update(
        dict(enabled=True, rank=8, alpha=16.0, dropout=0.05, base_dtype="bfloat16", export_merged=True)
    )
    # 8 chips: weights and rows over fsdp (the bf16 base is all-gathered a layer at a time);
    # micro-batches keep the activations of 32 rows per chip to 8 at a time
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.context, cfg.mesh.tensor = 1, 8, 1, 1
    cfg.train.micro_batches = 4
    cfg.optim.lr = 2e-4
    cfg.train.run_dir = "runs/covenant72b_lora_sft" + (f"_{variant}" if variant else "")
    return cfg
