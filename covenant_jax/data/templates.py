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

import re
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


# Texts per tokenizer batch call: the Rust tokenizer encodes a batch in parallel; bounded so the
# Encoding objects (ids, offsets, ...) of one batch stay small next to the int32 arrays kept.
TOKENIZE_BATCH = 64
# Raw text longer than this is cut (at places that cannot change its tokens) and the pieces are
# encoded as one batch: memory stays bounded and the pieces are encoded in parallel.
TEXT_CHUNK_CHARS = 1 << 15


def encode_chat(
    template: ChatTemplate, messages: list[dict], loss_on: str = "assistant"
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [T] int32 and trained flags [T] bool for one conversation."""
    (out,) = encode_chats(template, [messages], loss_on)
    if isinstance(out, InvalidRow):
        raise out
    return out


def encode_chats(
    template: ChatTemplate, conversations: list[list[dict]], loss_on: str = "assistant"
) -> list[tuple[np.ndarray, np.ndarray] | InvalidRow]:
    """`encode_chat` for many conversations, tokenised in batches with the fast tokenizer's
    batch API; a conversation the template rejects gives its InvalidRow in its place."""
    if loss_on not in LOSS_ON:
        raise UserError(f"loss_on={loss_on!r}; expected one of {LOSS_ON}")
    out: list = [None] * len(conversations)
    rendered = []  # (index, text, spans)
    for i, messages in enumerate(conversations):
        try:
            text, spans = template.assistant_spans(messages)
        except InvalidRow as e:
            out[i] = e
            continue
        rendered.append((i, text, spans[-1:] if loss_on == "last_assistant" else spans))
    encoded = _encode_batch(template.tokenizer, [t for _, t, _ in rendered], offsets=True)
    for (i, _, spans), (ids, offsets) in zip(rendered, encoded, strict=True):
        trained = np.ones(len(ids), bool) if loss_on == "all" else tokens_in_spans(offsets, spans)
        out[i] = (ids, trained)
    return out


def _encode_batch(tokenizer, texts: list[str], offsets: bool = False):
    """[(ids int32 [T], offsets int64 [T, 2] or None)] per text, without special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # `encode_batch_fast` (tokenizers >= 0.20) skips the offsets.
        fast = getattr(backend, "encode_batch_fast", None)
        encode = backend.encode_batch if offsets or fast is None else fast
    out = []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        batch = texts[start : start + TOKENIZE_BATCH]
        if backend is not None:
            encs = encode(batch, add_special_tokens=False)
            pairs = [(e.ids, e.offsets if offsets else None) for e in encs]
        else:  # Not a fast tokenizer: its own (per-text) encoding.
            encs = [
                tokenizer(t, add_special_tokens=False, return_offsets_mapping=offsets)
                for t in batch
            ]
            pairs = [(e["input_ids"], e["offset_mapping"] if offsets else None) for e in encs]
        for ids, offs in pairs:
            out.append((
                np.asarray(ids, np.int32),
                None if offs is None else np.asarray(offs, np.int64).reshape(-1, 2),
            ))  # fmt: skip
    return out


def tokens_in_spans(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Flags tokens whose [start, end) character range overlaps any span."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    trained = np.zeros(len(offsets), bool)
    for s, e in spans:
        trained |= (starts < e) & (ends > s) & (ends > starts)
    return trained


def encode_text(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw document: BOS + text + EOS (when the tokenizer has them), every token trained."""
    return encode_texts(tokenizer, [text])[0]


def encode_texts(
    tokenizer, texts: list[str], chunk_chars: int = TEXT_CHUNK_CHARS
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`encode_text` for many documents. Work is linear in the text length: a long document is
    cut into pieces of about `chunk_chars` characters at places where the tokenizer's
    pre-tokenizer has a boundary anyway (so the tokens are exactly those of the whole text),
    and all pieces are encoded in batches; tokenizers where that cannot be checked (one with a
    normalizer, or no pre-tokenizer) encode each document whole."""
    can_cut = _can_cut(tokenizer)
    pieces, owner = [], []
    for i, text in enumerate(texts):
        parts = _cut_text(tokenizer, text, chunk_chars) if can_cut else [text]
        pieces += parts
        owner += [i] * len(parts)
    per_doc: list[list[np.ndarray]] = [[] for _ in texts]
    for i, (ids, _) in zip(owner, _encode_batch(tokenizer, pieces), strict=True):
        per_doc[i].append(ids)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = np.asarray([bos] if bos is not None else [], np.int32)
    tail = np.asarray([eos] if eos is not None else [], np.int32)
    out = []
    for parts in per_doc:
        ids = np.concatenate([head, *parts, tail])
        out.append((ids, np.ones(len(ids), bool)))
    return out


def _can_cut(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or backend.pre_tokenizer is None:
        return False
    # An added (special) token spanning a space could be cut in two.
    return not any(" " in t for t in getattr(tokenizer, "added_tokens_encoder", {}))


_WINDOW = 64  # Characters of context either side when checking a cut.


def _cut_text(tokenizer, text: str, size: int) -> list[str]:
    """`text` cut before single spaces between non-space characters, about every `size`
    characters, at places the pre-tokenizer (run on a window around each) never spans."""
    if len(text) <= size:
        return [text]
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    parts, start = [], 0
    while len(text) - start > size:
        cut = _find_cut(pre, text, start + size // 2, start + size)
        if cut is None:
            break  # No safe place: the rest stays whole.
        parts.append(text[start:cut])
        start = cut
    parts.append(text[start:])
    return parts


def _find_cut(pre, text: str, lo: int, hi: int) -> int | None:
    """A safe cut in [lo, hi], searched backwards from hi; else the first one after hi."""
    i = text.rfind(" ", lo, hi + 1)
    while i >= lo:
        if _safe_cut(pre, text, i):
            return i
        i = text.rfind(" ", lo, i)
    for m in _CANDIDATE.finditer(text, hi):
        if _safe_cut(pre, text, m.start()):
            return m.start()
    return None


_CANDIDATE = re.compile(r"(?<=\S) (?=\S)")


def _safe_cut(pre, text: str, i: int) -> bool:
    if not (0 < i < len(text) - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()):
        return False
    lo = max(0, i - _WINDOW)
    window = text[lo : i + _WINDOW]
    cut = i - lo
    return all(e <= cut or s >= cut for _, (s, e) in pre.pre_tokenize_str(window))
