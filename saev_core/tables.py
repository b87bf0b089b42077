"""The one reader that turns a TOML or JSON table into a checked, frozen config dataclass.

The sweep file, the pipeline file and checkpoint headers all go through here, so a bad key or value gets the same
words wherever it is written: the key, the value, the file, the type expected, and "did you mean" for a near miss.
Imports neither torch nor ``saev_core.config`` (the base layer: ``errors`` only).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from saev_core.errors import UserError


def coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (int -> float, list -> tuple), or ``TypeError``. TOML has no null, so ``None``
    only comes from Python callers."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        # bool is an int in Python: Literal[1] must not accept True.
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise TypeError
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return coerce(value, arm)
            except TypeError:
                pass
        raise TypeError
    if tp is type(None):
        if value is None:
            return value
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0]) for v in value)
        if args and len(args) != len(value):
            raise TypeError
        return tuple(coerce(v, a) for v, a in zip(value, args)) if args else tuple(value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise TypeError
    return value  # an annotation we do not know how to check


def describe_type(tp: Any) -> str:
    """A type as a person reads it in an error: "one of 'relu', 'topk'", "float (a number)", "int or None"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if tp is type(None):
        return "None"
    if tp is float:
        return "float (a number)"
    if origin is tuple:
        return "tuple " + repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", repr(tp))


def unknown_key(key: str, allowed: list[str], table: str, source: str, prefix: str = "") -> UserError:
    """The error for a key that is not a field. ``table`` is the dotted table name ("" for the top level); ``key``
    and the suggestions are shown with ``prefix`` in front (a sweep file names keys from its top: "data.layer")."""
    close = difflib.get_close_matches(key, allowed, n=3)
    hint = f" Did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""
    where = f"[{table}]" if table else "the top level"
    key = prefix + key
    return UserError(f"Unknown key {key!r} in {where} of {source}.{hint} Allowed in {where}: {', '.join(allowed)}.")


def wrong_type(dotted: str, value: Any, tp: Any, source: str, hint: str = "") -> UserError:
    """The error for a value of the wrong type; a misspelt choice of a ``Literal`` gets "did you mean"."""
    if not hint and typing.get_origin(tp) is Literal and isinstance(value, str):
        close = difflib.get_close_matches(value, [str(a) for a in typing.get_args(tp)], n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return UserError(f"{dotted} = {value!r} in {source}: expected {describe_type(tp)}.{hint}")


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def from_table(base: Any, table: dict, where: str, source: str) -> Any:
    """``base`` (a dataclass instance) with the values of ``table`` (no sweeping: a list is a value), every key and
    type checked; a nested table fills the nested dataclass field of the same name. ``where`` is the table's dotted
    name ("activations.data"); a range error from the dataclass's own checks gets ``[where] of source`` in front."""
    if not isinstance(table, dict):
        raise UserError(f"{where} = {table!r} in {source}: expected a table [{where}].")
    hints = typing.get_type_hints(type(base))
    names = field_names(type(base))
    changes = {}
    for key, value in table.items():
        if key not in names:
            raise unknown_key(key, names, where, source)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"{where}.{key} = {value!r} in {source}: expected a table [{where}.{key}].")
            changes[key] = from_table(getattr(base, key), value, f"{where}.{key}", source)
            continue
        try:
            changes[key] = coerce(value, tp)
        except TypeError:
            raise wrong_type(f"{where}.{key}", value, tp, source) from None
    try:
        return dataclasses.replace(base, **changes)
    except UserError as err:  # a value out of range (the dataclass's own check): say where it is
        raise UserError(f"[{where}] of {source}: {err}") from None
