"""A tiny random Llama and a word-level tokenizer that covers the passkey prompt."""

from __future__ import annotations

import re

from flax import nnx

from covenant_jax.config import ModelConfig
from covenant_jax.eval import passkey
from covenant_jax.model.llama import Llama, ModelOptions

EXTRA_WORDS = "a the of and to in is was it for on news fire people city said".split()


def tiny_tokenizer():
    """WordLevel over the passkey text's words, single digits and punctuation; BOS added."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    text = " ".join([passkey.TASK, *passkey.FILLER, passkey.NEEDLE, passkey.QUESTION])
    words = sorted(set(re.findall(r"[A-Za-z]+|[^\w\s]", text)) | set(EXTRA_WORDS))
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", *list("0123456789"), *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")


def tiny_config(vocab_size: int = 128, **overrides) -> ModelConfig:
    hf = dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.5,  # large weights: confident, position-dependent predictions
    )
    return ModelConfig.from_hf_dict({**hf, **overrides})


def tiny_model(vocab_size: int = 128, seed: int = 0, cfg: ModelConfig | None = None) -> Llama:
    return Llama(cfg or tiny_config(vocab_size), ModelOptions(), rngs=nnx.Rngs(seed))
