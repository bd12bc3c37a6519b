"""Check a dataclass's fields against their annotations, then against ranges and choices by field name.

A hand-edited config.json can hold anything JSON can ("1e-4", true, null, 1e999 = Infinity): the type comes first,
so the range checks (these, and a section's own after them) may assume it. fluxnb.config keeps the tables
(its choices from fluxnb.base.choices).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any, get_type_hints

from .errors import FluxnbError


class ConfigError(FluxnbError, ValueError):
    """A bad configuration value: the message says which field, what was given, and what is allowed."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


KINDS = {  # annotation -> (what a value of it must be, its test); float takes ints, int and float refuse bools
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    str | None: ("a string or null", lambda v: v is None or isinstance(v, str)),
    list[str]: ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v)),
}

Range = tuple[Callable[[Any], bool], str]  # (test, what it means: "> 0")


def check_fields(obj: Any, section: str, ranges: dict[str, Range], choices: dict[str, tuple[str, ...]]) -> None:
    """Every field of dataclass `obj` against its annotation, then `ranges` and `choices` by field name.
    `section`: "train." etc., for the messages."""
    hints = get_type_hints(type(obj))  # the annotations are strings where `from __future__ import annotations`
    for f in dataclasses.fields(obj):
        kind, fits = KINDS.get(hints[f.name], ("", lambda v: True))  # a RunConfig's sections: checked by their own
        if not fits(value := getattr(obj, f.name)):
            kind = "a finite number" if hints[f.name] is float and isinstance(value, float) else kind  # NaN, 1e999
            e_g = f" (e.g. {json.dumps(f.default)})" if type(f.default) in (int, float, str) and f.default != "" else ""
            raise ConfigError(f"{section}{f.name}={json.dumps(value, default=repr)} must be {kind}{e_g}.")
    for f in dataclasses.fields(obj):
        name, value = section + f.name, getattr(obj, f.name)
        if (allowed := choices.get(f.name)) is not None:
            check(value in allowed, f"{name}={value!r} is not supported; choose one of {', '.join(allowed)}.")
        if f.name in ranges:
            (ok, bound), kind = ranges[f.name], "an integer" if hints[f.name] is int else "a number"
            check(ok(value), f"{name} must be {kind} {bound}, got {value!r}.")
