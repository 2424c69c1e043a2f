"""The tokenizer saved beside a model, with a clear error when there is none."""

from __future__ import annotations

from pathlib import Path

from covenant_jax.errors import UserError

# Any of these lets transformers build a tokenizer (tokenizer.model needs sentencepiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


class TokenizerError(UserError):
    """A model folder has no tokenizer files, or transformers cannot load them."""


def load_tokenizer(path: str | Path):
    """``AutoTokenizer`` of a model folder (HF or converted), which must hold its tokenizer files."""
    import transformers

    folder = Path(path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(
            f"{folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy the model's "
            "tokenizer there (a converted checkpoint carries the one its HF folder had)")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{folder}: transformers cannot load its tokenizer: {str(e).splitlines()[0]}") from e
