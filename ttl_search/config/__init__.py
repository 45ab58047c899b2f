"""Strict loading of dataclass configs from YAML files, dicts and ``key=value`` overrides.

Resolution order: command-line overrides > file > dataclass defaults. Unknown keys and values of
the wrong type raise :class:`~ttl_search.errors.ConfigError` naming the key and the valid keys.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from ..errors import ConfigError, choices

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, except that numbers in exponent form without a dot (``1e-3``, ``1e6``)
    are floats, as users expect (YAML 1.1 reads them as strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """A YAML document with :class:`_Loader`."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a binary file or invalid YAML is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        loaded = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not a text (UTF-8) YAML file: byte {exc.start} cannot be "
                          "decoded") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
    return loaded


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {exc}") from exc
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return out


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in ``override`` wins."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp = _strip_optional(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping of keys, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if origin is list and isinstance(value, (list, tuple)):
        return list(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, bool, str) and not isinstance(value, tp):
        if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be of type {tp.__name__}, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return value


def from_dict(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``values``; unknown keys raise and list the valid ones, and a key
    the class lists in its ``RENAMED`` (old name -> new name) raises naming the new one."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in values:
            raise ConfigError(f"config key {prefix + old!r} was renamed to {prefix + new!r}; write "
                              f"{prefix + new}: {values[old]!r} instead")
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {choices(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid config{' under ' + prefix.rstrip('.') if prefix else ''}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain YAML/JSON-safe data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                extra: Mapping[str, Any] | None = None) -> T:
    """Defaults < file < ``extra`` < ``key=value`` overrides, validated into ``cls``."""
    values: dict[str, Any] = read_yaml(path) if path else {}
    if extra:
        values = merge(values, extra)
    values = merge(values, parse_overrides(overrides))
    return from_dict(cls, values)
