"""dogpile's pymemcache backend with socket timeouts, which dogpile does not pass on.

Without them a Memcached that stops answering (a paused VM, a full network buffer) blocks every
cache call — and so every commit's invalidation — forever. declcache configures this backend
whenever ``dogpile.cache.pymemcache`` (or its alias ``dogpile.cache.memcached``) is asked for;
dogpile loads this module only then.
"""

from __future__ import annotations

from typing import Any

import pymemcache.client.hash
from dogpile.cache.backends.memcached import PyMemcacheBackend as _DogpilePyMemcacheBackend

__all__ = ["DEFAULT_MEMCACHED_TIMEOUT", "PyMemcacheBackend"]

#: Seconds to connect and to wait for an answer unless configured.
DEFAULT_MEMCACHED_TIMEOUT = 0.5


class PyMemcacheBackend(_DogpilePyMemcacheBackend):
    """dogpile's backend, building its HashClient with ``connect_timeout`` and ``timeout``."""

    def __init__(self, arguments: dict[str, Any]) -> None:
        arguments = dict(arguments)
        self.connect_timeout = arguments.pop("connect_timeout", DEFAULT_MEMCACHED_TIMEOUT)
        self.timeout = arguments.pop("timeout", DEFAULT_MEMCACHED_TIMEOUT)
        super().__init__(arguments)  # type: ignore[no-untyped-call]

    def _create_client(self) -> Any:
        return pymemcache.client.hash.HashClient(
            self.url,
            serde=self.serde,
            default_noreply=self.default_noreply,
            tls_context=self.tls_context,
            retry_attempts=self.hashclient_retry_attempts,
            retry_timeout=self.hashclient_retry_timeout,
            dead_timeout=self.dead_timeout,
            connect_timeout=self.connect_timeout,
            timeout=self.timeout,
        )
