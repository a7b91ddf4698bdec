"""``dogpile.cache.dbm``: a file, shared by the processes of one host through its file locks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import unquote, urlsplit

from declcache._private_apis import dbm_opener
from declcache.backends._arguments import ANY, TEXT
from declcache.backends._base import Backend

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dogpile.cache.region import CacheRegion

    from declcache._api import Swap, Write
    from declcache.backends._arguments import Options

__all__ = ["Dbm", "DbmStore"]


class DbmStore:
    """dogpile's dbm file: every step inside one open of the file under its read/write lock.

    The lock is a file lock, so the atomic steps hold between processes on one host too.
    """

    def __init__(self, backend: Any) -> None:
        self._open = dbm_opener(backend)

    @staticmethod
    def _get(db: Any, key: str) -> bytes | None:
        try:
            value: bytes = db[key]
        except KeyError:
            return None
        return value

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read under the shared lock."""
        with self._open(False) as db:
            return [self._get(db, key) for key in keys]

    def write_many(self, entries: Sequence[Write]) -> None:
        """Write in one open of the file, under the exclusive lock; the file has no expiry."""
        with self._open(True) as db:
            for key, value, _ in entries:
                db[key] = value

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        """Set if absent, under the exclusive lock."""
        return self.compare_and_set([(key, None, value)], ttl)[0]

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:  # noqa: ARG002
        """Compare and set under the exclusive lock."""
        results = []
        with self._open(True) as db:
            for key, expected, new in swaps:
                matches = self._get(db, key) == expected
                if matches:
                    db[key] = new
                results.append(matches)
        return results

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove under the exclusive lock."""
        with self._open(True) as db:
            for key in keys:
                if key in db:
                    del db[key]

    def reset_connections(self) -> None:
        """Nothing to reset: the file is opened for every step."""


class Dbm(Backend):
    """``dogpile.cache.dbm``: file I/O, so async callers use a worker thread."""

    #: What dogpile's ``DBMBackend.__init__`` reads (a lock file name, or False for none).
    accepted: ClassVar[Options] = {
        "dogpile_lockfile": ANY,
        "filename": TEXT,
        "lock_factory": ANY,
        "rw_lockfile": ANY,
    }

    @classmethod
    def parse_url(cls, url: str) -> dict[str, Any]:
        """``file:///path/cache.dbm``."""
        parts = urlsplit(url)
        if parts.netloc not in {"", "localhost"}:
            raise ValueError(
                f"{url!r} names host {parts.netloc!r}; a file URL is file:///absolute/path.dbm"
            )
        path = unquote(parts.path)
        if not path or path.endswith("/"):
            raise ValueError("no file name in file:///path/cache.dbm")
        return {"filename": path}

    def store(self, region: CacheRegion) -> DbmStore:
        """Atomic steps under dogpile's file lock."""
        return DbmStore(region.backend)
