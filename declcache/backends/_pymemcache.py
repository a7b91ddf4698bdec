"""dogpile's pymemcache backend with socket timeouts, and no key hashing for a single server.

Without timeouts (dogpile does not pass them on) a Memcached that stops answering (a paused VM,
a full network buffer) blocks every cache call — and so every commit's invalidation — forever.
declcache.backends.memcached configures it whenever ``dogpile.cache.pymemcache`` (or its alias
``dogpile.cache.memcached``) is asked for; dogpile loads this module only then.
"""

from __future__ import annotations

import weakref
from typing import Any

import pymemcache.client.base
import pymemcache.client.hash
from dogpile.cache.backends.memcached import PyMemcacheBackend as _DogpilePyMemcacheBackend

__all__ = ["DEFAULT_MEMCACHED_TIMEOUT", "PyMemcacheBackend"]

#: Seconds to connect and to wait for an answer unless configured.
DEFAULT_MEMCACHED_TIMEOUT = 0.5


class PyMemcacheBackend(_DogpilePyMemcacheBackend):
    """dogpile's backend, its clients built with ``connect_timeout`` and ``timeout``.

    With one server the client is pymemcache's plain ``Client``: ``HashClient`` would hash every
    key with a pure-Python murmur3 (about 10 µs per key of declcache's length) only to pick
    the one node there is. dogpile keeps one client per thread, so a plain client, which is
    not thread-safe, is never shared. With several servers it is a ``HashClient``, which
    spreads keys over them and routes around a dead one.
    """

    def __init__(self, arguments: dict[str, Any]) -> None:
        arguments = dict(arguments)
        self.connect_timeout = arguments.pop("connect_timeout", DEFAULT_MEMCACHED_TIMEOUT)
        self.timeout = arguments.pop("timeout", DEFAULT_MEMCACHED_TIMEOUT)
        self._made: weakref.WeakSet[Any] = weakref.WeakSet()  # every thread's client
        super().__init__(arguments)  # type: ignore[no-untyped-call]

    def close_clients(self) -> None:
        """Close every thread's client; each reconnects on its next call (pymemcache does)."""
        for client in list(self._made):
            client.close()

    def _create_client(self) -> Any:
        common = {
            "serde": self.serde,
            "default_noreply": self.default_noreply,
            "tls_context": self.tls_context,
            "connect_timeout": self.connect_timeout,
            "timeout": self.timeout,
        }
        client: Any
        if len(self.url) == 1:
            client = pymemcache.client.base.Client(self.url[0], **common)
        else:
            client = pymemcache.client.hash.HashClient(
                self.url,
                retry_attempts=self.hashclient_retry_attempts,
                retry_timeout=self.hashclient_retry_timeout,
                dead_timeout=self.dead_timeout,
                **common,
            )
        self._made.add(client)
        return client
