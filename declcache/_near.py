"""A near cache (L1): raw Redis values kept in this process, kept coherent by Redis itself.

A Redis hit costs a network round trip; an L1 hit costs a dict look-up. What makes an L1 safe
is Redis *server-assisted client-side caching*: one dedicated RESP3 connection per
:class:`NearCache` runs ``CLIENT TRACKING ON BCAST PREFIX <key prefix>``, and from then on the
server pushes an ``invalidate`` message naming every key under the prefix that any client
writes, deletes, or that expires or is evicted (a ``null`` for ``FLUSHDB``/``FLUSHALL``).

The coherence argument, which every method here keeps:

* **Drain before serving.** :meth:`NearCache.lookup` first reads every push already received
  on the tracking socket, without blocking, and evicts what they name; only then does it
  serve keys from L1.
* **Pushes leave Redis before the write's reply.** Redis queues BCAST invalidations in
  ``beforeSleep`` (``trackingBroadcastInvalidationMessages``) *before* it flushes client
  replies (``handleClientsWithPendingWrites``), in the same pass of its event loop. So by the
  time another process's commit (its tombstone ``SET``) has returned, the push is already on
  its way to our socket; a read that starts after that drains it first.
* **A fill is kept only if nothing invalidated its key during the fetch.** A value fetched
  from Redis may be overwritten before it is stored in L1; kept, it would be stale forever.
  So a fetch notes the invalidation *epoch* before calling Redis, drains again after, and
  keeps a value only if its key was not invalidated (and nothing was flushed) in between.
* **This process reads its own writes.** Every write through :class:`NearStore` evicts its
  keys and records them as invalidated before and after calling Redis.
* **No tracking, no L1.** While the tracking connection is not established (not yet, Redis
  restarted, the network dropped it, a heartbeat went unanswered, the process forked), L1 is
  empty and bypassed: every read goes to Redis exactly as without a near cache.
* **No backend, no L1.** L1 sits in front of the manager's circuit breaker, so its hits never
  tell the breaker that Redis answers; and while the breaker is not closed (a real call
  failed: Redis may be frozen, with other processes' invalidations stuck in their queues)
  L1 is emptied and bypassed, and reads go to the database as without a near cache. A reconnect
  is tried at most once per second from the read path, and L1 is cleared again right after it.

Residual window: the push and the write's reply are flushed by the same Redis thread within
microseconds, but they travel on different sockets. A reader on another host than the writer
could, in principle, receive the writer's "committed" signal (over some third channel) before
the push crosses the network to it; and a silently dead network path (no FIN, no RST) is
detected only by the heartbeat, at most about two seconds later. docs/near-cache.md says so.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cachetools

from declcache._private_apis import resp3_parser, set_push_handler, socket_of
from declcache._stats import FaultLog
from declcache.backends._base import SyncStoreAdapter

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from declcache._api import Store, Swap, Write
    from declcache._breaker import Breaker

__all__ = ["AsyncNearStore", "NearCache", "NearCacheStats", "NearStore", "probe_tracking"]

logger = logging.getLogger("declcache.near")
_faults = FaultLog(logger)  # a down Redis would otherwise log every retry, every second

#: Seconds between attempts to (re)establish the tracking connection.
RETRY_INTERVAL = 1.0
#: Seconds between heartbeats on the tracking connection; an unanswered one drops it.
HEARTBEAT_INTERVAL = 1.0

_PUSHED = object()  # what the push handler returns, to tell pushes from replies


@dataclass(frozen=True)
class NearCacheStats:
    """One manager's near cache, as :meth:`CacheManager.near_cache_stats` reports it.

    Attributes:
        hits: keys served from this process's memory, without a Redis round trip.
        misses: keys looked up in Redis (L1 miss, or L1 bypassed while not tracking).
        entries: keys held now.
        invalidations: keys evicted because Redis (or a write of this process) said so.
        flushes: times the whole near cache was dropped (flush pushed, connection lost).
        tracking: whether the tracking connection is up, i.e. whether L1 is in use.
    """

    hits: int
    misses: int
    entries: int
    invalidations: int
    flushes: int
    tracking: bool

    @property
    def hit_ratio(self) -> float:
        """``hits / (hits + misses)``; ``0.0`` before any look-up."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _tracking_connection(pool: Any, key_prefix: str, on_push: Callable[[Any], object]) -> Any:
    """A new RESP3 connection like the pool's (host, db, AUTH, TLS), tracking the prefix.

    The pure-Python RESP3 parser is asked for by name: its push handling (a push read with
    ``push_request=True`` is returned, a partial one rewound) is what the drain relies on.
    """
    kwargs = {**pool.connection_kwargs, "protocol": 3, "parser_class": resp3_parser("redis")}
    kwargs.pop("cache", None)  # redis-py's own client-side cache: not on this connection
    connection = pool.connection_class(**kwargs)
    set_push_handler(connection, on_push)
    command = ["CLIENT", "TRACKING", "ON", "BCAST"]
    if key_prefix:
        command += ["PREFIX", key_prefix]
    try:
        connection.connect()  # HELLO 3, AUTH, SELECT as the URL says
        connection.send_command(*command)
        reply = connection.read_response()
        if reply not in {b"OK", "OK"}:
            raise ConnectionError(f"CLIENT TRACKING answered {reply!r}")
        connection.send_command("CLIENT", "ID")
        connection.client_id = int(connection.read_response())
    except BaseException:
        connection.disconnect()
        raise
    return connection


def probe_tracking(pool: Any, key_prefix: str) -> None:
    """Open, then close, the tracking connection a near cache would: does the server let it?

    ``declcache check`` calls it; raises what the server or client raised.
    """
    _disconnect(_tracking_connection(pool, key_prefix, lambda _message: None))


class NearCache:
    """One manager's L1: a bounded LRU of raw values and the tracking connection guarding it.

    Args:
        key_prefix: the manager's key prefix; Redis reports writes of keys under it.
        max_entries: how many keys it keeps (least recently used dropped).
        retry_interval: seconds between attempts to (re)connect the tracking connection.
        heartbeat_interval: seconds between ``PING`` s on it; one unanswered for twice this
            long counts as a dead connection.
        clock: monotonic time source.
        breaker: the manager's circuit breaker; L1 is bypassed while it is not closed.
    """

    def __init__(
        self,
        key_prefix: str,
        max_entries: int,
        *,
        retry_interval: float = RETRY_INTERVAL,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        breaker: Breaker | None = None,
    ) -> None:
        self._prefix = key_prefix
        self._breaker = breaker
        self._breaker_closed = True  # as last seen: L1 is emptied when it stops being
        self._max_entries = max_entries
        self._entries: cachetools.LRUCache[str, bytes] = cachetools.LRUCache(max_entries)
        self._retry_interval = retry_interval
        self._heartbeat_interval = heartbeat_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._connect: Callable[[], Any] | None = None
        self._connection: Any = None
        self._partial: type[Exception] = TimeoutError  # what a partly received push raises
        self._poller: Any = None  # polls the tracking socket: one syscall when nothing came
        self._buffered = False  # a push was partly received: the parser holds its start
        self._pid = 0
        self._next_attempt = float("-inf")
        self._last_ping = float("-inf")
        self._ping_sent: float | None = None
        # Epoch bookkeeping for fills (see the module docstring).
        self._epoch = 0
        self._flushed = 0  # epoch of the last drop-everything
        self._fetching = 0  # fetches between lookup() and keep()
        self._touched: dict[str, int] = {}  # key -> epoch of its invalidation, while fetching
        self._hits = 0
        self._misses = 0
        self._invalidations = 0
        self._flushes = 0

    # -- wiring ------------------------------------------------------------------------------

    def wrap(self, store: Store, pool: Any) -> NearStore:
        """``store`` with this L1 in front; ``pool`` is the Redis connection pool it uses.

        The first pool wrapped names the server to track: its connection arguments (host,
        port, db, credentials, TLS) make the tracking connection.
        """
        if self._connect is None:
            from redis.exceptions import TimeoutError as RedisTimeout  # noqa: PLC0415

            prefix = self._prefix
            self._connect = lambda: _tracking_connection(pool, prefix, self._on_push)
            self._partial = RedisTimeout
        return NearStore(store, self)

    @property
    def tracking_client_id(self) -> int | None:
        """The Redis ``CLIENT ID`` of the tracking connection; ``None`` while there is none."""
        connection = self._connection
        return None if connection is None else int(connection.client_id)

    def stats(self) -> NearCacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return NearCacheStats(
                self._hits,
                self._misses,
                len(self._entries),
                self._invalidations,
                self._flushes,
                self._connection is not None,
            )

    # -- the read path -----------------------------------------------------------------------

    def lookup(self, keys: Sequence[str]) -> tuple[list[bytes | None], int | None]:
        """Values L1 holds for ``keys`` (``None`` where not), and the epoch to fetch the rest at.

        The epoch is ``None`` when L1 is bypassed (nothing to keep after the fetch); otherwise
        the caller must pass it to :meth:`keep` once its fetch is over, even if it failed.
        """
        with self._lock:
            if not self._sync():
                self._misses += len(keys)
                return [None] * len(keys), None
            get = self._entries.get
            values: list[bytes | None] = [get(key) for key in keys]
            found = sum(value is not None for value in values)
            self._hits += found
            self._misses += len(keys) - found
            if found == len(keys):
                return values, None
            self._fetching += 1
            return values, self._epoch

    def peek(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """The values of ``keys`` if L1 holds every one of them; never waits, never connects.

        For an event loop: pending pushes are applied without blocking, but a lock another
        thread holds, a tracking connection to (re)open or a key L1 lacks make it ``None``,
        and the caller takes the thread path (:meth:`lookup`) instead.
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self._connection is None or self._pid != os.getpid() or not self._sync():
                return None
            get = self._entries.get
            values: list[bytes | None] = [get(key) for key in keys]
            if None in values:
                return None
            self._hits += len(keys)
            return values
        finally:
            self._lock.release()

    def keep(self, epoch: int | None, fetched: Iterable[tuple[str, bytes | None]]) -> None:
        """End the fetch :meth:`lookup` began at ``epoch``: keep values nothing invalidated."""
        if epoch is None:
            return
        with self._lock:
            usable = self._sync()  # while still counted as fetching, so pushes are recorded
            self._fetching -= 1
            if usable and self._flushed <= epoch:
                touched = self._touched
                for key, value in fetched:
                    if value is not None and touched.get(key, -1) <= epoch:
                        self._entries[key] = value
            if not self._fetching:
                self._touched.clear()

    def forget(self, keys: Iterable[str]) -> None:
        """Evict ``keys`` (written by this process) and mark them invalidated."""
        with self._lock:
            for key in keys:
                self._invalidate(key)

    # -- under the lock ----------------------------------------------------------------------

    def _invalidate(self, key: str) -> None:
        self._epoch += 1
        if self._entries.pop(key, None) is not None:
            self._invalidations += 1
        if self._fetching:
            self._touched[key] = self._epoch
            if len(self._touched) > self._max_entries:  # too many to track: fail safe
                self._flush()

    def _flush(self) -> None:
        self._epoch += 1
        self._flushed = self._epoch
        self._touched.clear()
        self._entries = cachetools.LRUCache(self._max_entries)
        self._flushes += 1

    def _on_push(self, message: list[Any]) -> object:
        """redis-py's invalidation push handler: ``["invalidate", [keys] | None]``."""
        keys = message[1] if len(message) > 1 else None
        if keys is None:
            self._flush()
        else:
            for key in keys:
                self._invalidate(key.decode() if isinstance(key, bytes) else str(key))
        return _PUSHED

    def _sync(self) -> bool:
        """Apply every push received so far; whether L1 may be used now.

        Never raises: any fault of the tracking connection drops it (and L1) instead.
        """
        if self._breaker is not None:
            closed = self._breaker.state == "closed"
            if not closed and self._breaker_closed:
                self._flush()
            self._breaker_closed = closed
            if not closed:
                return False
        connection = self._connection
        if connection is not None and self._pid != os.getpid():
            self._connection = connection = None  # forked: the parent owns that socket
            self._flush()
        if connection is None:
            return self._reconnect()
        try:
            if self._buffered or self._poller is None or self._poller.poll(0):
                self._buffered = False
                while connection.can_read(timeout=0):
                    reply = connection.read_response(
                        push_request=True, timeout=0, disconnect_on_error=False
                    )
                    if reply is not _PUSHED:  # the heartbeat's PONG
                        self._ping_sent = None
            return self._heartbeat(connection)
        except Exception as error:
            if isinstance(error, self._partial):
                self._buffered = True
                return False  # a push only partly received: bypass L1 this once
            self._drop(error)
            return False

    def _heartbeat(self, connection: Any) -> bool:
        now = self._clock()
        if self._ping_sent is not None:
            if now - self._ping_sent > 2 * self._heartbeat_interval:
                self._drop(TimeoutError("the tracking connection did not answer PING"))
                return False
        elif now - self._last_ping >= self._heartbeat_interval:
            connection.send_command("PING", check_health=False)
            self._ping_sent = self._last_ping = now
        return True

    def _reconnect(self) -> bool:
        now = self._clock()
        if self._connect is None or now < self._next_attempt:
            return False
        self._next_attempt = now + self._retry_interval
        try:
            connection = self._connect()
        except Exception as error:
            _faults.warning(
                "connect",
                "near cache off, Redis tracking unavailable: %s: %s",
                type(error).__name__,
                error,
            )
            return False
        self._connection, self._pid = connection, os.getpid()
        self._poller, self._buffered = _poller(connection), False
        self._ping_sent, self._last_ping = None, now
        self._flush()  # whatever was written while not tracking
        logger.info("near cache on: Redis tracks keys under %r", self._prefix)
        return True

    def close(self) -> None:
        """Close the tracking connection and empty L1; the next look-up reconnects."""
        with self._lock:
            connection, self._connection = self._connection, None
            self._flush()
            self._next_attempt = float("-inf")
        if connection is not None:
            _disconnect(connection)

    def _drop(self, error: BaseException) -> None:
        connection, self._connection = self._connection, None
        self._flush()
        self._next_attempt = self._clock() + self._retry_interval
        _faults.warning(
            "drop",
            "near cache off until Redis tracking reconnects: %s: %s",
            type(error).__name__,
            error,
        )
        _disconnect(connection)


def _disconnect(connection: Any) -> None:
    try:
        connection.disconnect()
    except Exception as error:  # the socket is gone either way
        logger.debug("closing the tracking connection: %r", error)


def _poller(connection: Any) -> Any:
    """A ``poll`` object on the tracking connection's socket; ``None`` where there is none.

    ``redis-py``'s own ``can_read`` costs three syscalls (two ``settimeout`` and a ``recv``);
    polling first costs one, and a look-up checks the socket every time.
    """
    sock = socket_of(connection)
    if sock is None or not hasattr(select, "poll"):
        return None
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
    return poller


class NearStore:
    """A store with a :class:`NearCache` in front: reads served from L1 when coherent.

    Args:
        inner: the Redis store every miss and every write goes to.
        near: the manager's near cache.
    """

    def __init__(self, inner: Store, near: NearCache) -> None:
        self.inner = inner
        self.near = near

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """L1 where it holds a key, one Redis call for the rest."""
        values, epoch = self.near.lookup(keys)
        missing = [index for index, value in enumerate(values) if value is None]
        if not missing:
            return values
        missing_keys = [keys[index] for index in missing]
        fetched: list[bytes | None] = []
        try:
            fetched = self.inner.get_many(missing_keys)
        finally:
            self.near.keep(epoch, zip(missing_keys, fetched, strict=False))
        for index, value in zip(missing, fetched, strict=True):
            values[index] = value
        return values

    def _written(self, keys: list[str], write: Callable[[], Any]) -> Any:
        """Run ``write`` with ``keys`` evicted before and after, so no read serves the old."""
        self.near.forget(keys)
        try:
            return write()
        finally:
            self.near.forget(keys)

    def write_many(self, entries: Sequence[Write]) -> None:
        """See :meth:`Store.write_many`."""
        keys = [key for key, _, _ in entries]
        self._written(keys, lambda: self.inner.write_many(entries))

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        """See :meth:`Store.add`."""
        return bool(self._written([key], lambda: self.inner.add(key, value, ttl)))

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:
        """See :meth:`Store.compare_and_set`."""
        keys = [key for key, _, _ in swaps]
        result: list[bool] = self._written(keys, lambda: self.inner.compare_and_set(swaps, ttl))
        return result

    def delete_many(self, keys: Sequence[str]) -> None:
        """See :meth:`Store.delete_many`."""
        self._written(list(keys), lambda: self.inner.delete_many(keys))

    def reset_connections(self) -> None:
        """Forward to the inner store (the breaker's probe calls it)."""
        self.inner.reset_connections()


class AsyncNearStore(SyncStoreAdapter):
    """A :class:`NearStore` for coroutines: L1 hits answered on the event loop.

    A look-up that L1 answers whole is a dict read on the loop (:meth:`NearCache.peek` never
    waits for a lock, connects or blocks); anything else — a key L1 lacks, a write, a
    tracking connection to reopen — runs the :class:`NearStore` in a worker thread.
    """

    def __init__(self, store: NearStore) -> None:
        super().__init__(store, blocking=True)
        self._near = store.near

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """L1's values when it holds every key, else the near store in a thread."""
        values = self._near.peek(keys)
        if values is not None:
            return values
        return await super().get_many(keys)
