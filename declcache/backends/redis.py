"""Redis: a single server, a Cluster, or the master a Sentinel group names (``redis-py``).

Atomic steps on the region's own client: ``MGET``, ``SET NX EX``, one non-transactional
pipeline per batch of writes, and a Lua compare-and-set. A single server also gets a native
async store on ``redis.asyncio`` (one client per event loop, mirroring the sync connection);
Cluster and Sentinel route or elect the server per call, which their sync clients do, in a
worker thread. :mod:`declcache.backends.valkey` is the same family on the ``valkey`` client.

declcache adds to the user's arguments: 0.5 s socket timeouts and no retries (a dead cache
must cost milliseconds, and a fault falls back to the database), a server-side expiry of
ttl + 60 s on every key, and one connection pool shared by every model's region.

``max_connections`` bounds the sync pool and each event loop's async pool alike (unset: redis-
py's 100 for the sync pool, 20 per loop, see :data:`DEFAULT_ASYNC_MAX_CONNECTIONS`). A
coroutine beyond it waits for a free connection up to ``pool_timeout`` seconds (default 2);
a wait that times out, like the sync pool's refusal, is a
``MaxConnectionsError``, which the read survives on the database and the circuit breaker
does not count as the backend failing.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import weakref
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import unquote, urlsplit

from declcache._secrets import mask_url
from declcache.backends import _urls
from declcache.backends._arguments import (
    ANY,
    EXPIRY,
    FLAG,
    MAX_EXPIRY,
    TEXT,
    Seconds,
    Whole,
    client_kwargs,
)
from declcache.backends._base import DEFAULT_LOCK_BLOCKING_TIMEOUT, Backend

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType

    from dogpile.cache.region import CacheRegion

    from declcache._api import AsyncStore, Store, Swap, Write
    from declcache.backends._arguments import Options

__all__ = [
    "AsyncRedisStore",
    "ClusterStore",
    "Redis",
    "RedisCluster",
    "RedisSentinel",
    "RedisStore",
]

#: Socket timeouts unless configured: a dead cache must cost milliseconds, not minutes.
DEFAULT_REDIS_TIMEOUT = 0.5

#: What redis-py's connections read that declcache checks when it is given, in
#: ``connection_kwargs`` or (moved there) at the top level or in a URL's query. Any other name
#: in ``connection_kwargs`` is passed to the client unchecked, as dogpile does.
CLIENT_ARGUMENTS: Options = {
    "client_name": TEXT,
    "health_check_interval": Seconds(zero_allowed=True),
    "max_connections": Whole(1, 1_000_000),
    "password": TEXT,
    "protocol": Whole(2, 3),
    "retry_on_timeout": FLAG,
    "socket_connect_timeout": Seconds(),
    "socket_timeout": Seconds(),
    "ssl_ca_certs": TEXT,
    "ssl_ca_data": TEXT,
    "ssl_ca_path": TEXT,
    "ssl_cert_reqs": TEXT,
    "ssl_certfile": TEXT,
    "ssl_check_hostname": FLAG,
    "ssl_ciphers": TEXT,
    "ssl_keyfile": TEXT,
    "ssl_password": TEXT,
    "username": TEXT,
}


def redis_arguments(expiration_argument: str, **family: Any) -> Options:
    """What dogpile's ``RedisBackend.__init__`` reads (plus ``family``'s own names).

    ``expiration_argument`` is the server-expiry name: ``redis_expiration_time`` or Valkey's.
    """
    return {
        "connection_kwargs": client_kwargs(CLIENT_ARGUMENTS),
        "connection_pool": ANY,
        "db": Whole(0, 2**31 - 1),
        "distributed_lock": FLAG,
        "host": TEXT,
        "lock_blocking": FLAG,
        "lock_blocking_timeout": Seconds(zero_allowed=True),
        "lock_prefix": TEXT,
        "lock_sleep": Seconds(),
        "lock_timeout": Seconds(),
        "password": TEXT,
        "pool_timeout": Seconds(),
        "port": Whole(1, 65535),
        "socket_connect_timeout": Seconds(),
        "socket_keepalive": FLAG,
        "socket_keepalive_options": ANY,
        "socket_timeout": Seconds(),
        "ssl": FLAG,
        "thread_local_lock": FLAG,
        "url": TEXT,
        "username": TEXT,
        expiration_argument: EXPIRY,
        **family,
    }


def _expiry(ttl: int) -> int:
    """A key's expiry as the server takes it: at most :data:`MAX_EXPIRY` (ten years).

    A model's ttl is checked at start-up, but a token lives ten ttls; Redis refuses an
    expiry whose milliseconds overflow, and would then refuse every write of the model.
    """
    return min(ttl, MAX_EXPIRY)


_COMPARE_AND_SET = """
local results = {}
local ttl = ARGV[#ARGV]
for i, key in ipairs(KEYS) do
  local expected = ARGV[2 * i - 1]
  local current = redis.call('GET', key)
  if (current == false and expected == '') or current == expected then
    redis.call('SET', key, ARGV[2 * i], 'EX', ttl)
    results[i] = 1
  else
    results[i] = 0
  end
end
return results
"""


def _script_call(swaps: Sequence[Swap], ttl: int) -> dict[str, Any]:
    """The keys and arguments of one compare-and-set script call (an absent value is ``''``)."""
    args: list[bytes | int] = []
    for _, expected, new in swaps:
        args += [expected if expected is not None else b"", new]
    args.append(_expiry(ttl))
    return {"keys": [key for key, _, _ in swaps], "args": args}


class RedisStore:
    """One Redis server (or the master Sentinel names) through the region's client."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._script = client.register_script(_COMPARE_AND_SET)
        #: Errors meaning "this process's pool is exhausted", which the breaker does not
        #: count as the backend failing (see :mod:`declcache._breaker`).
        self.capacity_errors = _pool_exhausted(type(client).__module__)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One ``MGET``."""
        values: list[bytes | None] = self._client.mget(keys)
        return values

    def write_many(self, entries: Sequence[Write]) -> None:
        """``SET EX`` for every entry in one non-transactional pipeline: one round trip.

        On a cluster, redis-py's cluster pipeline sends one batch per node instead.
        """
        pipe = self._client.pipeline(transaction=False)
        for key, value, ttl in entries:
            pipe.set(key, value, ex=_expiry(ttl))
        pipe.execute()

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        """``SET key value NX EX ttl``."""
        return bool(self._client.set(key, value, nx=True, ex=_expiry(ttl)))

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:
        """One script call for every swap."""
        return [bool(flag) for flag in self._script(**_script_call(swaps, ttl))]

    def delete_many(self, keys: Sequence[str]) -> None:
        """One ``DEL``."""
        self._client.delete(*keys)

    def reset_connections(self) -> None:
        """Close every pooled connection; each reconnects on its next use."""
        self._client.connection_pool.disconnect()


class ClusterStore(RedisStore):
    """Redis Cluster: a script or a ``DEL`` runs on keys of one slot, so one call per key."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One ``MGET`` per slot, in the order of ``keys``."""
        values: list[bytes | None] = self._client.mget_nonatomic(list(keys))
        return values

    def write_many(self, entries: Sequence[Write]) -> None:
        """One pipeline per master; a master that fails does not keep the others' writes.

        An invalidation's tombstones and tokens live on several masters. While one master is
        lost, the others must still get theirs: the rows they hold are what other processes
        read meanwhile. The first error is raised once every master was tried (the whole
        change is then queued and replayed: writing it twice is harmless). A master that
        fails is retried key by key through the cluster client, which follows a slot that
        moved (a replica taking over).
        """
        by_node: dict[str, list[Write]] = {}
        nodes: dict[str, Any] = {}
        for entry in entries:
            node = self._client.get_node_from_key(entry[0])
            by_node.setdefault(node.name, []).append(entry)
            nodes[node.name] = node
        failed: Exception | None = None
        for name, group in by_node.items():
            try:
                pipe = self._client.get_redis_connection(nodes[name]).pipeline(transaction=False)
                for key, value, ttl in group:
                    pipe.set(key, value, ex=_expiry(ttl))
                pipe.execute()
            except Exception:  # the slot moved, or the master is lost: key by key
                for key, value, ttl in group:
                    try:
                        self._client.set(key, value, ex=_expiry(ttl))
                    except Exception as error:
                        failed = failed or error
        if failed is not None:
            raise failed

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:
        """One script call per key."""
        one_by_one = super().compare_and_set
        return [flag for swap in swaps for flag in one_by_one([swap], ttl)]

    def delete_many(self, keys: Sequence[str]) -> None:
        """One ``DEL`` per key."""
        for key in keys:
            self._client.delete(key)

    def reset_connections(self) -> None:
        """Close the connections to every node."""
        self._client.disconnect_connection_pools()


#: Connections of each event loop's pool unless ``max_connections`` is set (which then sizes
#: the sync and async pools alike). One loop runs one coroutine at a time, so more connections
#: buy it no throughput: a cached read costs ~0.25 ms of CPU, far more than a loopback round
#: trip spends waiting. They only let more replies land at once, whose coroutines then run
#: back to back while everything else on the loop waits. 2,000 concurrent cached reads on a
#: 2-core VM, event-loop lag p99 (default GC): 13 ms with 100 connections, 7.7 ms with 50,
#: 3.5 ms with 20, 1.3 ms with 10, at the same 3,600-4,000 reads/s.
DEFAULT_ASYNC_MAX_CONNECTIONS = 20
#: Seconds a coroutine waits for a pooled connection unless ``pool_timeout`` says. Not the
#: socket timeout: the wait is for the loop to get through the callers ahead, which is CPU,
#: not the server (2,000 cached reads at once took 0.5-0.75 s on a busy 2-core VM; with a 0.5 s
#: wait a round lost 539 of them to the database). A dead server frees its connections at
#: once (refused) or within the socket timeout, so this bounds only a burst's queue, like
#: the fill lock's 2 s bounds its waiters.
DEFAULT_POOL_TIMEOUT = 2.0


def _pool_exhausted(module_name: str) -> tuple[type[BaseException], ...]:
    """The error of client package of ``module_name`` for "every pooled connection is in use".

    The circuit breaker leaves it alone (see :attr:`RedisStore.capacity_errors`): the server
    answers; this process only asked more of it at once than its pool holds.
    """
    try:
        exceptions = importlib.import_module(f"{module_name.partition('.')[0]}.exceptions")
    except ImportError:  # a stand-in client (tests)
        return ()
    found = getattr(exceptions, "MaxConnectionsError", None)
    return (found,) if isinstance(found, type) else ()


def _waiting_pool(asyncio_module: ModuleType) -> type:
    """``BlockingConnectionPool`` whose wait that timed out raises ``MaxConnectionsError``.

    redis-py's blocking pool makes a caller beyond ``max_connections`` wait for a connection
    (where the plain pool refuses it at once), and raises a bare ``ConnectionError`` when the
    wait times out: indistinguishable from a server that refuses connections, which opens the
    breaker. The wait's timeout is the only such error caused by ``asyncio.TimeoutError``
    (connecting converts its own timeouts to ``TimeoutError``), so it becomes the client's
    ``MaxConnectionsError`` (a ``ConnectionError`` too): the pool was exhausted.
    """
    exceptions = importlib.import_module(f"{asyncio_module.__name__.partition('.')[0]}.exceptions")
    base = asyncio_module.BlockingConnectionPool

    class WaitingPool(base):  # type: ignore[misc,valid-type]
        async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return await super().get_connection(*args, **kwargs)
            except exceptions.ConnectionError as error:
                if isinstance(error.__cause__, asyncio.TimeoutError):
                    raise exceptions.MaxConnectionsError(
                        f"no pooled connection free within {self.timeout} s "
                        f"(max_connections={self.max_connections})"
                    ) from error
                raise

    return WaitingPool


class AsyncRedisStore:
    """The same operations on ``redis.asyncio``: one client per event loop, never blocking.

    redis.asyncio connections belong to the loop that opened them, so each loop gets its own
    client, made like the sync pool's connections (address, credentials, TLS, timeouts).
    Each loop's pool holds at most ``max_connections``; a coroutine beyond it waits for a
    free connection up to ``pool_timeout`` seconds, and only then fails with
    ``MaxConnectionsError``, which is no backend fault.

    Args:
        asyncio_module: ``redis.asyncio`` (or ``valkey.asyncio``).
        connection_class: the async connection class matching the sync one.
        connection_kwargs: the sync pool's connection arguments this class accepts.
        max_connections: connections per loop's pool.
        pool_timeout: seconds a coroutine waits for a pooled connection; ``None``: no bound.
    """

    def __init__(
        self,
        asyncio_module: ModuleType,
        connection_class: type,
        connection_kwargs: dict[str, Any],
        *,
        max_connections: int = DEFAULT_ASYNC_MAX_CONNECTIONS,
        pool_timeout: float | None = DEFAULT_POOL_TIMEOUT,
    ) -> None:
        self._module = asyncio_module
        self._connection_class = connection_class
        self._connection_kwargs = connection_kwargs
        self.max_connections = max_connections
        self.pool_timeout = pool_timeout
        self._pool_class = _waiting_pool(asyncio_module)
        self.capacity_errors = _pool_exhausted(asyncio_module.__name__)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Any, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> tuple[Any, Any]:
        """The running loop's client and its compare-and-set script."""
        loop = asyncio.get_running_loop()
        found = self._clients.get(loop)
        if found is None:
            pool = self._pool_class(
                connection_class=self._connection_class,
                max_connections=self.max_connections,
                timeout=self.pool_timeout,
                **self._connection_kwargs,
            )
            client = self._module.Redis(connection_pool=pool)
            found = self._clients[loop] = (client, client.register_script(_COMPARE_AND_SET))
        return found

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One ``MGET``."""
        values: list[bytes | None] = await self._client()[0].mget(keys)
        return values

    async def write_many(self, entries: Sequence[Write]) -> None:
        """``SET EX`` for every entry in one non-transactional pipeline."""
        pipe = self._client()[0].pipeline(transaction=False)
        for key, value, ttl in entries:
            pipe.set(key, value, ex=_expiry(ttl))
        await pipe.execute()

    async def add(self, key: str, value: bytes, ttl: int) -> bool:
        """``SET key value NX EX ttl``."""
        return bool(await self._client()[0].set(key, value, nx=True, ex=_expiry(ttl)))

    async def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:
        """One script call for every swap."""
        script = self._client()[1]
        return [bool(flag) for flag in await script(**_script_call(swaps, ttl))]

    async def delete_many(self, keys: Sequence[str]) -> None:
        """One ``DEL``."""
        await self._client()[0].delete(*keys)

    async def reset_connections(self) -> None:
        """Close the running loop's pooled connections; each reconnects on its next use."""
        await self._client()[0].connection_pool.disconnect()

    async def aclose(self) -> None:
        """Close the running loop's client; forget the other loops' (they close with them)."""
        found = self._clients.pop(asyncio.get_running_loop(), None)
        self._clients.clear()
        if found is not None:  # the pool was handed to the client, which leaves it open
            await found[0].connection_pool.disconnect()

    def forget(self) -> None:
        """Drop every loop's client without awaiting it: for a close outside any loop."""
        self._clients.clear()


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


def _node(node: Any) -> tuple[str, int]:
    """``"host:port"``, ``[host, port]`` or ``{"host": …, "port": …}`` as a pair."""
    if isinstance(node, str):
        host, _, port = node.rpartition(":")
        return host.strip("[]"), int(port)
    if isinstance(node, dict):
        return str(node["host"]), int(node["port"])
    host, port = node
    return str(host), int(port)


class Redis(Backend):
    """``dogpile.cache.redis``: one server; regions share one pool; async natively.

    Subclasses name another client package with the same API (``valkey``) and its dogpile
    expiry argument.
    """

    near_cache = True
    #: Whether the regions of one manager share the first region's connection pool.
    shares_pool: ClassVar[bool] = True
    #: Whether the async store is the client's own asyncio API (else a worker thread).
    native_async: ClassVar[bool] = True
    #: The client package: ``redis`` (redis-py) or a fork with its API.
    client: ClassVar[str] = "redis"
    #: dogpile's argument for the server-side expiry of every key.
    expiration_argument: ClassVar[str] = "redis_expiration_time"
    #: The URL scheme that means TLS.
    tls_scheme: ClassVar[str] = "rediss"
    accepted = redis_arguments("redis_expiration_time")
    client_arguments = ("connection_kwargs", CLIENT_ARGUMENTS)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._async_stores: list[tuple[Any, AsyncRedisStore]] = []  # (sync pool, its async twin)

    @classmethod
    def parse_url(cls, url: str) -> dict[str, Any]:
        """``redis://[user:password@]host[:port][/db][?option=value]``; ``rediss://`` is TLS."""
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"no host in {mask_url(url)!r}")
        arguments: dict[str, Any] = {"host": parts.hostname, "port": parts.port or 6379}
        db_text = parts.path.strip("/")
        if db_text:
            arguments["db"] = _urls.whole_number(db_text, "database", "redis://host:port/DB")
        if parts.username:
            arguments["username"] = unquote(parts.username)
        if parts.password:
            arguments["password"] = unquote(parts.password)
        if parts.scheme.lower() == cls.tls_scheme:
            arguments["ssl"] = True
        return {**arguments, **cls.query_options(parts.query)}

    def _module(self, name: str = "") -> ModuleType:
        return importlib.import_module(f"{self.client}.{name}" if name else self.client)

    def _without_retries(self, connection_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Connection arguments with the client's retries turned off unless the user set some.

        redis-py retries a failed command three times with backoff: seconds per call on a
        dead server. declcache falls back to the database instead, so one attempt is enough.
        """
        if "retry" in connection_kwargs:
            return connection_kwargs
        retry = self._module("retry").Retry(self._module("backoff").NoBackoff(), 0)
        return {**connection_kwargs, "retry": retry}

    def region_arguments(self, ttl: int, first: CacheRegion | None) -> dict[str, Any]:
        """Timeouts, no retries, server expiry; the first region's pool for the next ones."""
        result = super().region_arguments(ttl, first)
        result.pop("pool_timeout", None)  # declcache's own (the async pool's wait), not dogpile's
        result.setdefault(self.expiration_argument, _expiry(self.server_ttl(ttl)))
        result.setdefault("socket_timeout", DEFAULT_REDIS_TIMEOUT)
        result.setdefault("socket_connect_timeout", DEFAULT_REDIS_TIMEOUT)
        result["connection_kwargs"] = self._without_retries(result.get("connection_kwargs", {}))
        if result.get("distributed_lock"):
            # The async repository takes and releases a lock in two worker threads: a
            # thread-local lock token would make the release fail (dogpile warns the same).
            result.setdefault("thread_local_lock", False)
            # declcache's fill lock bounds its own wait (declcache._fill_lock); this bounds
            # whoever else waits on the region's mutex (redis-py's default is "forever").
            result.setdefault("lock_blocking_timeout", DEFAULT_LOCK_BLOCKING_TIMEOUT)
        return self._shared(result, first)

    def _shared(self, arguments: dict[str, Any], first: CacheRegion | None) -> dict[str, Any]:
        """Reuse the first region's connection pool, unless a URL or a pool is given."""
        if not self.shares_pool or first is None or {"url", "connection_pool"} & set(arguments):
            return arguments
        return {**arguments, "connection_pool": first.backend.writer_client.connection_pool}

    def store(self, region: CacheRegion) -> Store:
        """Atomic steps on the region's client."""
        return RedisStore(region.backend.writer_client)

    def tracking_pool(self, region: CacheRegion) -> Any:
        """The pool whose connection arguments (address, AUTH, TLS) the near cache reuses."""
        return region.backend.writer_client.connection_pool

    def async_store(self, region: CacheRegion, store: Store) -> AsyncStore:
        """The async twin of the region's pool (one per pool), or the thread adapter.

        The adapter serves a connection kind the async client has no counterpart for.
        """
        if not self.native_async:
            return super().async_store(region, store)
        pool = region.backend.writer_client.connection_pool
        for known, found in self._async_stores:
            if known is pool:
                return found
        native = self._native_async_store(pool)
        if native is None:
            return super().async_store(region, store)
        self._async_stores.append((pool, native))
        return native

    def _native_async_store(self, pool: Any) -> AsyncRedisStore | None:
        sync_module, async_module = self._module(), self._module("asyncio")
        counterparts = {
            sync_module.Connection: async_module.Connection,
            sync_module.SSLConnection: async_module.SSLConnection,
            sync_module.UnixDomainSocketConnection: async_module.UnixDomainSocketConnection,
        }
        connection_class = counterparts.get(pool.connection_class)
        if connection_class is None:
            return None
        accepted = _parameters(connection_class)
        kwargs = {
            name: value
            for name, value in pool.connection_kwargs.items()
            if name in accepted and (name in _MIRRORED or name.startswith("ssl_"))
        }
        no_backoff = self._module("backoff").NoBackoff()
        kwargs["retry"] = self._module("asyncio.retry").Retry(no_backoff, 0)  # one attempt
        # As many connections per loop as the sync pool may open when ``max_connections`` is
        # set (or the pool is the user's), else DEFAULT_ASYNC_MAX_CONNECTIONS; a coroutine
        # beyond them waits up to ``pool_timeout``.
        size = getattr(pool, "max_connections", None)
        if not isinstance(size, int) or size <= 0 or not self._sized_by_user():
            size = DEFAULT_ASYNC_MAX_CONNECTIONS
        return AsyncRedisStore(
            async_module,
            connection_class,
            kwargs,
            max_connections=size,
            pool_timeout=self.arguments.get("pool_timeout", DEFAULT_POOL_TIMEOUT),
        )

    def _sized_by_user(self) -> bool:
        """Whether the user chose the pool's size: ``max_connections``, or a pool of theirs."""
        arguments = self.arguments
        connection_kwargs = arguments.get("connection_kwargs") or {}
        return (
            "max_connections" in arguments
            or "max_connections" in connection_kwargs
            or arguments.get("connection_pool") is not None
        )

    async def aclose(self) -> None:
        """Close the running loop's async connections of every pool."""
        for _, found in self._async_stores:
            await found.aclose()

    def forget_async(self) -> None:
        """Drop every loop's async connections without awaiting them."""
        for _, found in self._async_stores:
            found.forget()


#: What dogpile's cluster backend ignores unless it is in ``connection_kwargs``.
_CLUSTER_CONNECTION_ARGUMENTS = (
    "socket_timeout",
    "socket_connect_timeout",
    "username",
    "password",
    "ssl",
)


class RedisCluster(Redis):
    """``dogpile.cache.redis_cluster``: any node of a cluster; keys routed per slot.

    Each region keeps its own cluster client, whose sync calls route each key to its node
    (in a worker thread for coroutines).
    """

    near_cache = False
    shares_pool = False
    native_async = False
    accepted = redis_arguments("redis_expiration_time", startup_nodes=ANY)

    @classmethod
    def parse_url(cls, url: str) -> dict[str, Any]:
        """``redis+cluster://[user:password@]host:port[,host:port][?option=value]``."""
        rest = url.split("://", 1)[1]
        netloc, _, query = rest.partition("?")
        netloc, arguments = _urls.credentials(netloc.split("/", 1)[0])
        example = "redis+cluster://host:port[,host:port]"
        arguments["startup_nodes"] = _urls.nodes(netloc, 6379, example)
        return {**arguments, **cls.query_options(query)}

    def region_arguments(self, ttl: int, first: CacheRegion | None) -> dict[str, Any]:
        """Startup nodes as ``ClusterNode`` objects; timeouts where the cluster client reads them.

        dogpile's cluster backend builds its client from ``url`` or ``startup_nodes`` and
        ``connection_kwargs`` alone, so timeouts and credentials must travel in the latter.
        """
        arguments = super().region_arguments(ttl, first)
        cluster_node = self._module("cluster").ClusterNode
        nodes = arguments.get("startup_nodes")
        if nodes is not None:
            arguments["startup_nodes"] = [
                node if isinstance(node, cluster_node) else cluster_node(*_node(node))
                for node in nodes
            ]
        connection_kwargs = dict(arguments["connection_kwargs"])
        for name in _CLUSTER_CONNECTION_ARGUMENTS:
            if arguments.get(name) is not None:
                connection_kwargs.setdefault(name, arguments[name])
        arguments["connection_kwargs"] = connection_kwargs
        return arguments

    def store(self, region: CacheRegion) -> Store:
        """One call per key where a call must stay within one slot."""
        return ClusterStore(region.backend.writer_client)


class RedisSentinel(Redis):
    """``dogpile.cache.redis_sentinel``: the master a group of Sentinels names.

    Each region asks the Sentinels for the master itself, and the Sentinels may elect
    another one at any call (in a worker thread for coroutines).
    """

    near_cache = False
    shares_pool = False
    native_async = False
    accepted = redis_arguments(
        "redis_expiration_time",
        sentinels=ANY,
        service_name=TEXT,
        sentinel_kwargs=client_kwargs(CLIENT_ARGUMENTS),
    )

    @classmethod
    def parse_url(cls, url: str) -> dict[str, Any]:
        """``redis+sentinel://[user:password@]host:port[,host:port]/service[/db]``."""
        rest = url.split("://", 1)[1]
        location, _, query = rest.partition("?")
        netloc, _, path = location.partition("/")
        netloc, arguments = _urls.credentials(netloc)
        example = "redis+sentinel://host:port[,host:port]/service[/db]"
        arguments["sentinels"] = _urls.nodes(netloc, 26379, example)
        service, _, db_text = path.strip("/").partition("/")
        if not service:
            raise ValueError(f"no service name in {mask_url(url)!r}; expected {example}")
        arguments["service_name"] = unquote(service)
        if db_text:
            arguments["db"] = _urls.whole_number(db_text, "database", example)
        return {**arguments, **cls.query_options(query)}

    def region_arguments(self, ttl: int, first: CacheRegion | None) -> dict[str, Any]:
        """Sentinels as ``(host, port)`` pairs, asked with the same short timeouts."""
        arguments = super().region_arguments(ttl, first)
        sentinels = arguments.get("sentinels")
        if sentinels is not None:
            arguments["sentinels"] = [_node(node) for node in sentinels]
        sentinel_kwargs = dict(arguments.get("sentinel_kwargs", {}))
        sentinel_kwargs.setdefault("socket_timeout", arguments["socket_timeout"])
        sentinel_kwargs.setdefault("socket_connect_timeout", arguments["socket_connect_timeout"])
        arguments["sentinel_kwargs"] = sentinel_kwargs
        # dogpile turns its region-level lock on for Sentinel; declcache decides that itself.
        arguments.setdefault("distributed_lock", False)
        return arguments
