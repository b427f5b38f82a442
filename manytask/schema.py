"""Typed loading of plain dicts (parsed YAML) into dataclasses, with errors a user can act on.

`load_dataclass(cls, data, where=...)` checks every key against the dataclass fields (an
unknown key names the closest valid one), checks every value against the field's type hint
and fills defaults. Builders of models and weightings reuse it for their `params:` blocks so
that every part of a recipe is validated the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that cannot be used: the message names the key, file and fix."""


def closest(name: str, options: typing.Iterable[str]) -> str | None:
    """The valid option most similar to `name`, or None when nothing is close."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return match[0] if match else None


def registry_entry(registry: dict[str, Any], name: str, what: str, file: str | None = None) -> Any:
    """`registry[name]` for the recipe key `<what>.name`; ConfigError naming the file, the
    closest valid name and every valid one otherwise (e.g. what="model": "(models: ...)")."""
    if name in registry:
        return registry[name]
    near = closest(name, registry)
    fix = f"; did you mean '{near}'?" if near else ""
    where = f" in {file}" if file else ""
    raise ConfigError(f"'{what}.name'{where}: unknown {what} '{name}'{fix} ({what}s: {', '.join(registry)})")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint))
        return f"{origin.__name__}[{args}]"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _where(file: str | None, key: str) -> str:
    return f"'{key}'" + (f" in {file}" if file else "")


def _convert(hint: Any, value: Any, key: str, file: str | None) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, file)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(
            f"{_where(file, key)}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})"
        )
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            near = closest(str(value), [str(a) for a in allowed])
            hint_txt = f"; did you mean '{near}'?" if near else ""
            raise ConfigError(
                f"{_where(file, key)}: {value!r} is not one of {', '.join(map(repr, allowed))}{hint_txt}"
            )
        return value
    if dataclasses.is_dataclass(hint):
        return load_dataclass(hint, value, file=file, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(file, key)}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_convert(item, v, f"{key}.{i}", file) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(file, key)}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(hint) or (str, Any)
        return {str(k): _convert(vt, v, f"{key}.{k}", file) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(file, key)}: expected bool (true/false), got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_where(file, key)}: expected int, got {value!r} ({type(value).__name__})")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_where(file, key)}: expected float, got {value!r} ({type(value).__name__})")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_where(file, key)}: expected str, got {value!r} ({type(value).__name__})")
        return value
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(file, key)}: expected a mapping, got {value!r}")
        return value
    return value


def require(ok: bool, file: str | None, key: str, value: Any, expected: str) -> None:
    """ConfigError "'key' in file: expected <expected>, got <value>" unless `ok`."""
    if not ok:
        raise ConfigError(f"{_where(file, key)}: expected {expected}, got {value!r}")


def at_least(file: str | None, section: str, minimum: float, **values: float) -> None:
    """Every `section.<name>` in `values` must be >= `minimum` (NaN is not)."""
    for name, value in values.items():
        require(value >= minimum, file, f"{section}.{name}", value, f"a number >= {minimum}")


def load_dataclass(cls: type[T], data: Any, file: str | None = None, prefix: str = "") -> T:
    """Build `cls` from a mapping, validating keys and types.

    Raises ConfigError naming the dotted key (`prefix.key`), the file and, for an unknown key,
    the closest valid key.
    """
    where = prefix or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(file, where)}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            near = closest(str(key), fields)
            fix = f"; did you mean '{(prefix + '.' if prefix else '') + near}'?" if near else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {_where(file, dotted)}{fix} (valid keys here: {valid})")
        kwargs[key] = _convert(hints[key], value, dotted, file)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            dotted = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"missing required key {_where(file, dotted)} ({_type_name(hints[name])})")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check(file)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-Python (YAML/JSON-safe) copy of a dataclass tree."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
