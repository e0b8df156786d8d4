"""Fill trees of frozen dataclasses from plain dicts (YAML, JSON, ``--set``), checking every key and value.

An unknown key fails at once, naming the key, where it came from (a file, ``--set``) and the nearest
valid key; a value of the wrong type names the key and the type it wants. A section given as a
plain value (``fusion: late``) means ``{SHORTHAND: value}`` for a class that declares ``SHORTHAND``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from functools import cache
from typing import Any

from mmdata.errors import ConfigError


@cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def fields(cls) -> dict[str, Any]:
    """{field name: resolved type} of a dataclass, in declaration order."""
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def section(hint: Any) -> type | None:
    """The dataclass a field of type ``hint`` holds, or None for a plain value."""
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _arms(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _is_mapping(hint: Any) -> bool:
    return any(a is dict or typing.get_origin(a) is dict for a in _arms(hint))


def suggest(cls, path: list[str]) -> str | None:
    """The valid dotted key nearest to ``path`` under ``cls``, completed with the rest of ``path``."""
    out: list[str] = []
    for i, part in enumerate(path):
        names = fields(cls)
        if part not in names:
            close = difflib.get_close_matches(part, list(names), n=1, cutoff=0.5)
            if not close:
                return None
            part = close[0]
        out.append(part)
        sub = section(names[part])
        if sub is None:
            if _is_mapping(names[part]):
                out += path[i + 1:]  # a free mapping (late_weights, storage_options) takes any key
            break
        cls = sub
    return ".".join(out)


def _unknown(root, where: str, full: str, source: str) -> ConfigError:
    """The error for the key ``full``, unknown in the section ``where``, with the nearest valid key."""
    near = suggest(root, full.split("."))
    hint = f"; did you mean {near!r}?" if near else f"; valid keys there: {sorted(fields(_at(root, where)))}"
    return ConfigError(f"unknown key {full!r} in {source}{hint}")


def _at(root, where: str):
    cls = root
    for part in filter(None, where.split(".")):
        cls = section(fields(cls)[part])
    return cls


def check_keys(root, d: Any, source: str, where: str = "") -> None:
    """Raise ConfigError at the first key of ``d`` (nested) that ``root``'s tree does not have."""
    if not isinstance(d, dict):
        return
    names = fields(_at(root, where))
    for key, value in d.items():
        if key not in names:
            raise _unknown(root, where, f"{where}.{key}" if where else str(key), source)
        sub = section(names[key])
        if sub is not None and isinstance(value, dict):
            check_keys(root, value, source, f"{where}.{key}" if where else key)


def check_path(root, dotted: str, source: str) -> None:
    """Raise ConfigError when ``dotted`` (an override's key) names no field of ``root``'s tree."""
    cls, parts = root, dotted.split(".")
    for i, part in enumerate(parts):
        if cls is None:  # below a free mapping (late_weights, storage_options): any key
            return
        names = fields(cls)
        if part not in names:
            raise _unknown(root, ".".join(parts[:i]), dotted, source)
        hint = names[part]
        if section(hint) is None and not _is_mapping(hint) and i < len(parts) - 1:
            raise ConfigError(f"{source}: {'.'.join(parts[:i + 1])!r} is a value, not a section")
        cls = section(hint)


def fill(cls, d: Any, where: str):
    """An instance of dataclass ``cls`` from the mapping ``d`` (keys already checked)."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        shorthand = getattr(cls, "SHORTHAND", None)
        if shorthand is None:
            raise ConfigError(f"{where or 'the config'} must be a mapping, got {d!r}")
        d = {shorthand: d}
    names = fields(cls)
    kwargs = {}
    for key, value in d.items():
        at = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown key {at!r}; valid keys: {sorted(names)}")
        sub = section(names[key])
        kwargs[key] = fill(sub, value, at) if sub is not None else _value(names[key], value, at)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad value in {where or 'the config'}: {e}") from None


def _value(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against ``hint``; lists become tuples where a tuple is wanted, '1e-3' a float."""
    arms = _arms(hint)
    if any(a is Any for a in arms):
        return value
    if value is None:
        if type(None) in arms:
            return None
        raise ConfigError(f"{where} must be {_describe(hint)}, got null")
    for arm in arms:
        ok, converted = _match(arm, value)
        if ok:
            return converted
    raise ConfigError(f"{where} must be {_describe(hint)}, got {value!r}")


def _match(arm: Any, value: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(arm) or arm
    if origin is bool:
        return isinstance(value, bool), value
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if origin is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if origin is str:
        return isinstance(value, str), value
    if origin is tuple:
        if isinstance(value, str) and typing.get_args(arm) == (str, ...):  # modalities: image
            return True, (value,)
        return isinstance(value, (list, tuple)), tuple(value) if isinstance(value, (list, tuple)) else value
    if origin is dict:
        return isinstance(value, dict), value
    return False, value


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             type(None): "null", tuple: "a list", dict: "a mapping"}
    return " or ".join(dict.fromkeys(names.get(typing.get_origin(a) or a, str(a)) for a in _arms(hint)))


def plain(value: Any) -> Any:
    """A dataclass tree as nested dicts and lists (what YAML and JSON hold)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
