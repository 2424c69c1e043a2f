"""The embedded default job: a tiny random Llama through the whole conversion chain.

HF folder (transformers) -> JAX params on the device mesh -> parity check against transformers
-> HF folder again, bit-identical. Runs in under a minute on a laptop CPU, no downloads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

TINY_CONFIG = dict(
    vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
    rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)


def _make_hf_model(folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_CONFIG))
    model.save_pretrained(folder)


def _same_weights(a: Path, b: Path) -> bool:
    from covenant_jax.convert.hf_files import open_weights

    src, dst = open_weights(a), open_weights(b)
    return sorted(src.keys()) == sorted(dst.keys()) and all(
        np.array_equal(np.asarray(src.tensor(k)), np.asarray(dst.tensor(k))) for k in src.keys()
    )


def run_demo(workdir: Path) -> int:
    from covenant_jax.convert.api import hf_to_jax, jax_to_hf
    from covenant_jax.convert.verify import verify

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    hf_dir, ckpt_dir, out_dir = workdir / "hf", workdir / "jax", workdir / "hf_export"
    print(f"[1/4] tiny random Llama (GQA 8/2 heads, 4 layers) -> {hf_dir}")
    _make_hf_model(hf_dir)
    print(f"[2/4] convert hf-to-jax -> {ckpt_dir}")
    hf_to_jax(hf_dir, ckpt_dir)
    print("[3/4] verify: transformers (PyTorch) vs covenant_jax logits, float32")
    parity = verify(hf_dir, ckpt_dir)
    print("      " + parity.report())
    print(f"[4/4] convert jax-to-hf -> {out_dir}")
    jax_to_hf(ckpt_dir, out_dir)
    identical = _same_weights(hf_dir, out_dir)
    print(f"      round trip bit-identical: {identical}")
    return 0 if parity.ok and identical else 1
