"""Memcached: pymemcache through dogpile (``dogpile.cache.pymemcache``, alias ``…memcached``).

dogpile's pymemcache backend passes no socket timeouts on, so declcache configures its own
subclass (:mod:`declcache.backends._pymemcache`) instead. Every value is bytes declcache encoded
itself: the client gets a bytes-only serde, which never unpickles a foreign value.

Memcached reads an expiry above 30 days as a Unix time, so a model ttl (or a token's ten ttls)
of more than 30 days, passed on as seconds, would be a date in 1970: the server would drop
every write at once and the model would never hit. :func:`memcached_expiry` turns such an
expiry into the absolute time it means, and every write goes through it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from declcache.backends import _urls
from declcache.backends._arguments import (
    ANY,
    EXPIRY,
    FLAG,
    NODES,
    TEXT,
    Seconds,
    Whole,
)
from declcache.backends._base import Backend
from declcache.backends._generic import Generic

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dogpile.cache.region import CacheRegion

    from declcache._api import Swap, Write
    from declcache.backends._arguments import Options

__all__ = ["BMemcached", "BytesOnlySerde", "MemcachedStore", "PyMemcache", "memcached_expiry"]

#: The plugin name of :mod:`declcache.backends._pymemcache`'s backend.
PYMEMCACHE_WITH_TIMEOUTS = "declcache.pymemcache"
#: Seconds a Memcached node taken out of the ring stays out before it is tried again.
DEFAULT_MEMCACHED_DEAD_TIMEOUT = 10
#: The longest expiry Memcached reads as seconds from now; a larger one is a Unix time.
RELATIVE_EXPIRY_LIMIT = 30 * 86_400
#: The latest Unix time Memcached takes as an expiry: its text protocol reads a 32-bit number.
LATEST_EXPIRY = 2**31 - 1

#: What both dogpile Memcached backends read.
_COMMON: Options = {
    "distributed_lock": FLAG,
    # declcache's fill lock reads these two (declcache._fill_lock); dogpile ignores them
    "lock_blocking_timeout": Seconds(zero_allowed=True),
    "lock_sleep": Seconds(),
    # dogpile's lock is a Memcached ``add`` with this expiry: whole seconds, 0 for none
    "lock_timeout": Whole(0, RELATIVE_EXPIRY_LIMIT),
    "memcached_expire_time": EXPIRY,
    "tls_context": ANY,
    "url": NODES,
}


def memcached_expiry(ttl: int, now: float | None = None) -> int:
    """The expiry Memcached must be sent for a key to live ``ttl`` seconds.

    Up to 30 days it is ``ttl`` itself; beyond, the Unix time ``ttl`` seconds from ``now``
    (this host's clock; a skew of seconds against the server's does not matter at 30 days),
    at most :data:`LATEST_EXPIRY`. declcache checks every entry's age against its ttl itself,
    so the server's expiry only has to be no earlier than that.
    """
    if ttl <= RELATIVE_EXPIRY_LIMIT:
        return ttl
    return min(int(time.time() if now is None else now) + ttl, LATEST_EXPIRY)


class BytesOnlySerde:
    """pymemcache serde that stores and returns bytes and never unpickles a foreign value."""

    def serialize(self, _key: str, value: Any) -> tuple[bytes, int]:
        """Store bytes as they are; declcache encoded them already."""
        if isinstance(value, str):
            value = value.encode()
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value).encode()  # dogpile's memcached lock stores the integer 1
        if not isinstance(value, bytes):
            raise TypeError(f"declcache stores bytes only, got {type(value).__name__}")
        return value, 0

    def deserialize(self, _key: str, value: bytes, _flags: int) -> bytes:
        """Return the raw bytes whatever their flags: decoding is declcache's job."""
        return value


class MemcachedStore:
    """Memcached through pymemcache: ``get_many``, ``add`` and ``gets``/``cas``."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend  # its ``client`` is thread-local: fetch it per call

    def reset_connections(self) -> None:
        """Close every thread's client; each reconnects on its next call."""
        self._backend.close_clients()

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One multi-get."""
        found = self._backend.client.get_many(keys)
        return [found.get(key) for key in keys]

    @staticmethod
    def _set_many(client: Any, mapping: dict[str, bytes], ttl: int) -> None:
        failed = client.set_many(mapping, expire=ttl, noreply=False)
        if failed:
            raise ConnectionError(f"memcached did not store {len(failed)} keys")

    def write_many(self, entries: Sequence[Write]) -> None:
        """One acknowledged multi-set per distinct ttl: the fewest pymemcache allows.

        pymemcache gives a whole ``set_many`` one expiry, and pipelining the other batches as
        ``noreply`` is not an option: memcached then drops a refused store without a word,
        and a lost tombstone would let a stale row back in.
        """
        latest = {key: (value, ttl) for key, value, ttl in entries}  # the last write wins
        batches: dict[int, dict[str, bytes]] = {}
        for key, (value, ttl) in latest.items():
            batches.setdefault(ttl, {})[key] = value
        client = self._backend.client
        for ttl, batch in batches.items():
            self._set_many(client, batch, memcached_expiry(ttl))

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        """Memcached ``add``."""
        expire = memcached_expiry(ttl)
        return bool(self._backend.client.add(key, value, expire=expire, noreply=False))

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:
        """``add`` where the reader saw nothing, else ``gets`` then ``cas``.

        ``cas`` alone only says nobody wrote since the ``gets``; the value read by ``gets``
        must also still be the one the reader saw before it queried the database.
        """
        client = self._backend.client
        ttl = memcached_expiry(ttl)
        results = []
        for key, expected, new in swaps:
            if expected is None:
                results.append(bool(client.add(key, new, expire=ttl, noreply=False)))
                continue
            current, token = client.gets(key)
            results.append(
                current == expected and bool(client.cas(key, new, token, expire=ttl, noreply=False))
            )
        return results

    def delete_many(self, keys: Sequence[str]) -> None:
        """One multi-delete."""
        self._backend.client.delete_many(list(keys), noreply=False)


def _memcached_arguments(arguments: dict[str, Any], ttl: int) -> dict[str, Any]:
    """The server expiry of what dogpile writes itself, fixed when the region is configured.

    It cannot be an absolute time then, so it stops at 30 days; declcache's own writes go
    through :func:`memcached_expiry` instead.
    """
    arguments.setdefault(
        "memcached_expire_time", min(Backend.server_ttl(ttl), RELATIVE_EXPIRY_LIMIT)
    )
    return arguments


class PyMemcache(Backend):
    """``dogpile.cache.pymemcache``: declcache's subclass of it, with socket timeouts."""

    #: dogpile's ``PyMemcacheBackend.__init__`` reads these; declcache's subclass adds the
    #: two timeouts.
    accepted: ClassVar[Options] = {
        **_COMMON,
        "connect_timeout": Seconds(),
        "default_noreply": FLAG,
        "do_not_retry_for": ANY,
        "enable_retry_client": FLAG,
        "hashclient_dead_timeout": Seconds(zero_allowed=True),
        "hashclient_retry_attempts": Whole(0, 100),
        "hashclient_retry_timeout": Seconds(zero_allowed=True),
        "retry_attempts": Whole(1, 100),
        "retry_delay": Seconds(zero_allowed=True),
        "retry_for": ANY,
        "serde": ANY,
        "socket_keepalive": ANY,
        "timeout": Seconds(),
    }

    @classmethod
    def parse_url(cls, url: str) -> dict[str, Any]:
        """``memcached://host:port[,host:port][?option=value]``."""
        netloc = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
        if "@" in netloc:
            raise ValueError("a memcached:// URL has no user or password: pymemcache has no login")
        nodes = _urls.nodes(netloc, 11211, "memcached://host:port[,host:port]")
        return {"url": nodes, **cls.query_options(urlsplit(url).query)}

    def plugin(self) -> str:
        """Registers and names declcache's backend with timeouts."""
        from dogpile.cache import register_backend  # noqa: PLC0415 - only with dogpile present

        register_backend(  # type: ignore[no-untyped-call]
            PYMEMCACHE_WITH_TIMEOUTS, "declcache.backends._pymemcache", "PyMemcacheBackend"
        )
        return PYMEMCACHE_WITH_TIMEOUTS

    def region_arguments(self, ttl: int, first: CacheRegion | None) -> dict[str, Any]:
        """Server expiry, a bytes-only serde, and a dead node's time out of the ring."""
        result = _memcached_arguments(super().region_arguments(ttl, first), ttl)
        result.setdefault("serde", BytesOnlySerde())
        # A node that keeps failing leaves the hash ring (its keys go to the others) and is
        # tried again after this long; pymemcache's default is a minute.
        result.setdefault("hashclient_dead_timeout", DEFAULT_MEMCACHED_DEAD_TIMEOUT)
        return result

    def store(self, region: CacheRegion) -> MemcachedStore:
        """``add`` and ``gets``/``cas`` on the region's per-thread clients."""
        return MemcachedStore(region.backend)


class BMemcached(Generic):
    """``dogpile.cache.bmemcached``: server expiry only; no atomic steps declcache can use."""

    accepted: ClassVar[Options] = {**_COMMON, "username": TEXT, "password": TEXT}

    def region_arguments(self, ttl: int, first: CacheRegion | None) -> dict[str, Any]:
        """Every key expires on the server too."""
        return _memcached_arguments(super().region_arguments(ttl, first), ttl)
