"""The tokenizer saved beside a model, local or remote, with a clear error when there is none."""

from __future__ import annotations

import os

from covenant_jax import storage
from covenant_jax.errors import TokenizerError
from covenant_jax.io import AUX_FILES

# Any of these lets transformers build a tokenizer (tokenizer.model needs sentencepiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer`` of a model folder (HF or converted, local or ``gs://``), which must hold
    its tokenizer files; remote files are copied to a local temporary folder first (transformers
    reads local folders only)."""
    import transformers

    folder = storage.path(path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(
            f"{folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy the model's "
            "tokenizer there (a converted checkpoint carries the one its HF folder had)"
        )
    with storage.local_folder(folder, AUX_FILES + ("config.json",)) as local:
        try:
            return transformers.AutoTokenizer.from_pretrained(os.fspath(local))
        except (OSError, ValueError) as e:
            raise TokenizerError(
                f"{folder}: transformers cannot load its tokenizer: {str(e).splitlines()[0]}"
            ) from e
