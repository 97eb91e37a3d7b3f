"""Named registries of extension points: models, aggregation strategies, data sets, client selectors.

Each kind keeps one :class:`Registry`; the built-in entries register themselves through exactly the same
call a user or a plugin makes (``register_model``, ``register_strategy``, ``register_dataset``,
``register_selector``), so a registered name is accepted wherever a built-in one is.
:class:`RegisteredNames` is a live, read-only view of a registry's names (what the CLI lists in its help).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar, overload

from .errors import ConfigError, QflareError

__all__ = ["RegisteredNames", "Registry"]

T = TypeVar("T")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class Registry(Generic[T]):
    """Entries of one kind by name, in registration order.

    ``kind`` names the kind in messages ("model", "strategy", ...).  Lookups are case-insensitive and go
    through ``aliases``; ``unknown`` builds the error raised for a name nobody registered (default:
    :class:`ConfigError` listing the registered names).
    """

    def __init__(self, kind: str, *, unknown: Callable[[str], QflareError] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._unknown = unknown or (lambda text: ConfigError(text))

    def register(self, name: str, entry: T, *, aliases: Sequence[str] = (), replace: bool = False) -> None:
        """Add ``entry`` under ``name`` (and ``aliases``); a taken name raises unless ``replace=True``."""
        for label in (name, *aliases):
            if not isinstance(label, str) or not _NAME.fullmatch(label):
                raise ConfigError(
                    f"{self.kind} name {label!r} must start with a letter or digit and hold only letters, "
                    "digits, '-' or '_'"
                )
        key = name.lower()
        labels = [key, *(a.lower() for a in aliases)]
        for label in labels:
            owner = self._owner(label)
            if owner is None or (replace and owner == key):
                continue
            if replace and label != owner:  # an alias of another entry moves to this one
                continue
            raise ConfigError(
                f"{self.kind} {label!r} is already registered"
                + ("" if replace else " (pass replace=True to override it)"),
                code="duplicate_name",
            )
        self._aliases.pop(key, None)
        self._entries[key] = entry
        for alias in labels[1:]:
            self._aliases[alias] = key

    def _owner(self, label: str) -> str | None:
        if label in self._entries:
            return label
        return self._aliases.get(label)

    def canonical(self, name: str) -> str:
        """The registered name ``name`` refers to (case-insensitive, aliases resolved)."""
        key = name.strip().lower() if isinstance(name, str) else None
        owner = self._owner(key) if key is not None else None
        if owner is None:
            registered = ", ".join(self._entries) or "none"
            raise self._unknown(f"unknown {self.kind} {name!r}; registered: {registered}")
        return owner

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._owner(name.strip().lower()) is not None

    def snapshot(self) -> tuple[dict[str, T], dict[str, str]]:
        """The current entries and aliases, for :meth:`restore` (tests undo their registrations)."""
        return dict(self._entries), dict(self._aliases)

    def restore(self, state: tuple[dict[str, T], dict[str, str]]) -> None:
        entries, aliases = state
        self._entries.clear()
        self._entries.update(entries)
        self._aliases.clear()
        self._aliases.update(aliases)


class RegisteredNames(Sequence[str]):
    """A read-only view of a registry's names that follows later registrations (plugins included).

    Compares equal to a tuple of the same names in the same order.
    """

    def __init__(self, registry: Registry[Any]) -> None:
        self._registry = registry

    def _names(self) -> tuple[str, ...]:
        return self._registry.names()

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...

    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RegisteredNames | tuple | list):
            return self._names() == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._names())
