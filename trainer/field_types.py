"""Type checks of config values against a dataclass's annotations, with errors that name the field.

Config files (TOML) and keyword dicts reach dataclasses untyped: ``vineppo_branches = "four"``
would otherwise fail later inside a comparison, naming neither the field nor the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """``{field name: resolved annotation}`` of the dataclass ``cls`` (``Any`` where unresolvable)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation naming what the module does not import: check none
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits ``hint``: bool, int (not bool), float (int too), str, None, Literal,
    unions, list/tuple (elements checked when typed) and dict; anything else is accepted."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if hint is None or hint is type(None):
        return value is None
    if origin is typing.Literal:
        return any(
            value == a and isinstance(value, type(a)) and (type(value) is bool) == (type(a) is bool) for a in args
        )
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        element = args[0] if args and (origin is list or (len(args) == 2 and args[1] is Ellipsis)) else Any
        return all(matches(v, element) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, Mapping)
    return True


def describe(hint: Any) -> str:
    """``hint`` as a reader would write it: ``int``, ``float or None``, ``one of 'a', 'b'``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if hint is type(None):
        return "None"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        return "a list" if origin in (list, tuple) else origin.__name__
    return getattr(hint, "__name__", str(hint))


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or an empty string."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_fields(cls: type, values: Mapping[str, Any], where: str = "") -> None:
    """Raises ``ValueError`` for a key of ``values`` that is not a field of ``cls`` (with the
    closest field) and ``TypeError`` for a value that does not fit its field's annotation;
    ``where`` prefixes the field's name (``"trainer."``, ``"demo.toml: "``)."""
    hints = field_hints(cls)
    for name, value in values.items():
        if name not in hints:
            raise ValueError(f"{where}{name}: not a {cls.__name__} field{did_you_mean(name, hints)}")
        if not matches(value, hints[name]):
            raise TypeError(f"{where}{name} = {value!r}: expected {describe(hints[name])}")


def check_instance(config: Any, names: Iterable[str] | None = None) -> None:
    """`check_fields` of a dataclass instance's own values (``names``: those fields only)."""
    names = [f.name for f in dataclasses.fields(config)] if names is None else names
    check_fields(type(config), {name: getattr(config, name) for name in names})
