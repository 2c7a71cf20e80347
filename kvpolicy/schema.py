"""Checking a JSON document we read (a checkpoint config, a trace manifest, a results record) against its schema,
so that a missing or mistyped field is one error naming the file and the field, never a traceback later.

A schema is a plain dict from field name to what the value must be:
    int, float, str, bool, dict, list   that type (an int is a float; a bool is neither an int nor a float)
    (int, None)                          any of several; None allows null
    {...}                                a nested object with its own schema (extra fields are allowed)
    [schema]                             a list whose every item matches `schema`
    Optional(schema)                     the field may be absent; when present it must match
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvpolicy.errors import KVPError


@dataclass(frozen=True)
class Optional:
    """A field that may be absent."""

    schema: Any


def _type_name(spec: Any) -> str:
    if spec is None:
        return "null"
    if isinstance(spec, tuple):
        return " or ".join(_type_name(s) for s in spec)
    if isinstance(spec, dict):
        return "an object"
    if isinstance(spec, list):
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
            list: "a list"}[spec]


def _matches_type(value: Any, spec: Any) -> bool:
    if spec is None:
        return value is None
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if spec is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, spec)


def _problem(value: Any, spec: Any, field: str) -> str | None:
    """What is wrong with `value` at `field` (None when it matches)."""
    if isinstance(spec, Optional):
        spec = spec.schema
    if isinstance(spec, tuple):
        if any(_problem(value, s, field) is None for s in spec):
            return None
        return f"field '{field}' must be {_type_name(spec)}, got {value!r:.60}"
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"field '{field}' must be an object, got {value!r:.60}"
        return _object_problem(value, spec, f"{field}.")
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"field '{field}' must be a list, got {value!r:.60}"
        for i, item in enumerate(value):
            if (found := _problem(item, spec[0], f"{field}[{i}]")) is not None:
                return found
        return None
    if not _matches_type(value, spec):
        return f"field '{field}' must be {_type_name(spec)}, got {value!r:.60}"
    return None


def _object_problem(obj: dict, schema: dict, prefix: str = "") -> str | None:
    for name, spec in schema.items():
        if name not in obj:
            if isinstance(spec, Optional):
                continue
            return f"field '{prefix}{name}' is missing"
        if (found := _problem(obj[name], spec, f"{prefix}{name}")) is not None:
            return found
    return None


def validate(obj: Any, schema: dict, where: str, fix: str) -> None:
    """Raise KVPError("WHERE: field 'a.b' is missing; FIX") at the first field of `obj` that breaks `schema`.

    where: the file (and line) the document came from; fix: what the user should do about it.
    """
    problem = (f"expected a JSON object, got {type(obj).__name__}" if not isinstance(obj, dict)
               else _object_problem(obj, schema))
    if problem is not None:
        raise KVPError(f"{where}: {problem}; {fix}")
