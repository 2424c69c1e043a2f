"""Row formats -> one normal form: a list of `{"role", "content"}` messages, or raw text.

Why one normal form: templates, loss masks and validation then exist once, whatever the file
looked like. Formats (`format:` in a source's config) and their logical field names (override
any of them with `fields: {logical: column}`):

  messages           messages, role, content          OpenAI `messages: [{role, content}]`
  sharegpt           messages=conversations, role=from, content=value; roles human/gpt/system
  instruct           system, instruction, input, output (system and input optional)
  prompt_completion  prompt, completion, system (system optional)
  text               text                             raw documents: every token is trained

`role_map` (messages/sharegpt) maps the data's role values onto system/user/assistant; it is
merged over the format's defaults. Invalid rows raise `InvalidRow(reason)`; the pipeline
counts them by reason instead of training on them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping
from covenant_jax.errors import UserError

ROLES = ("system", "user", "assistant")

# Every reason a row can be skipped for (the report counts them in this order).
SKIP_REASONS = (
    "invalid_json",
    "non_utf8",
    "missing_field",
    "not_a_list",
    "non_string_content",
    "unknown_role",
    "misplaced_system",
    "empty_conversation",
    "empty_content",
    "no_assistant",
    "template_error",
    "template_mismatch",
    "overlength_dropped",
    "no_trained_tokens",
)

_DEFAULT_FIELDS = {
    "messages": {"messages": "messages", "role": "role", "content": "content"},
    "sharegpt": {"messages": "conversations", "role": "from", "content": "value"},
    "instruct": {
        "system": "system",
        "instruction": "instruction",
        "input": "input",
        "output": "output",
    },
    "prompt_completion": {"prompt": "prompt", "completion": "completion", "system": "system"},
    "text": {"text": "text"},
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
}
FORMATS = tuple(_DEFAULT_FIELDS)


class InvalidRow(Exception):
    """A row that cannot be trained on; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """How to read one source's rows. Build with `RowFormat.create`."""

    format: str
    fields: Mapping[str, str]
    role_map: Mapping[str, str]
    explicit: frozenset[str]  # Logical fields the user named (they must exist in the data).

    @classmethod
    def create(
        cls,
        format: str,
        fields: Mapping[str, str] | None = None,  # pylint: disable=redefined-builtin
        role_map: Mapping[str, str] | None = None,
    ) -> RowFormat:
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
        return cls(format, {**_DEFAULT_FIELDS[format], **fields}, roles, frozenset(fields))

    def to_example(self, row: Any) -> list[dict[str, str]] | str:
        """The row as messages (chat formats) or a string (`text`); raises InvalidRow."""
        if not isinstance(row, Mapping):
            raise InvalidRow("invalid_json", f"row is a {type(row).__name__}, not an object")
        if self.format in ("messages", "sharegpt"):
            return self._conversation(row)
        if self.format == "instruct":
            return self._instruct(row)
        if self.format == "prompt_completion":
            return self._turns(row, "prompt", "completion")
        return _text(row, self.fields["text"], required=True)

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
        if self.format in ("messages", "sharegpt"):
            self._check_message_keys(rows, where)

    def _check_message_keys(self, rows: list[Mapping], where: str) -> None:
        keys = set()
        for r in rows:
            msgs = r.get(self.fields["messages"])
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
        return validate_messages(out)

    def _instruct(self, row: Mapping) -> list[dict[str, str]]:
        f = self.fields
        user = _as_text(row.get(f["instruction"]), f["instruction"])
        extra = _text(row, f["input"], required=False)
        if extra.strip():
            user = f"{user}\n\n{extra}"
        return self._with_system(
            row,
            [
                {"role": "user", "content": user},
                {"role": "assistant", "content": _as_text(row.get(f["output"]), f["output"])},
            ],
        )

    def _turns(self, row: Mapping, user_key: str, assistant_key: str) -> list[dict[str, str]]:
        f = self.fields
        return self._with_system(
            row,
            [
                {"role": "user", "content": _as_text(row.get(f[user_key]), f[user_key])},
                {
                    "role": "assistant",
                    "content": _as_text(row.get(f[assistant_key]), f[assistant_key]),
                },
            ],
        )

    def _with_system(self, row: Mapping, msgs: list[dict[str, str]]) -> list[dict[str, str]]:
        system = _text(row, self.fields["system"], required=False)
        if system.strip():
            msgs = [{"role": "system", "content": system}] + msgs
        return validate_messages(msgs)


def validate_messages(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """Checks the normal form: known roles, system only first, no empty turns, an assistant.

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
    return msgs


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
