"""Tiny random HF checkpoints built in-process (no hub): the reference for parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from covenant_jax.parallel.sharding import make_mesh

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
)


def hf_model(seed: int = 0, architecture: str = "llama", dtype: str = "float32", **overrides):
    """A randomly initialised transformers model (norm scales randomised too, to catch swaps)."""
    import torch
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[architecture]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.copy_(
                    1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p)
                )
    return model.to(getattr(torch, dtype))


def save_hf(
    model, folder: Path, *, max_shard_size: str | None = None, torch_bin: bool = False, v4_rope: bool = False
) -> Path:
    """save_pretrained, optionally as a .bin state dict, or with config.json in v4 RoPE spelling."""
    import torch

    folder = Path(folder)
    if torch_bin:
        folder.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(folder, **kwargs)
    if v4_rope:
        to_v4_rope(folder / "config.json")
    return folder


def to_v4_rope(config_path: Path) -> None:
    cfg = json.loads(config_path.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    params.pop("type", None)
    cfg["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **params}
    config_path.write_text(json.dumps(cfg, indent=2))


def reference_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def one_device_mesh():
    return make_mesh(devices=jax.devices()[:1])


def random_tokens(vocab: int, batch: int = 2, length: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)
