"""Any other dogpile backend (a third-party plugin): its serialized API, atomic per process only."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from declcache.backends._base import Backend

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dogpile.cache.region import CacheRegion

    from declcache._api import Swap, Write

__all__ = ["Generic", "SerializedStore"]

logger = logging.getLogger("declcache.store")


class SerializedStore:
    """A third-party dogpile backend through its serialized API.

    It offers no atomic step, so set-if-absent and compare-and-set are a read then a write
    under a lock of this process: correct between threads, racy between processes (a warning
    says so when the store is made).
    """

    def __init__(self, backend: Any) -> None:
        from dogpile.cache.api import NO_VALUE  # noqa: PLC0415

        self._backend = backend
        self._no_value = NO_VALUE
        self._lock = threading.Lock()
        logger.warning(
            "%s has no atomic set-if-absent: fills after a concurrent invalidation "
            "are refused only within one process",
            type(backend).__name__,
        )

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The backend's serialized multi-get."""
        values = self._backend.get_serialized_multi(list(keys))
        return [None if value is self._no_value else value for value in values]

    def write_many(self, entries: Sequence[Write]) -> None:
        """One serialized multi-set: the backend expires entries by its own region ttl."""
        with self._lock:
            self._backend.set_serialized_multi({key: value for key, value, _ in entries})

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        """Set if absent (within this process)."""
        return self.compare_and_set([(key, None, value)], ttl)[0]

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:  # noqa: ARG002
        """Compare and set (within this process)."""
        results = []
        with self._lock:
            for key, expected, new in swaps:
                current = self._backend.get_serialized(key)
                matches = (None if current is self._no_value else current) == expected
                if matches:
                    self._backend.set_serialized(key, new)
                results.append(matches)
        return results

    def delete_many(self, keys: Sequence[str]) -> None:
        """The backend's multi-delete."""
        with self._lock:
            self._backend.delete_multi(list(keys))

    def reset_connections(self) -> None:
        """Nothing declcache knows how to reset."""


class Generic(Backend):
    """A dogpile backend declcache has no module for."""

    def store(self, region: CacheRegion) -> SerializedStore:
        """Its serialized API, under a lock of this process."""
        return SerializedStore(region.backend)
