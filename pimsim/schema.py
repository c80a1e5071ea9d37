"""Typed, documented settings: how one definition serves the code, the YAML validation and the
README.

Every YAML section is one frozen dataclass whose fields carry their default, a doc string and a
check in the field metadata (``setting``). The code that uses the values is built on those
classes (``pimsim.crossbar.Crossbar`` is the ``crossbar:`` section, ``pimsim.cost.CostParams``
the ``cost:`` section, ``pimsim.reorder.search.ReorderParams`` gives ``evolve`` its defaults,
``pimsim.ptqsl.SearchParams`` the PTQ-SL defaults), and ``pimsim.config`` reads its keys,
defaults, checks and docs from them (``keys_of``). ``tests/test_schema.py`` checks README's
configuration tables against the same definitions.

A check takes a value and returns an error text (``file: key: value: <text>``) or None. The
builders below are the ones shared by several sections; a section may define its own.

This module imports nothing from pimsim, so any module can define its settings with it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable

Check = Callable[[object], "str | None"]


@dataclass(frozen=True)
class Key:
    """One configuration key: its default, a check returning an error text (or None) and a doc."""

    default: object
    check: Check
    doc: str


def _no_check(v) -> None:
    return None


def setting(default=dataclasses.MISSING, doc: str = "", check: Check | None = None, *,
            factory: Callable[[], object] | None = None):
    """A dataclass field with its ``doc`` and ``check`` in the metadata. ``factory`` instead of
    ``default`` for a mutable default (a dict)."""
    if not doc:
        raise ValueError("a setting needs a doc")
    meta = {"doc": doc, "check": check or _no_check}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def default_of(f: dataclasses.Field):
    """The default value of a field (a fresh object for a ``factory`` default)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return copy.deepcopy(f.default)


def keys_of(cls) -> dict[str, Key]:
    """``{field name: Key(default, check, doc)}`` of a settings dataclass, in field order."""
    return {f.name: Key(default_of(f), f.metadata["check"], f.metadata["doc"])
            for f in dataclasses.fields(cls)}


def defaults_of(cls) -> dict:
    """``{field name: default}`` of a settings dataclass, in field order."""
    return {f.name: default_of(f) for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------- shared checks

def int_in(lo: int, hi: int | None = None) -> Check:
    """A Python int in ``lo..hi`` (``hi`` None: no upper bound); bool is not an int here."""
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer{'' if hi is None else f' in {lo}..{hi}'}"
        if v < lo or (hi is not None and v > hi):
            return f"must be in {lo}..{hi}" if hi is not None else f"must be >= {lo}"
        return None
    return check


def optional(check: Check) -> Check:
    """``check``, or None (YAML null) allowed."""
    return lambda v: None if v is None else check(v)


def one_of(options) -> Check:
    options = tuple(options)
    return lambda v: None if v in options else f"must be one of {', '.join(options)}"


def non_empty_str(v) -> str | None:
    return None if isinstance(v, str) and v else "must be a non-empty string"


def positive_number(v) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
        return "must be a positive number"
    return None


def boolean(v) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"
