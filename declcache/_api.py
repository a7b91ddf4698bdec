"""Shared contracts: sentinels, type aliases and the store protocols. No I/O, no package imports.

A *store* is declcache's view of one backend: the few atomic operations the no-stale-fill
guarantee needs (dogpile's region API has ``get``/``set``/``delete`` but no "set if absent" and
no "compare and set"). Each backend module provides a :class:`Store`; async callers get an
:class:`AsyncStore` with the same methods, native where the client has an asyncio API and a
thread or inline adapter otherwise (``declcache.backends``). Values are the raw bytes of
:mod:`declcache._payload`; ``None`` means "no value". Every method may raise the client's own
errors: the caller degrades to the database.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeAlias

__all__ = ["AsyncStore", "Ident", "Lookup", "Store", "Swap", "Write"]


class Lookup(enum.Enum):
    """What a cache lookup found when it found no entity."""

    MISS = "miss"
    """Nothing usable is cached: ask the database."""

    NOT_FOUND = "not_found"
    """The database was asked before and had no such row (``cache_not_found = True``)."""


#: How a caller names one entity: a primary-key value, a tuple of them for a composite
#: primary key, or a mapping ``{field: value}`` of the primary key or of a ``key_fields`` set.
Ident: TypeAlias = Any | tuple[Any, ...] | Mapping[str, Any]

#: One compare-and-set: ``(key, expected raw value or None for absent, new raw value)``.
Swap: TypeAlias = tuple[str, bytes | None, bytes]

#: One unconditional write: ``(key, raw value, seconds it lives on the server)``.
Write: TypeAlias = tuple[str, bytes, int]


class Store(Protocol):
    """Atomic access to one backend, for threads."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Raw values in the order of ``keys``, ``None`` where absent."""

    def write_many(self, entries: Sequence[Write]) -> None:
        """Write unconditionally, in as few round trips as the backend allows."""

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        """Write ``value`` only if ``key`` is absent; whether it was written."""

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:
        """For each swap, write the new value only if the key still holds the expected one."""

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove keys; absent keys are fine."""

    def reset_connections(self) -> None:
        """Drop pooled connections; each reconnects on its next use."""


class AsyncStore(Protocol):
    """:class:`Store` for coroutines: the same operations, awaited without blocking the loop."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """See :meth:`Store.get_many`."""

    async def write_many(self, entries: Sequence[Write]) -> None:
        """See :meth:`Store.write_many`."""

    async def add(self, key: str, value: bytes, ttl: int) -> bool:
        """See :meth:`Store.add`."""

    async def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:
        """See :meth:`Store.compare_and_set`."""

    async def delete_many(self, keys: Sequence[str]) -> None:
        """See :meth:`Store.delete_many`."""

    async def reset_connections(self) -> None:
        """See :meth:`Store.reset_connections`."""
