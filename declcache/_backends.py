"""Backend-specific arguments declcache adds to what the user configured.

Every region stores bytes that declcache encoded itself, so no backend may pickle or unpickle
anything: Memcached gets a bytes-only serde. Every key gets a server-side expiry a little longer
than the model's ttl, so nothing stays in a shared server forever. Redis regions of one manager
share one connection pool instead of opening one per model.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "REDIS_BACKENDS",
    "backend_arguments",
    "dogpile_backend_name",
    "share_connections",
]

REDIS_BACKENDS = frozenset(
    {"dogpile.cache.redis", "dogpile.cache.redis_sentinel", "dogpile.cache.redis_cluster"}
)
MEMCACHED_BACKENDS = frozenset(
    {"dogpile.cache.pymemcache", "dogpile.cache.memcached", "dogpile.cache.bmemcached"}
)
#: Seconds a key outlives its ttl on the server: dogpile expires it first (softly), the server
#: then reclaims the memory. Keeps a clock skew between writers from dropping fresh entries.
SERVER_EXPIRY_GRACE = 60
#: The plugin name of :mod:`declcache._pymemcache`'s backend.
PYMEMCACHE_WITH_TIMEOUTS = "declcache.pymemcache"
#: Redis socket timeouts unless configured: a dead cache must cost milliseconds, not minutes.
DEFAULT_REDIS_TIMEOUT = 0.5
#: Seconds a Memcached node taken out of the ring stays out before it is tried again.
DEFAULT_MEMCACHED_DEAD_TIMEOUT = 10
#: Seconds a distributed fill lock lives unless configured: a process that dies holding one
#: must not make the others wait forever (dogpile's default is "never expires").
DEFAULT_LOCK_TIMEOUT = 30


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


def _without_retries(connection_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Connection arguments with redis-py's retries turned off unless the user set some.

    redis-py retries a failed command three times with backoff: seconds per call on a dead
    server. declcache falls back to the database instead, so one attempt is enough.
    """
    if "retry" in connection_kwargs:
        return connection_kwargs
    from redis.backoff import NoBackoff  # noqa: PLC0415 - only for Redis backends
    from redis.retry import Retry  # noqa: PLC0415

    return {**connection_kwargs, "retry": Retry(NoBackoff(), 0)}


def _host_port(node: Any) -> tuple[str, int]:
    """``"host:port"``, ``[host, port]`` or ``{"host": …, "port": …}`` as a pair."""
    if isinstance(node, str):
        host, _, port = node.rpartition(":")
        return host.strip("[]"), int(port)
    if isinstance(node, dict):
        return str(node["host"]), int(node["port"])
    host, port = node
    return str(host), int(port)


#: What dogpile's cluster backend ignores unless it is in ``connection_kwargs``.
_CLUSTER_CONNECTION_ARGUMENTS = (
    "socket_timeout",
    "socket_connect_timeout",
    "username",
    "password",
    "ssl",
)


def _cluster_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """Startup nodes as ``ClusterNode`` objects; timeouts where the cluster client reads them.

    dogpile's cluster backend builds its client from ``url`` or ``startup_nodes`` and
    ``connection_kwargs`` alone, so timeouts and credentials must travel in the latter.
    """
    from redis.cluster import ClusterNode  # noqa: PLC0415 - only for Redis Cluster

    nodes = arguments.get("startup_nodes")
    if nodes is not None:
        pairs = [node if isinstance(node, ClusterNode) else _host_port(node) for node in nodes]
        arguments["startup_nodes"] = [
            pair if isinstance(pair, ClusterNode) else ClusterNode(*pair)  # type: ignore[no-untyped-call]
            for pair in pairs
        ]
    connection_kwargs = dict(arguments["connection_kwargs"])
    for name in _CLUSTER_CONNECTION_ARGUMENTS:
        if arguments.get(name) is not None:
            connection_kwargs.setdefault(name, arguments[name])
    arguments["connection_kwargs"] = connection_kwargs
    return arguments


def _sentinel_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """Sentinels as ``(host, port)`` pairs, asked with the same short timeouts."""
    sentinels = arguments.get("sentinels")
    if sentinels is not None:
        arguments["sentinels"] = [_host_port(node) for node in sentinels]
    sentinel_kwargs = dict(arguments.get("sentinel_kwargs", {}))
    sentinel_kwargs.setdefault("socket_timeout", arguments["socket_timeout"])
    sentinel_kwargs.setdefault("socket_connect_timeout", arguments["socket_connect_timeout"])
    arguments["sentinel_kwargs"] = sentinel_kwargs
    # dogpile turns its region-level lock on for Sentinel; declcache decides that itself.
    arguments.setdefault("distributed_lock", False)
    return arguments


def backend_arguments(backend: str, arguments: dict[str, Any], ttl: int) -> dict[str, Any]:
    """The arguments one model's region is configured with."""
    result = dict(arguments)
    if result.get("distributed_lock"):
        result.setdefault("lock_timeout", DEFAULT_LOCK_TIMEOUT)
    if backend in REDIS_BACKENDS:
        result.setdefault("redis_expiration_time", ttl + SERVER_EXPIRY_GRACE)
        result.setdefault("socket_timeout", DEFAULT_REDIS_TIMEOUT)
        result.setdefault("socket_connect_timeout", DEFAULT_REDIS_TIMEOUT)
        result["connection_kwargs"] = _without_retries(result.get("connection_kwargs", {}))
        if result.get("distributed_lock"):
            # The async repository takes and releases a lock in two worker threads: a
            # thread-local lock token would make the release fail (dogpile warns the same).
            result.setdefault("thread_local_lock", False)
        if backend == "dogpile.cache.redis_cluster":
            result = _cluster_arguments(result)
        elif backend == "dogpile.cache.redis_sentinel":
            result = _sentinel_arguments(result)
    elif backend in MEMCACHED_BACKENDS:
        result.setdefault("memcached_expire_time", ttl + SERVER_EXPIRY_GRACE)
        if backend == "dogpile.cache.pymemcache":
            result.setdefault("serde", BytesOnlySerde())
            # A node that keeps failing leaves the hash ring (its keys go to the others) and
            # is tried again after this long; pymemcache's default is a minute.
            result.setdefault("hashclient_dead_timeout", DEFAULT_MEMCACHED_DEAD_TIMEOUT)
    return result


def dogpile_backend_name(backend: str) -> str:
    """The dogpile plugin that serves ``backend``: ours where dogpile's lacks timeouts."""
    if backend == "dogpile.cache.pymemcache":
        from dogpile.cache import register_backend  # noqa: PLC0415 - only with dogpile present

        register_backend(PYMEMCACHE_WITH_TIMEOUTS, "declcache._pymemcache", "PyMemcacheBackend")  # type: ignore[no-untyped-call]
        return PYMEMCACHE_WITH_TIMEOUTS
    return backend


def share_connections(backend: str, configured: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """Arguments for the next region so it reuses ``configured``'s connections when it can."""
    if backend == "dogpile.cache.redis" and "url" not in arguments:
        client = getattr(configured, "writer_client", None)
        if client is not None and "connection_pool" not in arguments:
            return {**arguments, "connection_pool": client.connection_pool}
    return arguments
