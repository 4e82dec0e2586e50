"""One small name table for every "pick a thing by name" choice: backbones, pools, mm configs, engines.

A plain dict with two rules, as torchvision's ``models/_api.py`` and timm's ``_factory.py`` keep
theirs: a name is registered once (a second registration is a programming error, raised at
import), and an unknown name is a :class:`~livelens.errors.ConfigError` that lists the known ones
(a user's typo, raised before any work starts). Entries are registered explicitly next to the
table, never through import side effects elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from livelens.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind.

    Args:
        kind: What the entries are, for messages ("backbone", "pooling", ...).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name`` and return it.

        Raises:
            ValueError: ``name`` is already registered.
        """
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        """The entry called ``name``.

        Raises:
            ConfigError: No such entry; the message lists the known names.
        """
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
