"""A bounded, thread-safe mapping that forgets its least recently used entries.

dogpile's memory backend keeps whatever it is given as ``cache_dict`` forever; a long-running
process caching a large table would grow without end. declcache hands it an :class:`LRUDict`
instead, so the process keeps at most ``DECLCACHE_MEMORY_MAX_ENTRIES`` entries.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from typing import Any

__all__ = ["DEFAULT_MEMORY_MAX_ENTRIES", "LRUDict"]

#: Entries the memory backend keeps unless configured.
DEFAULT_MEMORY_MAX_ENTRIES = 10_000


class LRUDict(MutableMapping[str, Any]):
    """A mapping of at most ``max_entries`` keys; a read or write makes a key the newest.

    Args:
        max_entries: how many keys it keeps; writing one more drops the least recently used.

    Raises:
        ValueError: ``max_entries`` is less than 1.
    """

    def __init__(self, max_entries: int = DEFAULT_MEMORY_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.evictions = 0
        self._data: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __getitem__(self, key: str) -> Any:
        with self._lock:
            value = self._data[key]
            self._data.move_to_end(key)
            return value

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (now the most recently used), or ``default``."""
        with self._lock:
            try:
                value = self._data[key]
            except KeyError:
                return default
            self._data.move_to_end(key)
            return value

    def __setitem__(self, key: str, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
                self.evictions += 1

    def __delitem__(self, key: str) -> None:
        with self._lock:
            del self._data[key]

    def pop(self, key: str, *default: Any) -> Any:
        """Remove ``key`` and return its value (or ``default`` when given and absent)."""
        with self._lock:
            return self._data.pop(key, *default)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)
