"""A tiny SFT setup on disk: random Llama + word tokenizer + chat JSONL, and its recipe."""

from __future__ import annotations

import json
from pathlib import Path

from covenant_jax.train import recipe
from tests import helpers
from tests.data import common as data_common


def tiny_model_dir(root: Path, **overrides) -> Path:
    tokenizer = data_common.word_tokenizer()
    hf = helpers.hf_model(vocab_size=len(tokenizer), **overrides)
    folder = helpers.save_hf(hf, root / "model")
    tokenizer.save_pretrained(folder)
    return folder


def chat_jsonl(root: Path, rows: int = 64) -> Path:
    path = root / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps(data_common.chat_row(i)) + "\n")
    return path


def tiny_recipe(root: Path, model_dir: Path, data_path: Path, **train):
    cfg = recipe.default_config()
    cfg.model.path = str(model_dir)
    cfg.mesh.fsdp = 2
    cfg.mesh.tensor = 4
    cfg.data.sources = [dict(path=str(data_path), format="messages")]
    cfg.data.seq_len = 32
    cfg.data.batch_size = 4
    cfg.data.eval_count = 8
    cfg.optim.lr = 3e-3
    cfg.optim.warmup_steps = 2
    cfg.train.update(
        dict(
            steps=6,
            run_dir=str(root / "run"),
            log_every=1,
            eval_every=3,
            checkpoint_every=3,
            async_checkpoint=False,
            progress=False,
            loss_chunk_size=16,
            export=False,
        )
    )
    cfg.train.update(train)
    return cfg


def pair_row(i: int) -> dict:
    """A preference row of the word tokenizer's words; the rejected answer is tagged "B"."""
    return {
        "prompt": data_common.words(i, 2 + i % 3),
        "chosen": data_common.words(i + 1, 1 + i % 4),
        "rejected": data_common.words(i + 5, 1 + (i * 2) % 5, "B"),
    }


def pairs_jsonl(root: Path, rows: int = 48) -> Path:
    path = root / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps(pair_row(i)) + "\n")
    return path


def tiny_dpo_recipe(root: Path, model_dir: Path, data_path: Path, **train):
    """tiny_recipe on preference pairs with the DPO objective (in-step reference)."""
    cfg = tiny_recipe(root, model_dir, data_path, **train)
    cfg.train.objective = "dpo"
    cfg.data.sources = [dict(path=str(data_path), format="dpo")]
    cfg.data.seq_len = 56  # rows of 2 and 3 pairs: micro-batches that weigh differently
    cfg.dpo.beta = 0.5
    return cfg
