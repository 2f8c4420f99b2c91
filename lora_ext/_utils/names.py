"""Adapter names: checked once, by one rule, wherever a name is created or becomes a path.

A name is a key of the layers' ``ModuleDict``s and, for a non-default adapter, a folder
inside the save/load directory (PEFT's layout: ``<dir>/<name>``). It must therefore never
escape that directory or break a module key.
"""

from __future__ import annotations

import os

BASE = "__base__"  # adapter_batch's name for "no adapter"; never an adapter's name

_SEPARATORS = tuple(sorted({"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())))


def adapter_name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid adapter name, or None when it is."""
    if not isinstance(name, str):
        return f"expected a str, got {type(name).__name__}"
    if not name.strip():
        return "expected a non-empty name that is not only whitespace"
    bad = [c for c in name if ord(c) < 32 or ord(c) == 127]
    if bad:
        return f"expected no NUL or control characters, found {bad[0]!r}"
    if os.path.isabs(name):
        return "expected a relative name, not an absolute path"
    sep = next((s for s in _SEPARATORS if s in name), None)
    if sep is not None:
        return f"expected no path separator, found {sep!r}"
    if name in (".", ".."):
        return "expected a name, not a '.' or '..' path component"
    if "." in name:
        return "expected no '.' (names are module keys)"
    if name == BASE:
        return f"{BASE!r} is reserved (adapter_batch's name for rows without an adapter)"
    return None


def check_adapter_name(name: object, where: str) -> str:
    """Return ``name`` if it is a valid adapter name, else raise ``ValueError`` saying which rule."""
    problem = adapter_name_problem(name)
    if problem is not None:
        raise ValueError(f"{where}: invalid adapter name {name!r}: {problem}")
    return name


def adapter_name_list(names: object, where: str) -> list[str]:
    """``names`` (one name or an iterable of names) as a list; ``TypeError`` for anything else."""
    if isinstance(names, str):
        return [names]
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return list(names)
    raise TypeError(f"{where}: expected an adapter name or a list of names, got {names!r}")
