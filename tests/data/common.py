"""Tiny in-memory tokenizers and row builders for the data tests (no hub, no files)."""

from __future__ import annotations

import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = [
    "<pad>",
    "<unk>",
    "<bos>",
    "<eos>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
]
WORDS = (
    ["user", "assistant", "system", "model", "hello", "world", "be", "brief", "ok"]
    + [f"w{i}" for i in range(300)]
    + ["A", "B"]
)

# A Zephyr-like template standing in for "the tokenizer's own chat template".
ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Independent statement of what must be trained in each template's rendering: the assistant
# content and its end-of-turn marker (group 1), nothing of the header.
ASSISTANT_RE = {
    "chatml": r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)",
    "llama3": r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n(.*?<\|eot_id\|>)",
    "gemma": r"<start_of_turn>model\n(.*?<end_of_turn>)",
    "tokenizer": r"<\|assistant\|>\n(.*?<eos>)",
}
BOS = {"chatml": "<bos>", "llama3": "<|begin_of_text|>", "gemma": "<bos>", "tokenizer": "<bos>"}


def word_tokenizer(bos: str = "<bos>", chat_template: str | None = ZEPHYR):
    """WordLevel tokenizer: one token per word, every special token atomic."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    out.add_special_tokens({"additional_special_tokens": SPECIAL[4:]})
    out.chat_template = chat_template
    return out


def bpe_tokenizer(special: list[str] = SPECIAL, corpus: tuple[str, ...] = ()):
    """Byte-level BPE trained in memory: tokens merge across spaces, as real tokenizers do.
    Only `special` (and <bos> <eos> <pad> <unk>) are atomic tokens; `corpus` adds training
    text (to make merges happen)."""
    special = SPECIAL[:4] + [t for t in special if t not in SPECIAL[:4]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["hello world, how are you? fine thanks.", "the answer is forty two"] * 20 + [*corpus]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def expected_spans(template: str, text: str) -> list[tuple[int, int]]:
    return [m.span(1) for m in re.finditer(ASSISTANT_RE[template], text, re.S)]


def words(i: int, n: int, tag: str = "") -> str:
    """n distinct-ish words seeded by i, optionally led by a tag word (A/B) to tell sources."""
    body = [f"w{(i * 7 + k) % 300}" for k in range(n)]
    return " ".join(([tag] if tag else []) + body)


def chat_row(i: int, n_user: int = 3, n_asst: int = 4, tag: str = "") -> dict:
    return {
        "messages": [
            {"role": "user", "content": words(i, n_user)},
            {"role": "assistant", "content": words(i + 1, n_asst, tag)},
        ]
    }


def source_samples(cfg: dict, tokenizer) -> tuple[list[dict], list[dict], "object"]:
    """(train samples, eval samples, SourceReport) of the first source of a `data` config, as
    the pipeline prepares them (in memory)."""
    from covenant_jax.data import pipeline, prepare

    cfg = pipeline._with_defaults(cfg)
    worker = prepare.Worker.create(tokenizer, cfg["sources"], cfg)
    prepared = prepare.prepare_sources(
        cfg["sources"][:1], cfg, worker, cache_dir="", process_index=0, process_count=1
    )[0]
    split = pipeline.split_source(prepared, 0, cfg)
    return [prepared.samples[i] for i in split.train], [prepared.samples[i] for i in split.eval], split.report
