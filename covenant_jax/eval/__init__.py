"""Long-context evaluation: perplexity by context length (``perplexity``) and passkey retrieval
(``passkey``); ``common`` loads the model and tokenizer and can swap RoPE (e.g. YaRN) in place."""
