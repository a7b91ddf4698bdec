"""``dogpile.cache.null``: remembers nothing, so every look-up misses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from declcache.backends._base import Backend

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dogpile.cache.region import CacheRegion

    from declcache._api import Swap, Write

__all__ = ["Null", "NullStore"]


class NullStore:
    """Every write is dropped and every read finds nothing."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Nothing is ever found."""
        return [None] * len(keys)

    def write_many(self, entries: Sequence[Write]) -> None:
        """Dropped."""

    def add(self, key: str, value: bytes, ttl: int) -> bool:  # noqa: ARG002
        """Claims success; the value is dropped."""
        return True

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:  # noqa: ARG002
        """Claims success; the values are dropped."""
        return [True] * len(swaps)

    def delete_many(self, keys: Sequence[str]) -> None:
        """Nothing to delete."""

    def reset_connections(self) -> None:
        """Nothing to reset."""


class Null(Backend):
    """``dogpile.cache.null``: caches nothing, never blocks."""

    blocking = False
    keeps_values = False

    @classmethod
    def parse_url(cls, url: str) -> dict[str, Any]:
        """``null://``: no arguments."""
        del url
        return {}

    def store(self, region: CacheRegion) -> NullStore:
        """A store that keeps nothing."""
        del region
        return NullStore()
