"""One registry mechanism for everything the toolkit looks up by name: components of each recipe slot,
attention backends, checkpoint converters and benchmark suites.

A :class:`Registry` holds named entries of one kind, in registration order (attention dispatch tries backends
in that order). Built-in entries are registered when their modules are imported; the registry imports them
(``builtins``) and then the modules of its Python entry-point group (``vla_blocks.<kind>s``) on first lookup,
so a third-party package adds a component, backend, converter or suite by declaring an entry point::

    # pyproject.toml of a plug-in package
    [project.entry-points."vla_blocks.attention_backends"]
    my_kernel = "my_pkg.attention"          # a module that calls vla_blocks.attention.register_backend(...)

An entry point may also name the object itself (``"my_pkg.suites:my_suite"``); it is then registered under the
entry point's name. An unknown name is a :class:`UnknownNameError` listing the closest names and every valid one.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, Iterator, Sequence, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(KeyError):
    """A name that is not registered; the message suggests the closest registered names."""

    def __str__(self) -> str:  # KeyError quotes its message: show it plainly
        return str(self.args[0]) if self.args else ""


def suggest(word: str, choices) -> str:
    """``"; did you mean 'x'? (valid: …)"`` for an unknown ``word``."""
    choices = sorted(str(c) for c in choices)
    close = difflib.get_close_matches(str(word), choices, n=3, cutoff=0.5)
    s = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return s + f" (valid: {', '.join(choices) or 'none registered'})"


class Registry(Generic[T]):
    """Named entries of one ``kind`` (e.g. ``"attention backend"``), filled by importing ``builtins`` and the
    modules of the entry-point ``group`` once, before the first lookup.

    ``check(obj)`` (optional) validates an entry at registration and raises ``TypeError`` with the reason.
    Example::

        SUITES = Registry("benchmark suite", group="vla_blocks.bench_suites", builtins=["vla_blocks.bench"])
        SUITES.register("attention", "benchmarks/attention.py")
        SUITES.get("atention")   # UnknownNameError: unknown benchmark suite 'atention'; did you mean 'attention'?
    """

    def __init__(self, kind: str, group: str | None = None, builtins: Sequence[str] = (),
                 check: Callable[[T], None] | None = None):
        self.kind, self.group, self.builtins, self.check = kind, group, tuple(builtins), check
        self._entries: dict[str, T] = {}
        self._loaded = False
        self._loading = False

    # -- registration ------------------------------------------------------------------------------
    def register(self, name: str, obj: T | None = None, *, before: str | None = None, replace: bool = False):
        """Register ``obj`` as ``name`` (or use as a decorator: ``@registry.register("name")``). ``before``
        inserts it ahead of an existing entry (dispatch order); re-registering a name needs ``replace=True`` and
        keeps the entry's place."""
        if obj is None:
            return lambda o: self.register(name, o, before=before, replace=replace) or o
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} names are non-empty strings, got {name!r}")
        if name in self._entries and not replace and self._entries[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered (pass replace=True to override it)")
        if self.check is not None:
            self.check(obj)
        if name in self._entries:  # a replacement keeps its place in the order
            self._entries[name] = obj
            return obj
        entries = dict(self._entries)
        if before is not None and before in entries:
            items = list(entries.items())
            at = [k for k, _ in items].index(before)
            entries = dict(items[:at] + [(name, obj)] + items[at:])
        else:
            entries[name] = obj
        self._entries = entries
        return obj

    def unregister(self, name: str) -> T:
        """Remove and return an entry (tests, plug-ins replacing a built-in)."""
        self._load()
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}{suggest(name, self._entries)}")
        return self._entries.pop(name)

    # -- lookup ------------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        """The entry ``name``; an :class:`UnknownNameError` with suggestions if there is none."""
        self._load()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(f"unknown {self.kind} {name!r}{suggest(name, self._entries)}") from None

    def names(self) -> list[str]:
        """Registered names in registration (dispatch) order."""
        self._load()
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs in registration order."""
        self._load()
        return list(self._entries.items())

    def values(self) -> list[T]:
        """Entries in registration order."""
        self._load()
        return list(self._entries.values())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

    # -- loading -----------------------------------------------------------------------------------
    def _load(self):
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            for mod in self.builtins:
                importlib.import_module(mod)
            if self.group:
                from importlib.metadata import entry_points
                for ep in entry_points(group=self.group):
                    obj = ep.load()
                    if ":" in ep.value and ep.name not in self._entries:  # an object, not a module
                        self.register(ep.name, obj)
            self._loaded = True
        finally:
            self._loading = False
