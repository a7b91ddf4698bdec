"""Cache look-ups awaited on the event loop, for the async repositories on Redis.

A look-up is one ``MGET``. Run in a worker thread (as every other backend call of an async
repository is), it costs a thread hop and holds the GIL against the loop; awaited through
``redis.asyncio`` it costs neither. Only the look-up is awaited this way: fills, tokens and
invalidations stay on the sync client, whose atomic steps the no-stale-fill guarantee rests
on, and anything unusual (a pointer to follow, a token to create) falls back to the thread.

The async client mirrors the sync client's connection (address, credentials, TLS, timeouts,
no retries). redis.asyncio connections belong to the loop that opened them, so each event
loop gets its own client. Calls go through the manager's circuit breaker like sync ones.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from typing import TYPE_CHECKING, Any

from declcache._breaker import BackendUnavailable

if TYPE_CHECKING:
    from collections.abc import Sequence

    from declcache._breaker import Breaker

__all__ = ["AsyncReader", "async_reader_for"]

logger = logging.getLogger("declcache.store")


class AsyncReader:
    """``MGET`` through ``redis.asyncio``, one client per event loop, behind the breaker.

    Args:
        connection_class: the ``redis.asyncio`` connection class matching the sync one.
        connection_kwargs: the sync pool's connection arguments this class accepts.
        breaker: the manager's breaker, shared with the sync stores.
    """

    def __init__(
        self, connection_class: type, connection_kwargs: dict[str, Any], breaker: Breaker
    ) -> None:
        self._connection_class = connection_class
        self._connection_kwargs = connection_kwargs
        self._breaker = breaker
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            import redis.asyncio  # noqa: PLC0415 - only for Redis backends

            pool = redis.asyncio.ConnectionPool(
                connection_class=self._connection_class, **self._connection_kwargs
            )
            client = self._clients[loop] = redis.asyncio.Redis(connection_pool=pool)
        return client

    async def aclose(self) -> None:
        """Close the running loop's client; forget the other loops' (they close with them)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        self._clients.clear()
        if client is not None:  # the pool was handed to the client, which leaves it open
            await client.connection_pool.disconnect()

    def forget(self) -> None:
        """Drop every loop's client without awaiting it: for a close outside any loop."""
        self._clients.clear()

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Raw values in the order of ``keys`` (``None`` where absent), in one ``MGET``.

        Raises:
            BackendUnavailable: the breaker is open; the backend was not called.
            Exception: whatever redis-py raised (the breaker counts it).
        """
        admitted = self._breaker.admit()
        if admitted is None:
            raise BackendUnavailable("circuit breaker open: cache backend not called")
        client = self._client()
        if admitted == "probe":  # pooled connections may lead to a server since restarted
            await client.connection_pool.disconnect()
        started = self._breaker.now()
        try:
            values: list[bytes | None] = await client.mget(keys)
        except Exception as error:
            self._breaker.failed(error, started)
            raise
        self._breaker.succeeded(started)
        return values


def async_reader_for(backend: Any, breaker: Breaker) -> AsyncReader | None:
    """An :class:`AsyncReader` on the server ``backend`` (dogpile's) talks to, if it can have one.

    Only a single Redis server: a cluster routes keys per slot and Sentinel elects the
    server, which the sync client does for the thread fallback. ``None`` otherwise, or when
    the sync connection is of a kind redis.asyncio has no counterpart for.
    """
    client = getattr(backend, "reader_client", None)
    if client is None or type(client).__name__ != "Redis":
        return None
    try:
        import redis  # noqa: PLC0415 - only for Redis backends
        import redis.asyncio  # noqa: PLC0415
        from redis.asyncio.retry import Retry  # noqa: PLC0415
        from redis.backoff import NoBackoff  # noqa: PLC0415
    except ImportError:  # pragma: no cover - redis-py always ships redis.asyncio
        return None
    counterparts = {
        redis.Connection: redis.asyncio.Connection,
        redis.SSLConnection: redis.asyncio.SSLConnection,
        redis.UnixDomainSocketConnection: redis.asyncio.UnixDomainSocketConnection,
    }
    pool = client.connection_pool
    connection_class = counterparts.get(pool.connection_class)
    if connection_class is None:
        return None
    accepted = _parameters(connection_class)
    kwargs = {
        name: value
        for name, value in pool.connection_kwargs.items()
        if name in accepted and (name in _MIRRORED or name.startswith("ssl_"))
    }
    kwargs["retry"] = Retry(NoBackoff(), 0)  # one attempt: a fault falls back to the database
    return AsyncReader(connection_class, kwargs, breaker)


#: The sync connection's arguments the async one takes over (besides ``ssl_*``): where and
#: as whom to connect, and how long to wait. Not its helper objects, which are sync-only.
_MIRRORED = frozenset(
    {
        "host",
        "port",
        "path",
        "db",
        "username",
        "password",
        "credential_provider",
        "client_name",
        "protocol",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_keepalive_options",
        "health_check_interval",
    }
)


def _parameters(connection_class: type) -> set[str]:
    """Every keyword the connection class (and the classes it extends) accepts."""
    names: set[str] = set()
    for cls in connection_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            names |= {
                parameter.name
                for parameter in inspect.signature(init).parameters.values()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY
                or parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            }
    names.discard("self")
    return names
