"""``dogpile.cache.memory``: a dict in this process, bounded, guarded by a lock for atomic steps.

dogpile's memory backend keeps whatever it is given as ``cache_dict`` forever; a long-running
process caching a large table would grow without end. declcache hands it a
:class:`BoundedDict` of ``DECLCACHE_MEMORY_MAX_ENTRIES`` entries instead (unless the arguments
name a ``cache_dict`` of their own), shared by every model of one manager.

Its eviction keeps the guards of the stale-fill race: a tombstone (or token) evicted while a
reader is between its look-up and its fill would let that reader's compare-and-set, which
expects the key empty, store the old row. So entries (what fills write) are evicted first,
and a *marker* (what :meth:`MemoryStore.write_many` and :meth:`MemoryStore.add` write:
tombstones, tokens, and conservatively list results and warmed entries) only when no entry
is left; then the oldest marker goes, which is harmless once its ttl has passed (no read in
flight is that old) and otherwise counted in :attr:`BoundedDict.guard_evictions`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, ClassVar

import cachetools

from declcache._private_apis import cache_items, lru_order
from declcache.backends._arguments import ANY
from declcache.backends._base import Backend

if TYPE_CHECKING:
    from collections.abc import Iterator, MutableMapping, Sequence

    from dogpile.cache.region import CacheRegion

    from declcache._api import Swap, Write
    from declcache.backends._arguments import Options
    from declcache.backends._base import BackendSettings

__all__ = ["BoundedDict", "Memory", "MemoryStore"]

_ABSENT = object()


class BoundedDict(cachetools.LRUCache[str, Any]):
    """cachetools' LRU cache, safe between threads, that counts what it drops.

    A read or write makes a key the most recently used; a write beyond ``maxsize`` keys drops
    the least recently used *entry* first, so the bound holds at every moment. Keys written
    with :meth:`mark` (tombstones, tokens) are dropped only when no entry is left, the
    oldest marked first: entries go before the markers that guard them.

    Args:
        maxsize: how many keys it keeps.

    Raises:
        ValueError: ``maxsize`` is less than 1.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"max_entries must be at least 1, got {maxsize}")
        super().__init__(maxsize)
        self._lock = threading.RLock()
        self._items = cache_items(self)
        self._order = lru_order(self)
        #: Marked keys, oldest marked first, and when each may go (monotonic).
        self._markers: OrderedDict[str, float] = OrderedDict()
        self.evictions = 0
        #: Markers evicted before their ttl ran out: a reader in flight could have needed one.
        self.guard_evictions = 0

    @property
    def max_entries(self) -> int:
        """How many keys it keeps."""
        return int(self.maxsize)

    def __getitem__(self, key: str) -> Any:
        with self._lock:
            return super().__getitem__(key)

    def __setitem__(self, key: str, value: Any) -> None:
        with self._lock:
            super().__setitem__(key, value)
            self._markers.pop(key, None)

    def __delitem__(self, key: str) -> None:
        with self._lock:
            super().__delitem__(key)
            self._markers.pop(key, None)

    def mark(self, key: str, value: Any, ttl: float) -> None:
        """Write ``value`` as a marker that guards entries: kept while any entry is left.

        ``ttl``: seconds it is needed; after that it is the first marker to go.
        """
        with self._lock:
            self[key] = value
            self._markers[key] = time.monotonic() + ttl

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return super().__contains__(key)

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(super().__iter__()))

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (now the most recently used), or ``default``.

        One lookup under the lock, not cachetools' ``in`` then ``[]``: every hit calls it.
        """
        with self._lock:
            try:
                return cachetools.LRUCache.__getitem__(self, key)
            except KeyError:
                return default

    def get_many(self, keys: Sequence[str]) -> list[Any]:
        """The values of ``keys`` (``None`` where absent), each now the most recently used.

        The hit path: one hold of the lock, and cachetools' own dicts read directly.
        """
        items, order = self._items, self._order
        found: list[Any] = []
        with self._lock:
            for key in keys:
                value = items.get(key, _ABSENT)
                if value is _ABSENT:
                    found.append(None)
                else:
                    order.move_to_end(key)
                    found.append(value)
        return found

    def pop(self, key: str, *default: Any) -> Any:
        """Remove ``key`` and return its value (or ``default`` when given and absent)."""
        with self._lock:
            return super().pop(key, *default)

    def popitem(self) -> tuple[str, Any]:
        """Drop the least recently used entry, else the oldest marker; counted.

        Markers met while looking for an entry are moved to the recent end, so the next
        eviction does not walk over them again.
        """
        with self._lock:
            markers = self._markers
            if not self._items:
                raise KeyError("popitem(): the cache is empty")
            if len(markers) < len(self._items):
                skipped = []
                victim = ""
                for key in self._order:
                    if key not in markers:
                        victim = key
                        break
                    skipped.append(key)
                for key in skipped:
                    self._order.move_to_end(key)
            else:
                victim, until = next(iter(markers.items()))
                if until > time.monotonic():
                    self.guard_evictions += 1
            value = self.pop(victim)
            self.evictions += 1
            return victim, value


class MemoryStore:
    """The dict behind dogpile's memory backend, guarded by one lock for the atomic steps."""

    def __init__(self, data: MutableMapping[str, Any]) -> None:
        self._data = data
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Plain reads, each one atomic (the bounded dict's, all under one hold of its lock)."""
        data = self._data
        if type(data) is BoundedDict:
            return data.get_many(keys)
        get = data.get
        return [get(key) for key in keys]

    def write_many(self, entries: Sequence[Write]) -> None:
        """Write under the lock so a concurrent compare-and-set sees all or nothing.

        What is written this way (tombstones, tokens, lists) is kept as a marker in a
        :class:`BoundedDict`: evicted after every entry.
        """
        with self._lock:
            for key, value, ttl in entries:
                self._put_marker(key, value, ttl)

    def _put_marker(self, key: str, value: bytes, ttl: int) -> None:
        data = self._data
        if type(data) is BoundedDict:
            data.mark(key, value, ttl)
        else:
            data[key] = value

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        """Set if absent, under the lock; a marker (a token), as :meth:`write_many`."""
        with self._lock:
            if key in self._data:
                return False
            self._put_marker(key, value, ttl)
            return True

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:  # noqa: ARG002
        """Compare and set each key, under the lock."""
        results = []
        with self._lock:
            for key, expected, new in swaps:
                matches = self._data.get(key) == expected
                if matches:
                    self._data[key] = new
                results.append(matches)
        return results

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove under the lock."""
        with self._lock:
            for key in keys:
                self._data.pop(key, None)

    def reset_connections(self) -> None:
        """Nothing to reset: there is no connection."""


class Memory(Backend):
    """``dogpile.cache.memory``: per process, never blocks."""

    blocking = False
    accepted: ClassVar[Options] = {"cache_dict": ANY}  # dogpile's MemoryBackend reads nothing else

    def __init__(self, name: str, arguments: Any, settings: BackendSettings) -> None:
        super().__init__(name, arguments, settings)
        given = self.arguments.get("cache_dict")
        self.data: MutableMapping[str, Any] = (
            given if given is not None else BoundedDict(settings.memory_max_entries)
        )
        self._store = MemoryStore(self.data)

    @classmethod
    def parse_url(cls, url: str) -> dict[str, Any]:
        """``memory://``: no arguments."""
        del url
        return {}

    def region_arguments(self, ttl: int, first: CacheRegion | None) -> dict[str, Any]:
        """Every region of this manager stores into the one bounded dict."""
        return {**super().region_arguments(ttl, first), "cache_dict": self.data}

    def store(self, region: CacheRegion) -> MemoryStore:
        """Atomic steps on the shared dict: one store, one lock, for every model."""
        del region
        return self._store
