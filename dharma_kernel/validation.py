"""Pydantic validation errors as one line per problem: key path, what is wrong, the closest valid name.

Used for the manifest and for plugin configs (``modules.override.<ref>``), so every
message a user reads has the same shape.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .suggest import closest

# What an input of the wrong type should have been, by pydantic error type.
_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "set_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}

_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def format_validation_error(
    err: ValidationError,
    prefix: str = "",
    source: str | None = None,
    *,
    model: type[BaseModel] | None = None,
) -> str:
    """One line per problem: ``[<source>: ]<prefix>.<key.path>: <what is wrong>``.

    ``model`` is the class that was validated; with it, unknown keys and bad choices
    get the closest valid name and union member tags are left out of key paths.
    """
    problems = [_problem(e, model, prefix) for e in err.errors()]
    problems = _merge_union_branches(problems)
    lines = []
    for parts, message in problems:
        where = _key_path(prefix, parts)
        line = f"{where}: {message}" if where else message
        lines.append(f"{source}: {line}" if source else line)
    return "\n".join(dict.fromkeys(lines))


@dataclass
class _Problem:
    parts: tuple  # key path, union member tags left out
    union_at: tuple | None  # key path of the innermost union crossed
    expected: str | None  # set for wrong-type problems
    got: str
    message: str


def _problem(e: Any, model: type[BaseModel] | None, prefix: str) -> _Problem:
    loc, kind, value, ctx = tuple(e["loc"]), e["type"], e.get("input"), e.get("ctx") or {}
    parts, tp, union_at = _follow(model, loc)
    expected, got = None, describe(value)
    if kind == "extra_forbidden":
        message = "unknown key" + _suggest_key(str(loc[-1]), _follow(model, loc[:-1])[1])
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "literal_error":
        if get_origin(tp) is Literal:
            choices = list(get_args(tp))
        else:  # no model given: read the choices from pydantic's own list
            choices = re.findall(r"'([^']*)'", ctx["expected"])
        message = f"expected one of {', '.join(describe(c) for c in choices)}, got {got}"
        if isinstance(value, str) and (near := closest(value, [str(c) for c in choices])):
            message += f" (did you mean {near!r}?)"
    elif kind in _EXPECTED:
        expected = _EXPECTED[kind]
        if kind == "list_type" and _is_model_list(tp) and parts and isinstance(parts[-1], str):
            expected = f"an array of tables ([[{_key_path(prefix, parts)}]])"
        message = f"expected {expected}, got {got}"
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)  # a float field's bound `gt=0` arrives as 0.0
        message = f"must be {_BOUNDS[kind]} {bound}, got {got}"
    elif kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        message = "must not be empty"
    elif kind in ("value_error", "assertion_error") and "error" in ctx:
        message = str(ctx["error"])
    else:
        message = e["msg"]
    return _Problem(parts, union_at, expected, got, message)


def _merge_union_branches(problems: list[_Problem]) -> list[tuple[tuple, str]]:
    """Report a union failure once: by the branch the input was meant for, or as 'expected X or Y'."""
    out: list[tuple[tuple, str]] = []
    seen_unions: set[tuple] = set()
    for p in problems:
        if p.union_at is None:
            out.append((p.parts, p.message))
            continue
        if p.union_at in seen_unions:
            continue
        seen_unions.add(p.union_at)
        group = [q for q in problems if q.union_at == p.union_at]
        shallow = [q for q in group if q.expected is not None and q.parts == q.union_at]
        deep = [q for q in group if q not in shallow]
        if deep:
            out.extend((q.parts, q.message) for q in deep)
        else:
            wanted = " or ".join(dict.fromkeys(q.expected for q in shallow))
            out.append((p.union_at, f"expected {wanted}, got {p.got}"))
    return out


def _follow(model: Any, loc: tuple) -> tuple[tuple, Any, tuple | None]:
    """Walk ``loc`` through the annotations from ``model``.

    Returns the key path without union member tags, the annotation found at its end
    (None when unknown) and the key path of the innermost union crossed, if any.
    """
    tp, parts, union_at = model, [], None
    for seg in loc:
        tp = _unwrap(tp)
        members = _union_members(tp)
        if members is not None:
            # pydantic names the union member that failed; it is no key the user wrote.
            union_at = tuple(parts)
            tp = next((m for m in members if _tag(m) == seg), None)
            continue
        parts.append(seg)
        tp = _child(tp, seg)
    return tuple(parts), _unwrap(tp), union_at


def _unwrap(tp: Any) -> Any:
    """Drop Annotated metadata and Optional: pydantic adds no loc segment for either."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif (members := _union_members(tp, all_members=True)) is not None and len(members) == 1:
            tp = members[0]
        else:
            return tp


def _union_members(tp: Any, all_members: bool = False) -> list | None:
    if get_origin(tp) not in (Union, types.UnionType):
        return None
    members = [m for m in get_args(tp) if m is not type(None)]
    return members if all_members or len(members) > 1 else None


def _tag(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _child(tp: Any, seg: Any) -> Any:
    if _is_model(tp):
        for name, field in tp.model_fields.items():
            if seg in (name, field.alias):
                return field.annotation
        return None
    args = get_args(tp)
    if get_origin(tp) in (list, tuple, set, frozenset) and isinstance(seg, int) and args:
        return args[0]
    if get_origin(tp) in (dict, Mapping) and len(args) == 2:
        return args[1]
    return None


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_model_list(tp: Any) -> bool:
    return get_origin(tp) is list and _is_model(_unwrap(get_args(tp)[0]))


def _suggest_key(key: str, parent: Any) -> str:
    if not _is_model(parent):
        return ""
    valid = [field.alias or name for name, field in parent.model_fields.items()]
    if near := closest(key, valid):
        return f"; did you mean {near!r}?"
    return f"; valid keys: {', '.join(valid)}"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key_path(prefix: str, parts: Iterable[Any]) -> str:
    """Key path as TOML spells it: dotted, quoted where a key needs quotes, [i] for array items."""
    path = prefix
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        key = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
        path = f"{path}.{key}" if path else key
    return path


def describe(value: Any) -> str:
    """A value as the user wrote it in TOML, for 'got ...'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)
