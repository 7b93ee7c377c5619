"""TOML tables read into frozen dataclasses: an unknown key or a value of the wrong TOML type is the
user's error in one line (never a traceback, never a silent cast); the dataclass validates the rest."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from onnx_admm.converters.errors import UserError


def reject_unknown(where: str, data: Mapping[str, Any], known: set[str]) -> None:
    if not isinstance(data, Mapping):
        raise UserError(f"{where} must be a table, got {type(data).__name__}")
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown key {unknown[0]!r} in {where}; known keys: {', '.join(sorted(known))}")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "an array"}


def _type_ok(value: Any, kind: Any) -> bool:
    if typing.get_origin(kind) is tuple:
        return isinstance(value, (list, tuple))
    if kind in (int, float):  # TOML's true is no number; an integer is a fine float
        return isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_types(cls: type, values: Mapping[str, Any], where: str) -> None:
    """Reject values of the wrong TOML type with a message, rather than a traceback or a silent cast."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints[key]
        kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if not any(_type_ok(value, kind) for kind in kinds):
            wanted = " or ".join(_TYPE_NAMES.get(typing.get_origin(k) or k, str(k)) for k in kinds if k is not type(None))
            raise UserError(f"{where} {key} must be {wanted}, got {value!r}")


def build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    reject_unknown(where, data, {f.name for f in fields(cls)})
    _check_types(cls, data, where)
    values = dict(data)
    for key in ("targets", "block", "bits"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    try:
        return cls(**values)
    except TypeError as exc:
        raise UserError(f"bad value in {where}: {exc}") from None
