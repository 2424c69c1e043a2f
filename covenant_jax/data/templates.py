"""Chat templates and loss masks that need no `{% generation %}` tags.

Why character spans: most released templates (Llama 3, Gemma, ChatML variants) have no
generation tags, so transformers cannot return an assistant mask for them. Instead, for each
assistant message i we render the conversation prefix `messages[:i]` with the generation
prompt; the assistant content is the first occurrence of the content after that prefix in the
full rendering. Rendering `messages[:i+1]` shows what the template writes after the content:
its non-whitespace part is the end-of-turn marker (`<|im_end|>`, `<|eot_id|>`,
`<end_of_turn>`), which is trained too so the model learns to stop. The header
(`<|im_start|>assistant\n`) and the newline after the marker are not trained. Tokens come
from `return_offsets_mapping`, and a token is trained when its characters overlap a trained
span. This works for any Jinja template, named or the tokenizer's.

Named templates (for tokenizers without one): `chatml`, `llama3`, `gemma` (Gemma has no system
role; the system text is prepended to the first user turn, as Gemma's own template does).
"""

from __future__ import annotations

import warnings

import jinja2
import numpy as np

from covenant_jax.data.formats import InvalidRow
from covenant_jax.errors import UserError

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{{- message['content'] | trim -}}{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

GEMMA = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') -}}"
    "{{- message['content'] | trim -}}{{- '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

NAMED_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}
LOSS_ON = ("assistant", "all", "last_assistant")


class ChatTemplate:
    """Renders messages with a named template or the tokenizer's own (`name="tokenizer"`)."""

    def __init__(self, tokenizer, name: str = "tokenizer"):
        if name == "tokenizer":
            if not getattr(tokenizer, "chat_template", None):
                raise UserError(
                    "template='tokenizer' but the tokenizer has no chat_template; pick "
                    f"a named template: {sorted(NAMED_TEMPLATES)}"
                )
            self.source = tokenizer.chat_template
        elif name in NAMED_TEMPLATES:
            self.source = NAMED_TEMPLATES[name]
        else:
            raise UserError(
                f"Unknown chat template {name!r}; expected 'tokenizer' or one of "
                f"{sorted(NAMED_TEMPLATES)}"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("loss masks need character offsets: use a fast tokenizer")
        if name in END_OF_TURN and tokenizer.convert_tokens_to_ids(END_OF_TURN[name]) in (
            None, tokenizer.unk_token_id,
        ):  # fmt: skip
            warnings.warn(
                f"template {name!r}: {END_OF_TURN[name]} is not a token of this tokenizer; "
                "it will be split into pieces (all trained). Is this the right template?",
                stacklevel=2,
            )
        self.name = name
        self.tokenizer = tokenizer

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The template's text; a template that rejects the row (e.g. Gemma's "roles must
        alternate") raises InvalidRow("template_error")."""
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.source,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as e:
            raise InvalidRow("template_error", str(e)) from e

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and, per assistant message, the [start, end) character span of its
        content plus the end-of-turn marker that closes it. Raises InvalidRow if not found."""
        text = self.render(messages)
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True) if i else ""
            if text.startswith(prefix):
                cursor = max(cursor, len(prefix))
            start, end = _find_content(text, m["content"], cursor)
            turn = self.render(messages[: i + 1])
            _, turn_end = _find_content(turn, m["content"], min(cursor, len(turn)))
            marker = turn[turn_end:].rstrip()
            end += _common_prefix_len(marker, text[end:])
            spans.append((start, end))
            cursor = end
        return text, spans


def _find_content(text: str, content: str, start: int) -> tuple[int, int]:
    for needle in (content, content.strip()):
        i = text.find(needle, start)
        if i >= 0:
            return i, i + len(needle)
    raise InvalidRow("template_mismatch", "assistant content not found in the rendered text")


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_chat(
    template: ChatTemplate, messages: list[dict], loss_on: str = "assistant"
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [T] int32 and trained flags [T] bool for one conversation."""
    if loss_on not in LOSS_ON:
        raise UserError(f"loss_on={loss_on!r}; expected one of {LOSS_ON}")
    text, spans = template.assistant_spans(messages)
    if loss_on == "last_assistant":
        spans = spans[-1:]
    enc = template.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    if loss_on == "all":
        return ids, np.ones(len(ids), bool)
    return ids, tokens_in_spans(np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2), spans)


def tokens_in_spans(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Flags tokens whose [start, end) character range overlaps any span."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    trained = np.zeros(len(offsets), bool)
    for s, e in spans:
        trained |= (starts < e) & (ends > s) & (ends > starts)
    return trained


def encode_text(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw document: BOS + text + EOS (when the tokenizer has them), every token trained."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])
    return np.asarray(ids, np.int32), np.ones(len(ids), bool)
