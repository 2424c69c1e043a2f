"""Declarative checks of recipe fields: each section's owner lists its rules, ``check`` applies them.

A rule is (predicate, what the value must be); a failing field becomes one line naming it, its
value and the expectation, before anything is loaded or compiled.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

from covenant_jax.errors import RecipeError

Rule = tuple[Callable[[Any], bool], str]

DTYPES = ("float32", "bfloat16", "float16")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least(low: float) -> Rule:
    return (lambda v: _number(v) and v >= low), f"must be >= {low}"


def positive() -> Rule:
    return (lambda v: _number(v) and v > 0), "must be > 0"


def within(low: float, high: float, *, high_open: bool = False) -> Rule:
    bracket = ")" if high_open else "]"
    return (
        (lambda v: _number(v) and low <= v and (v < high if high_open else v <= high)),
        f"must be in [{low}, {high}{bracket}",
    )


def one_of(options: Iterable[Any]) -> Rule:
    options = tuple(options)
    return (lambda v: v in options), f"must be one of {', '.join(repr(o) for o in options)}"


def mesh_size() -> Rule:
    return (
        lambda v: isinstance(v, int) and (v == -1 or v >= 1)
    ), "must be a positive size, or -1 for the devices left"


def check(section_name: str, section: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    for key, (ok, expected) in rules.items():
        if key in section and not ok(section[key]):
            raise RecipeError(f"{section_name}.{key}={section[key]!r}: {expected}")
