"""Argument checks at the service facade: every face (web events, CLI, benchmarks) hands it
values that came from outside, and a wrong type must be a clear error, not a
``sqlite3.ProgrammingError`` from deep inside the store.

``check_arguments(Heed, error=InputError)`` wraps each public method once, at import:
parameters annotated with a plain ``int``, ``bool``, ``str`` or ``float`` (or one of
those ``| None``) are checked against the annotation; ``user_id``, ``*_id`` and
``version`` must also be positive and fit SQLite's 64-bit integers. Anything else
(callables, lists, dicts) is left to the method.

``adapter_problem`` checks adapter files (written by another process, maybe damaged)
before the engine is handed them.
"""
from __future__ import annotations

import functools
import inspect
import types
import typing
from pathlib import Path

MAX_ID = 2**63 - 1
_SIMPLE = (int, bool, str, float)
_NAMES = {int: "a whole number", bool: "true or false", str: "text", float: "a number"}


def _simple(tp) -> tuple[tuple, bool] | None:
    """(allowed types, None allowed) for a plain annotation, else None (not checked here)."""
    if tp in _SIMPLE:
        return (tp,), False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        rest = tuple(m for m in members if m is not type(None))
        if rest and all(m in _SIMPLE for m in rest):
            return rest, len(rest) < len(members)
    return None


def _ok(value, allowed: tuple, is_id: bool) -> bool:
    for tp in allowed:
        if tp is bool and isinstance(value, bool):
            return True
        if tp is int and isinstance(value, int) and not isinstance(value, bool):
            return 1 <= value <= MAX_ID if is_id else -MAX_ID <= value <= MAX_ID
        if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if tp is str and isinstance(value, str):
            return True
    return False


def _wrap(fn, error: type[Exception]):
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    checks = {}
    for name in sig.parameters:
        rule = _simple(hints.get(name))
        if name != "self" and rule is not None:
            checks[name] = (*rule, name == "user_id" or name.endswith("_id") or name == "version")
    if not checks:
        return fn

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise error(f"{fn.__name__}: {exc}") from None
        for name, value in bound.arguments.items():
            rule = checks.get(name)
            if rule is None:
                continue
            allowed, optional, is_id = rule
            if value is None and optional:
                continue
            if not _ok(value, allowed, is_id):
                want = " or ".join(_NAMES[t] for t in allowed) + (" or nothing" if optional else "")
                if is_id:
                    want = "a positive whole number (an id)" + (" or nothing" if optional else "")
                raise error(f"{name} must be {want}, got {type(value).__name__}")
        return fn(*args, **kwargs)

    return checked


def check_arguments(cls: type, *, error: type[Exception]) -> type:
    """Wrap every public method of ``cls`` defined on the class itself (see the module doc)."""
    for name, fn in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(fn):
            setattr(cls, name, _wrap(fn, error))
    return cls


def adapter_problem(folder: Path) -> str | None:
    """Why the adapter in ``folder`` cannot be served, or None. Cheap: reads the JSON config and the
    safetensors header (which also catches a truncated file), never the weights."""
    import json

    from safetensors import SafetensorError, safe_open

    config = folder / "adapter_config.json"
    weights = folder / "adapter_model.safetensors"
    try:
        json.loads(config.read_text(encoding="utf-8"))
        with safe_open(str(weights), framework="pt") as f:
            if not list(f.keys()):
                return f"{weights} holds no weights"
    except FileNotFoundError as exc:
        return f"{exc.filename} is missing"
    except (OSError, ValueError, SafetensorError) as exc:
        return f"{folder.name} is damaged: {type(exc).__name__}: {exc}"
    return None
