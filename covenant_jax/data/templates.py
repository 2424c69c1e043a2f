"""Chat templates and loss masks that need no `{% generation %}` tags.

Why sentinels: most released templates (Llama 3, Gemma, ChatML variants) have no generation
tags, so transformers cannot return an assistant mask for them. Instead the template renders
the conversation's *layout* once per sequence of roles: every message's content replaced by a
sentinel (a private-use character pair around its index). The text between sentinels is the
template's own (headers, markers, BOS, a default system prompt), and the real rendering must be
exactly that text with each message's content, or its `trim`-med form, in the sentinel's place:
each content span is found where the template wrote it, never by searching for the content,
so repeated or trimmed content cannot land on a later occurrence. A rendering that does not
fit its layout (a template that rewrites content) is skipped as `template_mismatch`.

The end-of-turn marker of message k (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, Phi-3's
`<|end|>`) is what the template writes after its content both when another turn follows and
when the conversation ends there (the tokens both share, trailing whitespace dropped): a token
the template adds only after the whole conversation (Phi-3's EOS) or the next turn's header is
never part of it. Which turns and markers are trained follows axolotl's names:
`roles_to_train` (default ["assistant"]) and `train_on_eos` ("turn": the marker after each
trained turn, "all": after every turn, "last": after the last trained turn, "none"). Tokens
come from the fast tokenizer's offsets; a token is trained when its characters overlap a
trained span (as transformers' `return_assistant_tokens_mask`).

Layouts are cached by role sequence, so a conversation costs one real rendering; a cached
layout that stops fitting (a template that prints today's date) is rebuilt once before the row
is skipped.

Named templates (for tokenizers without one): `chatml`, `llama3`, `gemma` (Gemma has no system
role; the system text is prepended to the first user turn, as Gemma's own template does). Any
string holding Jinja (`{{` or `{%`) is used as the template itself.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import warnings
from typing import Callable

import jinja2
import numpy as np

from covenant_jax.data.formats import ROLES, Completion, InvalidRow
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
NO_TEMPLATE = "none"  # A source's `template` for instruct rows formatted without one.
LOSS_ON = ("assistant", "all", "last_assistant")
TRAIN_ON_EOS = ("turn", "all", "last", "none")

_SENTINEL = "\ue000{}\ue001"
_SENTINEL_SPLIT = re.compile("\ue000(\\d+)\ue001")
_LAYOUT_CACHE = 1 << 14  # Role sequences kept (ShareGPT: a few hundred distinct ones).
_MATCH_STEPS = 10_000  # Backtracking bound when several trim variants fit (adjacent contents).


def is_jinja(name: str) -> bool:
    return "{{" in name or "{%" in name


@dataclasses.dataclass(frozen=True)
class MaskRule:
    """Which tokens of a conversation are trained. `loss_on`: "assistant" (the turns of
    `roles_to_train`), "last_assistant" (the last of them) or "all" (every token)."""

    loss_on: str = "assistant"
    roles_to_train: tuple[str, ...] = ("assistant",)
    train_on_eos: str = "turn"

    @classmethod
    def create(cls, loss_on="assistant", roles_to_train=("assistant",), train_on_eos="turn"):
        if loss_on not in LOSS_ON:
            raise UserError(f"loss_on={loss_on!r}; expected one of {LOSS_ON}")
        if train_on_eos not in TRAIN_ON_EOS:
            raise UserError(f"train_on_eos={train_on_eos!r}; expected one of {TRAIN_ON_EOS}")
        roles = (roles_to_train,) if isinstance(roles_to_train, str) else tuple(roles_to_train)
        if not roles or set(roles) - set(ROLES):
            raise UserError(f"roles_to_train={list(roles)!r}: expected some of {list(ROLES)}")
        return cls(loss_on, roles, train_on_eos)


@dataclasses.dataclass
class _Layout:
    """A rendering of one role sequence with sentinel contents: `literals[j]` is the template's
    text before slot j (the last one after the last slot); slot j holds message `slots[j]`."""

    literals: list[str]
    slots: list[int]
    markers: dict = dataclasses.field(default_factory=dict)  # message -> end-of-turn marker

    def __post_init__(self):
        counts = collections.Counter(self.slots)
        self._slot = {k: j for j, k in enumerate(self.slots) if counts[k] == 1}

    def slot_of(self, k: int) -> int | None:
        """The one slot of message k; None when the template wrote it never or twice."""
        return self._slot.get(k)

    def after(self, k: int) -> str | None:
        j = self.slot_of(k)
        return None if j is None else self.literals[j + 1]


class ChatTemplate:
    """Renders messages with a named template, the tokenizer's own (`name="tokenizer"`) or the
    Jinja source given as `name`."""

    def __init__(self, tokenizer, name: str = "tokenizer"):
        if name == "tokenizer":
            if not getattr(tokenizer, "chat_template", None):
                raise UserError(
                    "template='tokenizer' but the tokenizer has no chat_template; pick "
                    f"a named template: {sorted(NAMED_TEMPLATES)}, or give a Jinja template"
                )
            self.source = tokenizer.chat_template
        elif name in NAMED_TEMPLATES:
            self.source = NAMED_TEMPLATES[name]
        elif is_jinja(name):
            self.source, name = name, "custom"
        else:
            raise UserError(
                f"Unknown chat template {name!r}; expected 'tokenizer', one of "
                f"{sorted(NAMED_TEMPLATES)}, or a Jinja template"
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
        self._layouts: dict[tuple[str, ...], _Layout | InvalidRow] = {}
        self._check_syntax()

    def _check_syntax(self) -> None:
        try:
            self.render([{"role": "user", "content": "hi"}])
        except InvalidRow as e:
            if isinstance(e.__cause__, jinja2.TemplateSyntaxError):
                raise UserError(f"chat template {self.name!r}: {e.__cause__}") from None

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

    def trained_spans(
        self, messages: list[dict], rule: MaskRule = MaskRule(), answer_from: int | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the [start, end) character spans to train: the content of
        each trained turn and the end-of-turn markers `rule.train_on_eos` asks for. With
        `answer_from` (a preference pair's answer), the trained turns are messages
        answer_from... whatever their role, and "all" markers means theirs. Raises InvalidRow
        when the template rejects the row or its rendering does not fit the layout."""
        text = self.render(messages)
        roles = tuple(m["role"] for m in messages)
        contents = [m["content"] for m in messages]
        fresh = roles not in self._layouts
        layout = self._layout(roles)
        located = _locate(text, layout.literals, [contents[k] for k in layout.slots])
        if located is None and not fresh:  # The template's text changed since it was cached.
            layout = self._layout(roles, refresh=True)
            located = _locate(text, layout.literals, [contents[k] for k in layout.slots])
        if located is None:
            raise InvalidRow("template_mismatch", "the rendering does not fit the template")
        return text, self._spans(text, roles, layout, located, rule, answer_from)

    def _spans(self, text, roles, layout, located, rule, answer_from=None) -> list[tuple[int, int]]:
        if answer_from is None:
            turns = [k for k, r in enumerate(roles) if r in rule.roles_to_train]
            if rule.loss_on == "last_assistant":
                turns = turns[-1:]
        else:
            turns = list(range(answer_from, len(roles)))
        every = range(len(roles)) if answer_from is None else turns
        eos = {"turn": turns, "last": turns[-1:], "none": [], "all": every}
        spans = []
        for k in turns:
            j = layout.slot_of(k)
            if j is None:
                raise InvalidRow("template_mismatch", f"message {k} is not written exactly once")
            spans.append(located[j])
        for k in eos[rule.train_on_eos]:
            j = layout.slot_of(k)
            marker = self._marker(layout, roles, k) if j is not None else ""
            if marker:  # A prefix of the literal that `_locate` found right after the content.
                spans.append((located[j][1], located[j][1] + len(marker)))
        return sorted(spans)

    def _layout(self, roles: tuple[str, ...], refresh: bool = False) -> _Layout:
        """The layout of this role sequence (cached); raises the template's InvalidRow."""
        if refresh:  # The template's text changed: every cached layout may be stale.
            self._layouts.clear()
        layout = self._layouts.get(roles)
        if layout is None:
            try:
                skeleton = self.render([
                    {"role": r, "content": _SENTINEL.format(k)} for k, r in enumerate(roles)
                ])  # fmt: skip
                parts = _SENTINEL_SPLIT.split(skeleton)
                layout = _Layout(parts[0::2], [int(k) for k in parts[1::2]])
            except InvalidRow as e:
                layout = e
            if len(self._layouts) >= _LAYOUT_CACHE:
                self._layouts.clear()
            self._layouts[roles] = layout
        if isinstance(layout, InvalidRow):
            raise layout
        return layout

    def _marker(self, layout: _Layout, roles: tuple[str, ...], k: int) -> str:
        """The end-of-turn marker of message k: the tokens the template writes after its
        content both when a turn follows and when the conversation ends with it, without
        trailing whitespace ("" if the template will not show both)."""
        if k not in layout.markers:
            here = layout.after(k)
            if k + 1 < len(roles):  # A turn follows here: the other case ends the chat at k.
                other = roles[: k + 1]
            else:  # The chat ends at k: the other case adds the turn that would come next.
                other = roles + ("assistant" if roles[k] == "user" else "user",)
            try:
                there = self._layout(other).after(k)
            except InvalidRow:
                there = None
            layout.markers[k] = "" if here is None or there is None else _common(here, there, self)
        return layout.markers[k]


def _common(here: str, there: str, template: ChatTemplate) -> str:
    """The text two renderings of what follows a turn share, as whole tokens, without trailing
    whitespace: "<|im_end|>\n" and "<|im_end|>\n<|im_start|>user\n" share "<|im_end|>" (all of
    the first, whatever the tokenizer makes of it); "<|end|>\n<|user|>\n" and "<|end|>\n<eos>"
    share "<|end|>", not the "<" that begins two different tokens."""
    if here.startswith(there) or there.startswith(here):
        return min(here, there, key=len).rstrip()
    enc = [
        template.tokenizer(t, add_special_tokens=False, return_offsets_mapping=True) for t in (here, there)
    ]
    ids_a, ids_b = enc[0]["input_ids"], enc[1]["input_ids"]
    n = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), len(ids_a))
    end = enc[0]["offset_mapping"][n][0] if n < len(ids_a) else len(here)
    return here[: min(end, len(os.path.commonprefix([here, there])))].rstrip()


def _variants(content: str) -> list[str]:
    """What a template may write for a content: itself or `trim`-med (Jinja's trim is
    str.strip), exact first."""
    return list(dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())))


def _locate(text: str, literals: list[str], contents: list[str]) -> list[tuple[int, int]] | None:
    """[start, end) of each slot's content in `text` = literals[0] + c0 + literals[1] + ... with
    each c a variant of its content; None when no choice fits. Positional: each variant must
    sit right after the literal before it and right before the literal after it."""
    if not text.startswith(literals[0]):
        return None
    n = len(contents)
    if n == 0:
        return [] if len(text) == len(literals[0]) else None
    variants = [_variants(c) for c in contents]
    starts, pick, j = [len(literals[0])] + [0] * n, [-1] * n, 0
    for _ in range(_MATCH_STEPS):
        if j == n:
            return [(starts[i], starts[i] + len(variants[i][pick[i]])) for i in range(n)]
        if j < 0:
            return None
        pick[j] += 1
        if pick[j] == len(variants[j]):
            pick[j], j = -1, j - 1
            continue
        v, lit = variants[j][pick[j]], literals[j + 1]
        end = starts[j] + len(v)
        if (
            text.startswith(v, starts[j])
            and text.startswith(lit, end)
            and (j + 1 < n or end + len(lit) == len(text))
        ):
            starts[j + 1], j = end + len(lit), j + 1
    return None


# Texts per tokenizer batch call: the Rust tokenizer encodes a batch in parallel; bounded so the
# Encoding objects (ids, offsets, ...) of one batch stay small next to the int32 arrays kept.
TOKENIZE_BATCH = 64
# Raw text longer than this is cut (at places that cannot change its tokens) and the pieces are
# encoded as one batch: memory stays bounded and the pieces are encoded in parallel.
TEXT_CHUNK_CHARS = 1 << 15


def encode_chat(
    template: ChatTemplate, messages: list[dict], loss_on: str = "assistant", **mask
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [T] int32 and trained flags [T] bool for one conversation."""
    (out,) = encode_chats(template, [messages], loss_on, **mask)
    if isinstance(out, InvalidRow):
        raise out
    return out


def encode_chats(
    template: ChatTemplate,
    conversations: list[list[dict]],
    loss_on: str = "assistant",
    *,
    roles_to_train=("assistant",),
    train_on_eos: str = "turn",
) -> list[tuple[np.ndarray, np.ndarray] | InvalidRow]:
    """`encode_chat` for many conversations, tokenised in batches with the fast tokenizer's
    batch API; a conversation the template rejects gives its InvalidRow in its place."""
    rule = MaskRule.create(loss_on, roles_to_train, train_on_eos)
    out: list = [None] * len(conversations)
    rendered = []  # (index, text, spans)
    for i, messages in enumerate(conversations):
        try:
            if rule.loss_on == "all":
                rendered.append((i, template.render(messages), None))
            else:
                rendered.append((i, *template.trained_spans(messages, rule)))
        except InvalidRow as e:
            out[i] = e
    spans = None if rule.loss_on == "all" else [s for _, _, s in rendered]
    encoded = _encode_batch(template.tokenizer, [t for _, t, _ in rendered], spans=spans)
    for (i, _, _), (ids, trained) in zip(rendered, encoded, strict=True):
        out[i] = (ids, np.ones(len(ids), bool) if trained is None else trained)
    return out


def encode_completions(
    tokenizer, items: list[Completion], loss_on: str = "assistant"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Prompt (untrained) + completion (trained) without a chat template, as axolotl's instruct
    and completion strategies tokenise (prompt_tokenizers.PromptTokenizingStrategy._tokenize):
    each part encoded on its own with the tokenizer's special tokens, EOS appended to the
    completion unless it ends with one, and the completion's BOS dropped after a prompt."""
    if loss_on not in LOSS_ON:
        raise UserError(f"loss_on={loss_on!r}; expected one of {LOSS_ON}")
    prompts = _encode_batch(tokenizer, [c.prompt for c in items], special_tokens=True)
    answers = _encode_batch(tokenizer, [c.completion for c in items], special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for item, (p_ids, _), (a_ids, _) in zip(items, prompts, answers, strict=True):
        p_ids = p_ids if item.prompt else p_ids[:0]  # axolotl encodes no empty text.
        if eos is not None and len(a_ids) and a_ids[-1] != eos:
            a_ids = np.append(a_ids, np.int32(eos))
        if item.prompt and bos is not None and len(a_ids) and a_ids[0] == bos:
            a_ids = a_ids[1:]
        trained = np.concatenate([np.full(len(p_ids), loss_on == "all"), np.ones(len(a_ids), bool)])
        out.append((np.concatenate([p_ids, a_ids]).astype(np.int32), trained))
    return out


def encode_examples(
    tokenizer, template: ChatTemplate | None, examples: list, loss_on: str = "assistant", **mask
) -> list[tuple[np.ndarray, np.ndarray] | InvalidRow]:
    """Encodes any mix of normal forms (formats.RowFormat.to_example): raw text, Completions
    and conversations (these need `template`), each kind in batches, results in input order."""
    kinds = {"text": [], "completion": [], "chat": []}
    for i, ex in enumerate(examples):
        if isinstance(ex, str):
            kinds["text"].append(i)
        else:
            kinds["completion" if isinstance(ex, Completion) else "chat"].append(i)
    out: list = [None] * len(examples)
    for kind, idx in kinds.items():
        if not idx:
            continue
        items = [examples[i] for i in idx]
        if kind == "text":
            encoded = encode_texts(tokenizer, items)
        elif kind == "completion":
            encoded = encode_completions(tokenizer, items, loss_on)
        else:
            if template is None:
                raise UserError("conversations need a chat template (template is 'none')")
            encoded = encode_chats(template, items, loss_on, **mask)
        for i, e in zip(idx, encoded, strict=True):
            out[i] = e
    return out


def _encode_batch(tokenizer, texts: list[str], special_tokens: bool = False, spans=None):
    """[(ids int32 [T], trained bool [T] or None)] per text; the tokenizer's special tokens
    (BOS, ...) only when asked. `spans`: per text, the character spans to train (None: every
    token); without it no offsets are computed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # `encode_batch_fast` (tokenizers >= 0.20) skips the offsets.
        fast = getattr(backend, "encode_batch_fast", None)
        encode = backend.encode_batch if spans is not None or fast is None else fast
    out = []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        batch = texts[start : start + TOKENIZE_BATCH]
        batch_spans = spans[start : start + TOKENIZE_BATCH] if spans else [None] * len(batch)
        if backend is not None:
            encs = encode(batch, add_special_tokens=special_tokens)
            for enc, sp in zip(encs, batch_spans, strict=True):
                ids = np.asarray(enc.ids, np.int32)
                out.append((ids, None if spans is None else _trained(enc, len(ids), sp)))
            continue
        for text, sp in zip(batch, batch_spans, strict=True):  # Not a fast tokenizer.
            enc = tokenizer(text, add_special_tokens=special_tokens, return_offsets_mapping=True)
            ids = np.asarray(enc["input_ids"], np.int32)
            offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
            out.append((ids, None if spans is None else _trained_offsets(offsets, sp)))
    return out


def _trained(enc, n: int, spans: list[tuple[int, int]] | None) -> np.ndarray:
    """Tokens of `enc` whose characters overlap a span (all when spans is None). Token offsets
    only grow, so each span's tokens are one range found by two binary searches: the Encoding's
    offsets are never copied into Python (that copy cost more than the mask)."""
    if spans is None:
        return np.ones(n, bool)
    chars = enc.token_to_chars
    trained = np.zeros(n, bool)
    for s, e in spans:
        first = _bisect(n, lambda i: chars(i)[1] > s)  # First token ending after s.
        stop = _bisect(n, lambda i: chars(i)[0] >= e)  # First token starting at e or later.
        trained[first:stop] = True
    return trained


def _bisect(n: int, after: Callable[[int], bool]) -> int:
    """The first i in [0, n) with after(i) (n if none); after must be monotonic."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if after(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _trained_offsets(offsets: np.ndarray, spans: list[tuple[int, int]] | None) -> np.ndarray:
    if spans is None:
        return np.ones(len(offsets), bool)
    return tokens_in_spans(offsets, spans)


def tokens_in_spans(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Flags tokens whose [start, end) character range overlaps any span."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    trained = np.zeros(len(offsets), bool)
    for s, e in spans:
        trained |= (starts < e) & (ends > s)
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
