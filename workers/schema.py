"""Config sections as frozen dataclasses: one builder and one check for all of them.

`build(kind, raw, path)` turns a parsed YAML/JSON mapping into the dataclass
`kind`: a key the dataclass does not have is refused with its full path
(`server.limits.max_itmes`), a nested dataclass field is built from its own
mapping the same way, a list becomes the tuple the field declares, and a value
of the wrong shape is refused naming the field, never a bare `TypeError`.
Bounds are each dataclass's own `__post_init__`, through `check`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from workers.errors import InvalidArgument

T = TypeVar("T")


def check(ok: bool, path: str, description: str) -> None:
    """Raises INVALID_ARGUMENT naming the config path when `ok` is false."""
    if not ok:
        raise InvalidArgument.field(path, description)


def refuse_unknown(kind: type, raw: Any, path: str) -> None:
    where = path or "the config file"
    check(isinstance(raw, dict), where, f"must be a mapping, got {type(raw).__name__}")
    known = [f.name for f in dataclasses.fields(kind)]
    unknown = sorted(set(raw) - set(known), key=str)
    check(not unknown, where, f"unknown keys: {', '.join(map(str, unknown))}; known: {', '.join(known)}")


def build(kind: type[T], raw: Any, path: str, **fixed: Any) -> T:
    """The dataclass `kind` from the mapping `raw` (None = all defaults); `fixed` fields are given, not read."""
    raw = {} if raw is None else raw
    refuse_unknown(kind, raw, path)
    hints = typing.get_type_hints(kind)
    kwargs: dict[str, Any] = dict(fixed)
    missing = []
    for f in dataclasses.fields(kind):
        if f.name in fixed:
            continue
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                missing.append(f.name)
            continue
        kwargs[f.name] = _value(hints[f.name], raw[f.name], f"{path}.{f.name}" if path else f.name)
    check(not missing, path or "the config file", f"needs the key{'s' * (len(missing) > 1)} {', '.join(missing)}")
    return kind(**kwargs)


def _value(hint: Any, value: Any, path: str) -> Any:
    inner = _dataclass_in(hint)
    if inner is not None:
        if value is None and type(None) in typing.get_args(hint):
            return None
        check(value is None or isinstance(value, dict), path, f"must be a mapping, got {value!r}")
        return build(inner, value, path)
    origin = typing.get_origin(hint)
    if origin is tuple:
        check(isinstance(value, (list, tuple)), path, f"must be a list, got {type(value).__name__}")
        return tuple(value)
    allowed = _scalars(hint)
    if allowed:
        check(any(_is(value, kind) for kind in allowed), path,
              f"must be {' or '.join(_NAMES[k] for k in allowed)}, got {value!r}")
    return value


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _scalars(hint: Any) -> tuple[type, ...]:
    """The scalar types a field accepts, or () when it is not a plain scalar field."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(args) if args and all(a in _NAMES for a in args) else ()


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (`X` or `X | None`), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None
