"""Passkey retrieval (Mohtashami & Jaggi 2023; the YaRN paper's passkey table).

A prompt of a target length in tokens: the task description, filler sentences with the needle
"The pass key is K. Remember it. K is the pass key." inserted after a fraction ``depth`` of the
filler, then "What is the pass key? The pass key is". Pieces are tokenised separately and the
ids concatenated, with filler cut at sentence boundaries, so the length lands within half a
filler sentence of the target and the needle within one sentence of the requested depth.

Scoring is teacher-forced greedy decoding: one forward pass over prompt + answer tokens, and a
sample is correct iff every answer token (the tokenisation of " K" after the prompt) is the
argmax at the position before it. That is exactly "greedy decoding of len(answer) tokens
reproduces the answer", at the cost of a single forward pass and without a KV cache.
``predicted`` holds the greedy tokens up to and including the first wrong one.

Axes: B prompts, T sequence, A answer tokens, D hidden.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from covenant_jax.eval.common import batches, encode, jit_model_fn, pad_rows
from covenant_jax.model.llama import Llama
from covenant_jax.errors import EvalInputError

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about the important information there."
)
FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"

# predict(tokens_BT, positions_BA) -> argmax next-token ids [B, A] at those positions
PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    tokens: tuple[int, ...]  # prompt followed by the answer
    prompt_length: int  # tokens before the answer
    answer: tuple[int, ...]
    key: str
    depth: float  # requested
    actual_depth: float  # filler tokens before the needle / all filler tokens
    needle_start: int  # token index where the needle begins
    needle_length: int


def _leading_special(tokenizer) -> list[int]:
    """Ids the tokenizer puts before any text by default (e.g. Llama's BOS), else []."""
    with_special = list(tokenizer("a")["input_ids"])
    plain = encode(tokenizer, "a")
    n = len(with_special) - len(plain)
    return with_special[:n] if n > 0 and with_special[n:] == plain else []


def _answer_ids(tokenizer, key: str) -> list[int]:
    """The ids that follow the question's ids when " key" is appended to it."""
    question = encode(tokenizer, " " + QUESTION)
    joined = encode(tokenizer, " " + QUESTION + " " + key)
    if joined[: len(question)] == question:
        return joined[len(question) :]
    return encode(tokenizer, " " + key)


def _nearest(boundaries: np.ndarray, value: float) -> int:
    return int(np.argmin(np.abs(boundaries - value)))


def build_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A passkey prompt of about ``length`` tokens (before the answer) with the needle at ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise EvalInputError(f"depth {depth} must be in [0, 1]")
    head = _leading_special(tokenizer) + encode(tokenizer, TASK)
    needle = encode(tokenizer, " " + NEEDLE.format(key=key))
    question = encode(tokenizer, " " + QUESTION)
    budget = length - len(head) - len(needle) - len(question)
    sentences = [encode(tokenizer, " " + s) for s in FILLER]
    per_cycle = sum(len(s) for s in sentences)
    if budget < 0 or per_cycle == 0:
        raise EvalInputError(
            f"passkey length {length} is too short: the fixed text alone is {length - budget} tokens"
        )
    stream = [s for _ in range(budget // per_cycle + 2) for s in sentences]
    ends = np.concatenate([[0], np.cumsum([len(s) for s in stream])])
    total = _nearest(ends, budget)  # filler sentences in the prompt
    split = _nearest(ends[: total + 1], depth * ends[total])  # sentences before the needle
    before = [t for s in stream[:split] for t in s]
    after = [t for s in stream[split:total] for t in s]
    prompt = head + before + needle + after + question
    answer = _answer_ids(tokenizer, key)
    return PasskeyPrompt(
        tokens=tuple(prompt + answer),
        prompt_length=len(prompt),
        answer=tuple(answer),
        key=key,
        depth=depth,
        actual_depth=len(before) / max(int(ends[total]), 1),
        needle_start=len(head) + len(before),
        needle_length=len(needle),
    )


def _argmax_at(model: Llama, tokens_BT, positions_BA):
    hidden_BTD = model.hidden_states(tokens_BT)
    hidden_BAD = jnp.take_along_axis(hidden_BTD, positions_BA[..., None], axis=1)
    return jnp.argmax(model.logits(hidden_BAD), axis=-1)


def model_predictor(model: Llama, mesh: Mesh | None = None) -> PredictFn:
    """Argmax next tokens at the given positions; logits only for those positions (jitted)."""
    forward = jit_model_fn(model, _argmax_at, mesh)
    return lambda tokens_BT, positions_BA: np.asarray(
        forward(jnp.asarray(tokens_BT), jnp.asarray(positions_BA))
    )


@dataclasses.dataclass(frozen=True)
class PasskeySample:
    length: int  # requested
    depth: float  # requested
    key: str
    correct: bool
    answer: list[int]
    predicted: list[int]  # greedy tokens up to and including the first wrong one
    prompt_tokens: int
    actual_depth: float


@dataclasses.dataclass
class PasskeyResult:
    samples: list[PasskeySample]
    meta: dict = dataclasses.field(default_factory=dict)

    def lengths(self) -> list[int]:
        return sorted({s.length for s in self.samples})

    def depths(self) -> list[float]:
        return sorted({s.depth for s in self.samples})

    def accuracy(self, length: int | None = None, depth: float | None = None) -> float:
        picked = [
            s.correct
            for s in self.samples
            if (length is None or s.length == length) and (depth is None or s.depth == depth)
        ]
        return float(np.mean(picked)) if picked else float("nan")

    def table(self) -> str:
        """Accuracy per length (rows) and depth (columns), then over all depths."""
        depths = self.depths()
        lines = [f"{'length':>7} " + " ".join(f"{'d=' + format(d, 'g'):>7}" for d in depths) + f" {'all':>7}"]
        for length in self.lengths():
            cells = " ".join(f"{self.accuracy(length, d):>7.2f}" for d in depths)
            lines.append(f"{length:>7} {cells} {self.accuracy(length):>7.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "meta": self.meta,
            "accuracy": {
                str(n): {
                    "all": self.accuracy(n),
                    **{format(d, "g"): self.accuracy(n, d) for d in self.depths()},
                }
                for n in self.lengths()
            },
            "samples": [dataclasses.asdict(s) for s in self.samples],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "PasskeyResult":
        return cls([PasskeySample(**s) for s in d["samples"]], dict(d.get("meta", {})))


def random_keys(rng: np.random.Generator, count: int, digits: int = 5) -> list[str]:
    return [str(k) for k in rng.integers(10 ** (digits - 1), 10**digits, count)]


def score_prompts(
    predict: PredictFn, prompts: Sequence[PasskeyPrompt], batch_size: int
) -> list[tuple[bool, list[int]]]:
    """(correct, greedy tokens up to the first error) per prompt; one padded shape for all batches."""
    width = max(len(p.tokens) for p in prompts)
    answer_width = max(len(p.answer) for p in prompts)
    results = []
    for batch in batches(prompts, batch_size):
        tokens_BT = np.zeros((len(batch), width), np.int32)
        positions_BA = np.zeros((len(batch), answer_width), np.int32)
        for b, p in enumerate(batch):
            tokens_BT[b, : len(p.tokens)] = p.tokens
            positions_BA[b, : len(p.answer)] = np.arange(p.prompt_length - 1, len(p.tokens) - 1)
        predicted_BA = predict(pad_rows(tokens_BT, batch_size, 0), pad_rows(positions_BA, batch_size, 0))
        for b, p in enumerate(batch):
            guess = [int(t) for t in predicted_BA[b, : len(p.answer)]]
            wrong = [i for i, (g, a) in enumerate(zip(guess, p.answer)) if g != a]
            results.append((not wrong, guess[: wrong[0] + 1] if wrong else guess))
    return results


def passkey_eval(
    model_or_predict: Llama | PredictFn,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.0, 0.5, 1.0),
    *,
    keys_per_cell: int = 2,
    digits: int = 5,
    seed: int = 0,
    batch_size: int = 1,
    mesh: Mesh | None = None,
) -> PasskeyResult:
    """Accuracy over ``lengths`` x ``depths`` with ``keys_per_cell`` seeded random keys each."""
    for name, value in (("keys_per_cell", keys_per_cell), ("digits", digits), ("batch_size", batch_size)):
        if value < 1:
            raise EvalInputError(f"{name}={value} must be >= 1")
    if not lengths or not depths:
        raise EvalInputError(
            f"passkey needs at least one length and one depth (got {list(lengths)}, {list(depths)})"
        )
    predict = (
        model_predictor(model_or_predict, mesh) if isinstance(model_or_predict, Llama) else model_or_predict
    )
    rng = np.random.default_rng(seed)
    samples = []
    for length in lengths:  # one padded width (one compile) per length
        cells = [(depth, key) for depth in depths for key in random_keys(rng, keys_per_cell, digits)]
        prompts = [build_prompt(tokenizer, length, depth, key) for depth, key in cells]
        for p, (correct, guess) in zip(prompts, score_prompts(predict, prompts, batch_size)):
            samples.append(
                PasskeySample(
                    length=length,
                    depth=p.depth,
                    key=p.key,
                    correct=correct,
                    answer=list(p.answer),
                    predicted=guess,
                    prompt_tokens=p.prompt_length,
                    actual_depth=p.actual_depth,
                )
            )
    meta = {
        "keys_per_cell": keys_per_cell,
        "digits": digits,
        "seed": seed,
        "scoring": "teacher-forced greedy",
    }
    if isinstance(model_or_predict, Llama):
        meta.update(
            rope=dataclasses.asdict(model_or_predict.config.rope),
            max_position_embeddings=model_or_predict.config.max_position_embeddings,
        )
    return PasskeyResult(samples, meta)
