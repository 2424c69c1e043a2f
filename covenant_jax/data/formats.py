"""Row formats -> one normal form: a list of `{"role", "content"}` messages, a `Completion`
(prompt + completion text, no chat template), or raw text.

Why one normal form: templates, loss masks and validation then exist once, whatever the file
looked like. Formats (`format:` in a source's config) and their logical field names (override
any of them with `fields: {logical: column}`):

  messages           messages, role, content, system  OpenAI `messages: [{role, content}]`
  sharegpt           messages=conversations, role=from, content=value, system; roles
                     human/gpt/system
  instruct           system, instruction, input, output (system and input optional)
  prompt_completion  prompt, completion, system (system optional)
  completion         text                             axolotl `type: completion`: every token
                                                      trained, the tokenizer's own BOS
  text               text                             raw documents: BOS + text + EOS, all trained
  dpo                prompt, chosen, rejected, system, preference pairs (TRL's rows): strings, or
                     role, content                    `prompt` a list of messages and `chosen` /
                                                      `rejected` lists of the final assistant
                                                      message(s) (`role` / `content`: the
                                                      message keys); a `Pair`

`role_map` (messages/sharegpt) maps the data's role values onto system/user/assistant; it is
merged over the format's defaults. A conversation without a system message takes the row's
`system` field (when it is a non-empty string) as one, as axolotl's chat_template does.
`instruct` rows are built by axolotl's custom-format rule (`PromptFormat`: `format`,
`no_input_format`, `system_format`, `system_prompt`); with a chat template the result is a
system + user + assistant conversation, without one (template "none") a `Completion`, tokenised
as axolotl does. Invalid rows raise `InvalidRow(reason)`; the pipeline counts them by reason
instead of training on them.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Iterable, Mapping

from covenant_jax.errors import UserError

ROLES = ("system", "user", "assistant")
# "alternate": an optional system message, then user and assistant turns taking turns, the
# first a user turn; "any": whatever order the template renders.
ROLE_ORDERS = ("alternate", "any")

# Every reason a row can be skipped for (the report counts them in this order).
SKIP_REASONS = (
    "invalid_json",
    "invalid_csv",
    "non_utf8",
    "missing_field",
    "not_a_list",
    "non_string_content",
    "unknown_role",
    "misplaced_system",
    "role_order",
    "empty_conversation",
    "empty_content",
    "no_assistant",
    "same_answers",
    "template_error",
    "template_mismatch",
    "overlength_dropped",
    "no_trained_tokens",
)

_DEFAULT_FIELDS = {
    "messages": {"messages": "messages", "role": "role", "content": "content", "system": "system"},
    "sharegpt": {
        "messages": "conversations",
        "role": "from",
        "content": "value",
        "system": "system",
    },  # fmt: skip
    "instruct": {
        "system": "system",
        "instruction": "instruction",
        "input": "input",
        "output": "output",
    },
    "prompt_completion": {"prompt": "prompt", "completion": "completion", "system": "system"},
    "completion": {"text": "text"},
    "text": {"text": "text"},
    "dpo": {
        "prompt": "prompt",
        "chosen": "chosen",
        "rejected": "rejected",
        "system": "system",
        "role": "role",
        "content": "content",
    },
}
_OPTIONAL = {"system", "input"}  # Logical fields a row may lack.
_DEFAULT_ROLE_MAP = {
    "messages": {r: r for r in ROLES},
    "sharegpt": {
        "human": "user",
        "gpt": "assistant",
        "system": "system",
        "user": "user",
        "assistant": "assistant",
    },
    "dpo": {r: r for r in ROLES},
}
FORMATS = tuple(_DEFAULT_FIELDS)
CHAT_FORMATS = ("messages", "sharegpt", "prompt_completion")  # Need a chat template.
PLAIN_FORMATS = ("completion", "text")  # Never use one.
PAIR_FORMATS = ("dpo",)  # Preference pairs: the DPO objective's data.
# `instruct` and `dpo` use the chat template unless it is "none".


class InvalidRow(Exception):
    """A row that cannot be trained on; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # Pickles (worker processes return these) with both arguments.
        return InvalidRow, (self.reason, self.detail)


@dataclasses.dataclass(frozen=True)
class Pair:
    """A preference pair: a prompt and two answers to it, messages (rendered by the chat
    template) or, without a template, text (tokenised as a `Completion` each)."""

    prompt: list[dict[str, str]] | str
    chosen: list[dict[str, str]] | str
    rejected: list[dict[str, str]] | str


@dataclasses.dataclass(frozen=True)
class Completion:
    """A prompt (not trained) and its completion (trained), tokenised as axolotl's instruct
    strategies do: each part on its own with the tokenizer's special tokens, the completion's
    BOS dropped when a prompt precedes it, and EOS appended (templates.encode_completions)."""

    prompt: str
    completion: str


# axolotl's UserDefinedDatasetConfig formats these with str.format and exactly these names
# (alpaca_w_system.SystemDataPrompter.build_prompt_w_system); any other name is a KeyError there.
_PLACEHOLDERS = {
    "format": ("instruction", "input"),
    "no_input_format": ("instruction",),
    "system_format": ("system",),
}


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """axolotl's custom instruct format (`type: {format, no_input_format, ...}`, the G.O.D
    instruct task's strings): prompt = system_format(system) if the system text is non-empty,
    then format(instruction, input) if the input is non-empty, else no_input_format(instruction).
    The system text is the row's system field when the row has one, else `system_prompt`.

    Defaults are covenant_jax's (G.O.D writes its own; axolotl's are "{instruction} {input} ")."""

    format: str = "{instruction}\n\n{input}"
    no_input_format: str = "{instruction}"
    system_format: str = "{system}"
    system_prompt: str = ""

    @classmethod
    def create(cls, spec: Mapping[str, Any] | None) -> PromptFormat:
        """From a source's `prompt_format` dict; a None value keeps the default (as G.O.D
        leaves unset strings out of axolotl's config)."""
        spec = {k: v for k, v in dict(spec or {}).items() if v is not None}
        known = {f.name for f in dataclasses.fields(cls)}
        if set(spec) - known:
            raise UserError(
                f"prompt_format has no key(s) {sorted(set(spec) - known)}; known: {sorted(known)}"
            )
        for key, value in spec.items():
            if not isinstance(value, str):
                raise UserError(f"prompt_format.{key} must be a string, got {value!r}")
            if key in _PLACEHOLDERS:
                _check_placeholders(key, value, _PLACEHOLDERS[key])
        return cls(**spec)

    def system(self, system: str) -> str:
        return self.system_format.format(system=system) if system and self.system_format else ""

    def turn(self, instruction: str, input: str) -> str:  # pylint: disable=redefined-builtin
        if input:
            return self.format.format(instruction=instruction, input=input)
        return self.no_input_format.format(instruction=instruction)


def _check_placeholders(key: str, value: str, allowed: tuple[str, ...]) -> None:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
    except ValueError as e:  # An unmatched brace.
        raise UserError(f"prompt_format.{key}={value!r}: {e} (write a literal brace as {{{{)")
    for name in names:
        if name not in allowed:
            raise UserError(
                f"prompt_format.{key}={value!r}: placeholder {{{name}}} is not one of "
                f"{', '.join('{' + a + '}' for a in allowed)}"
            )


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """How to read one source's rows. Build with `RowFormat.create`."""

    format: str
    fields: Mapping[str, str]
    role_map: Mapping[str, str]
    explicit: frozenset[str]  # Logical fields the user named (they must exist in the data).
    prompt_format: PromptFormat = PromptFormat()
    chat: bool = True  # instruct rows become conversations (else Completions).
    role_order: str = "alternate"

    @classmethod
    def create(
        cls,
        format: str,  # pylint: disable=redefined-builtin
        fields: Mapping[str, str] | None = None,
        role_map: Mapping[str, str] | None = None,
        *,
        prompt_format: Mapping[str, Any] | None = None,
        chat: bool = True,
        role_order: str = "alternate",
    ) -> RowFormat:
        """`chat=False`: the source has no chat template (template "none"), which only
        `instruct` (and the formats that never use one) can do without."""
        if format not in _DEFAULT_FIELDS:
            raise UserError(f"Unknown data format {format!r}; expected one of {FORMATS}")
        fields = dict(fields or {})
        unknown = set(fields) - set(_DEFAULT_FIELDS[format])
        if unknown:
            raise UserError(
                f"Format {format!r} has no field(s) {sorted(unknown)}; "
                f"its fields are {sorted(_DEFAULT_FIELDS[format])}"
            )
        roles = dict(_DEFAULT_ROLE_MAP.get(format, {}), **(role_map or {}))
        bad = {v for v in roles.values() if v not in ROLES}
        if bad:
            raise UserError(f"role_map targets {sorted(bad)} are not among {ROLES}")
        if prompt_format and format != "instruct":
            raise UserError(f"prompt_format is for format 'instruct', not {format!r}")
        if not chat and format in CHAT_FORMATS:
            raise UserError(f"format {format!r} needs a chat template (template 'none' is for 'instruct')")
        if role_order not in ROLE_ORDERS:
            raise UserError(f"role_order={role_order!r}; expected one of {ROLE_ORDERS}")
        return cls(
            format, {**_DEFAULT_FIELDS[format], **fields}, roles, frozenset(fields),
            PromptFormat.create(prompt_format), chat, role_order,
        )  # fmt: skip

    def to_example(self, row: Any) -> list[dict[str, str]] | Completion | str:
        """The row as messages (chat formats), a Completion or a string (`text`); raises
        InvalidRow."""
        if not isinstance(row, Mapping):
            raise InvalidRow("invalid_json", f"row is a {type(row).__name__}, not an object")
        if self.format in ("messages", "sharegpt"):
            return self._conversation(row)
        if self.format == "instruct":
            return self._instruct(row)
        if self.format == "prompt_completion":
            return self._turns(row, "prompt", "completion")
        if self.format == "dpo":
            return self._pair(row)
        text = _text(row, self.fields["text"], required=True)
        return Completion("", text) if self.format == "completion" else text

    def check_columns(self, rows: Iterable[Any], where: str) -> None:
        """Raises if a required (or user-named) field occurs in no row at all: a typo in the
        config, not bad data, so it must not silently skip every row."""
        rows = [r for r in rows if isinstance(r, Mapping)]
        seen = set().union(*(r.keys() for r in rows)) if rows else set()
        for logical, column in self.fields.items():
            if logical in ("role", "content"):
                continue
            if (logical not in _OPTIONAL or logical in self.explicit) and column not in seen:
                raise UserError(
                    f"{where}: field {column!r} ({self.format} `{logical}`) does not "
                    f"exist in any row; columns present: {sorted(seen)}"
                )
        if self.format in ("messages", "sharegpt", "dpo"):
            self._check_message_keys(rows, where)

    def _check_message_keys(self, rows: list[Mapping], where: str) -> None:
        keys = set()
        lists = ("prompt", "chosen", "rejected") if self.format == "dpo" else ("messages",)
        for r in rows:
            for logical in lists:
                msgs = r.get(self.fields[logical])
                if isinstance(msgs, list):
                    keys.update(k for m in msgs if isinstance(m, Mapping) for k in m)
        for logical in ("role", "content"):
            if keys and self.fields[logical] not in keys:
                raise UserError(
                    f"{where}: message field {self.fields[logical]!r} ({self.format} "
                    f"`{logical}`) does not exist in any message; keys: {sorted(keys)}"
                )

    def _conversation(self, row: Mapping) -> list[dict[str, str]]:
        msgs = row.get(self.fields["messages"])
        if msgs is None:
            raise InvalidRow("missing_field", self.fields["messages"])
        if not isinstance(msgs, list):
            raise InvalidRow("not_a_list", self.fields["messages"])
        out = []
        for m in msgs:
            if not isinstance(m, Mapping):
                raise InvalidRow("not_a_list", "message is not an object")
            role = m.get(self.fields["role"])
            if role is None:
                raise InvalidRow("missing_field", self.fields["role"])
            if not isinstance(role, str) or role not in self.role_map:
                raise InvalidRow("unknown_role", repr(role))
            out.append(
                {
                    "role": self.role_map[role],
                    "content": _as_text(m.get(self.fields["content"]), self.fields["content"]),
                }
            )
        system = _text(row, self.fields["system"], required=False)
        if system and not (out and out[0]["role"] == "system"):
            out.insert(0, {"role": "system", "content": system})
        return validate_messages(out, self.role_order)

    def _pair(self, row: Mapping) -> Pair:
        """TRL's preference rows: strings, or a prompt conversation and answer message lists
        (an answer string is one assistant message). The row's `system` field becomes the
        prompt's system message when it has none. Without a chat template, strings only."""
        f = self.fields
        if not self.chat:
            texts = [self._pair_text(row, f[k]) for k in ("prompt", "chosen", "rejected")]
            if texts[1] == texts[2]:
                raise InvalidRow("same_answers", f"{f['chosen']} equals {f['rejected']}")
            return Pair(*texts)
        turns = self._messages(row.get(f["prompt"]), f["prompt"], "user")
        system = _text(row, f["system"], required=False)
        if system.strip() and not (turns and turns[0]["role"] == "system"):
            turns.insert(0, {"role": "system", "content": system})
        answers = []
        for key in ("chosen", "rejected"):
            answer = self._messages(row.get(f[key]), f[key], "assistant")
            wrong = [m["role"] for m in answer if m["role"] != "assistant"]
            if not answer or wrong:
                raise InvalidRow(
                    "empty_content" if not answer else "role_order",
                    f"{f[key]} has no message"
                    if not answer
                    else f"{f[key]} holds a {wrong[0]} message, not only assistant ones",
                )
            whole = validate_messages(turns + answer, self.role_order)
            answers.append(answer)
        if answers[0] == answers[1]:
            raise InvalidRow("same_answers", f"{f['chosen']} equals {f['rejected']}")
        return Pair(whole[: len(whole) - len(answers[1])], *answers)

    def _pair_text(self, row: Mapping, field: str) -> str:
        if isinstance(row.get(field), list):
            raise InvalidRow(
                "template_error", f"{field}: conversational pairs need a chat template (template is 'none')"
            )
        return _text(row, field, required=True)

    def _messages(self, value: Any, field: str, role: str) -> list[dict[str, str]]:
        """A string as one message of `role`; a list of messages as the normal form."""
        if value is None:
            raise InvalidRow("missing_field", field)
        if isinstance(value, (str, bytes)):
            text = _as_text(value, field)
            if not text.strip():
                raise InvalidRow("empty_content", field)
            return [{"role": role, "content": text}]
        if not isinstance(value, list):
            raise InvalidRow("not_a_list", field)
        out = []
        for m in value:
            if not isinstance(m, Mapping):
                raise InvalidRow("not_a_list", f"{field}: message is not an object")
            name = m.get(self.fields["role"])
            if name is None:
                raise InvalidRow("missing_field", f"{field}: {self.fields['role']}")
            if not isinstance(name, str) or name not in self.role_map:
                raise InvalidRow("unknown_role", repr(name))
            out.append(
                {
                    "role": self.role_map[name],
                    "content": _as_text(m.get(self.fields["content"]), self.fields["content"]),
                }
            )
        return out

    def _instruct(self, row: Mapping) -> list[dict[str, str]] | Completion:
        """axolotl's user_defined rule (see PromptFormat)."""
        f, pf = self.fields, self.prompt_format
        instruction = _as_text(row.get(f["instruction"]), f["instruction"])
        extra = _text(row, f["input"], required=False)
        system = _text(row, f["system"], required=False) if f["system"] in row else pf.system_prompt
        output = _text(row, f["output"], required=True)
        if not self.chat:
            return Completion(pf.system(system) + pf.turn(instruction, extra), output)
        msgs = [{"role": "user", "content": pf.turn(instruction, extra)}]
        if pf.system(system):
            msgs.insert(0, {"role": "system", "content": pf.system(system)})
        return validate_messages(msgs + [{"role": "assistant", "content": output}])

    def _turns(self, row: Mapping, user_key: str, assistant_key: str) -> list[dict[str, str]]:
        f = self.fields
        msgs = [
            {"role": "user", "content": _as_text(row.get(f[user_key]), f[user_key])},
            {"role": "assistant", "content": _as_text(row.get(f[assistant_key]), f[assistant_key])},
        ]
        system = _text(row, f["system"], required=False)
        if system.strip():
            msgs.insert(0, {"role": "system", "content": system})
        return validate_messages(msgs)


def validate_messages(msgs: list[dict[str, str]], role_order: str = "alternate") -> list[dict[str, str]]:
    """Checks the normal form: known roles, system only first, no empty turns, an assistant,
    and (role_order "alternate") user and assistant taking turns, a user first.

    Empty system messages are dropped (common in exports and harmless)."""
    msgs = [m for m in msgs if not (m["role"] == "system" and not m["content"].strip())]
    if not msgs:
        raise InvalidRow("empty_conversation")
    for i, m in enumerate(msgs):
        if m["role"] not in ROLES:
            raise InvalidRow("unknown_role", repr(m["role"]))
        if m["role"] == "system" and i:
            raise InvalidRow("misplaced_system", f"system message at position {i}")
        if not m["content"].strip():
            raise InvalidRow("empty_content", f"{m['role']} message {i}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise InvalidRow("no_assistant")
    if role_order == "alternate":
        _check_alternation(msgs)
    return msgs


def _check_alternation(msgs: list[dict[str, str]]) -> None:
    turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(turns):
        if m["role"] != ("user", "assistant")[i % 2]:
            raise InvalidRow(
                "role_order", f"message {i + len(msgs) - len(turns)} is {m['role']} "
                f"(roles: {'/'.join(t['role'] for t in turns[: i + 1])})"
            )  # fmt: skip


def _text(row: Mapping, field: str, required: bool) -> str:
    value = row.get(field)
    if value is None and not required:
        return ""
    text = _as_text(value, field)
    if required and not text.strip():
        raise InvalidRow("empty_content", field)
    return text


def _as_text(value: Any, field: str) -> str:
    """The value as a str that encodes to UTF-8; bytes must decode as UTF-8."""
    if value is None:
        raise InvalidRow("missing_field", field)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRow("non_utf8", f"{field}: {e}") from e
    if not isinstance(value, str):
        raise InvalidRow("non_string_content", f"{field}: {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # Lone surrogates, e.g. from "\ud800" in JSON.
        raise InvalidRow("non_utf8", f"{field}: {e}") from e
    return value
