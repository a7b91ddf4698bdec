"""A backend fault at commit time never fails the commit, and never lets a stale row survive.

Each test runs its own private Redis or Memcached (``tests/_servers.py``), so it can stop,
restart or pause it without touching the shared servers. Two ways a backend fails:

* **stopped** (``server.stop()``): calls fail at once; a private server comes back *empty*.
* **paused** (Redis ``CLIENT PAUSE``): calls time out after the manager's 0.5 s socket timeout
  and the server comes back *with its data*, so a queued invalidation that is not replayed
  would leave the old row cached. This is the case that proves the replay.

Every manager here uses declcache's default client settings (0.5 s Redis socket timeouts,
no redis-py retries), as a user's would.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from declcache import CacheConfig, CacheManager, _stats
from declcache import _replay as replay_module
from tests.integration._invalidation_models import Item, Reader, writing

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from sqlalchemy.engine import Engine

    from tests import _servers

OLD = {"id": 1, "name": "item-1"}
NEW = {"id": 1, "name": "new"}
#: Long enough for a commit (two 0.5 s timeouts) and a read to happen inside the pause.
PAUSE_SECONDS = 2.0


def redis_config(server: _servers.ServerProcess, key_prefix: str) -> CacheConfig:
    return CacheConfig(
        backend="dogpile.cache.redis",
        arguments={"host": server.host, "port": server.port},
        key_prefix=key_prefix,
    )


def memcached_config(server: _servers.ServerProcess, key_prefix: str) -> CacheConfig:
    return CacheConfig(
        backend="dogpile.cache.pymemcache",
        arguments={"url": [f"{server.host}:{server.port}"]},
        key_prefix=key_prefix,
    )


def commit_rename(engine: Engine, manager: CacheManager, ident: int, name: str) -> None:
    with writing(engine, manager) as session:
        session.get(Item, ident).name = name
        session.commit()


def database_row(engine: Engine, ident: int) -> dict[str, Any]:
    with Session(engine) as session:
        item = session.scalars(select(Item).where(Item.id == ident)).one()
        return {"id": item.id, "name": item.name}


def warm(reader: Reader, *idents: int) -> None:
    for ident in idents:
        reader.get(Item, ident)
        assert reader.loads_during(lambda i=ident: reader.get(Item, i)) == 0


def pause_redis(server: _servers.ServerProcess, seconds: float) -> float:
    """Pause every client of ``server``; return the monotonic time the pause ends."""
    admin = redis.Redis(host=server.host, port=server.port, socket_timeout=5)
    try:
        admin.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")
    finally:
        admin.close()
    return time.monotonic() + seconds


def sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


def replayed(manager: CacheManager, timeout: float = 10.0) -> bool:
    """Wait until ``manager``'s background replay has emptied its queue (a liveness bound)."""
    deadline = time.monotonic() + timeout
    while manager.pending_invalidations and time.monotonic() < deadline:
        time.sleep(0.01)
    return manager.pending_invalidations == 0


def stats(manager: CacheManager) -> _stats.ModelStats:
    return manager.stats()["Item"]


# --- a stopped server ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["redis", "memcached"])
def test_commit_while_the_backend_is_down(
    engine: Engine, key_prefix: str, request: pytest.FixtureRequest, kind: str
) -> None:
    server = request.getfixturevalue(f"private_{kind}")
    config = (redis_config if kind == "redis" else memcached_config)(server, key_prefix)
    writer = CacheManager(config)
    reader = Reader(engine, writer)  # this process
    other = Reader(engine, CacheManager(config))  # another process
    warm(reader, 1)

    server.stop()
    commit_rename(engine, writer, 1, "new")  # no exception
    assert database_row(engine, 1) == NEW
    assert stats(writer).invalidations_queued >= 1
    assert stats(writer).errors >= 1
    assert writer.pending_invalidations > 0
    for _ in range(2):  # every read during the outage goes to the database
        assert reader.loads_during(lambda: reader.get(Item, 1)) == 1
        assert reader.seen[-1] == NEW
    assert other.get(Item, 1) == NEW

    server.start()  # comes back empty
    assert replayed(writer)
    assert reader.get(Item, 1) == NEW
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 0  # caching again
    assert other.get(Item, 1) == NEW
    assert OLD not in reader.seen[2:] + other.seen


class SlammingDoor:
    """A TCP port that accepts every connection and closes it at once, counting them."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = self._listener.getsockname()[:2]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._listener.close()


def test_a_dead_redis_costs_one_connection_per_call(engine: Engine, key_prefix: str) -> None:
    """No redis-py retries (10, with backoff, by default): each call fails once, at once."""
    door = SlammingDoor()
    try:
        host, port = door.address
        config = CacheConfig(
            backend="dogpile.cache.redis",
            arguments={"host": host, "port": port},
            key_prefix=key_prefix,
            breaker_interval=0,
        )
        manager = CacheManager(config)
        reader = Reader(engine, manager)
        for _ in range(3):  # reads only: a commit would start the replay's own attempts
            assert reader.loads_during(lambda: reader.get(Item, 1)) == 1
        errors = stats(manager).errors
    finally:
        door.close()
    assert errors >= 3
    assert door.connections == errors  # one connection per failed call: no retry


# --- a paused server that keeps its data --------------------------------------------------------


def test_paused_redis_replays_the_queued_invalidation(
    engine: Engine, key_prefix: str, private_redis: _servers.RedisProcess
) -> None:
    config = redis_config(private_redis, key_prefix)
    writer = CacheManager(config)
    reader = Reader(engine, writer)
    warm(reader, 1, 2)
    other = Reader(engine, CacheManager(config))

    paused_until = pause_redis(private_redis, PAUSE_SECONDS)
    commit_rename(engine, writer, 1, "new")
    assert database_row(engine, 1) == NEW
    assert stats(writer).invalidations_queued == 1
    assert writer.pending_invalidations > 0
    assert reader.get(Item, 1) == NEW  # from the database: the model's invalidation is pending
    assert time.monotonic() < paused_until, "too slow: the commit and read outlasted the pause"

    sleep_until(paused_until)
    assert replayed(writer)  # in the background: nobody has to read or commit
    assert reader.get(Item, 1) == NEW
    assert other.get(Item, 1) == NEW  # the server kept the old row: the replay dropped it
    assert other.get(Item, 2) == {"id": 2, "name": "item-2"}
    assert OLD not in reader.seen[2:] + other.seen


def test_queued_invalidation_reaches_other_processes_without_further_use_of_the_writer(
    engine: Engine, key_prefix: str, private_redis: _servers.RedisProcess
) -> None:
    config = redis_config(private_redis, key_prefix)
    writer = CacheManager(config)
    other = Reader(engine, CacheManager(config))
    warm(other, 1)
    pause_redis(private_redis, PAUSE_SECONDS)
    commit_rename(engine, writer, 1, "new")
    assert writer.pending_invalidations > 0
    assert replayed(writer)
    assert other.get(Item, 1) == NEW


def replay_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "declcache-replay"]


def test_a_dropped_manager_stops_replaying(
    engine: Engine, key_prefix: str, private_redis: _servers.RedisProcess
) -> None:
    """An application that drops a manager whose backend is dead leaves no thread behind."""
    before = set(replay_threads())
    manager = CacheManager(redis_config(private_redis, key_prefix))
    warm(Reader(engine, manager), 1)
    private_redis.stop()
    commit_rename(engine, manager, 1, "new")
    assert manager.pending_invalidations > 0
    (thread,) = set(replay_threads()) - before
    del manager
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        gc.collect()  # a manager is freed by the cycle collector, which runs when it runs
        thread.join(0.1)
    assert not thread.is_alive()


def test_queue_overflow_invalidates_the_whole_model_on_recovery(
    engine: Engine,
    key_prefix: str,
    private_redis: _servers.RedisProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replay_module, "INVALIDATION_QUEUE_LIMIT", 3)
    config = redis_config(private_redis, key_prefix)
    writer = CacheManager(config)
    reader = Reader(engine, writer)
    warm(reader, 1, 2, 3)

    paused_until = pause_redis(private_redis, PAUSE_SECONDS)
    commit_rename(engine, writer, 1, "new")  # one key and the list version: queued
    commit_rename(engine, writer, 2, "new too")  # no room left: the model overflows
    assert time.monotonic() < paused_until, "too slow: the commits outlasted the pause"
    assert stats(writer).invalidations_queued == 1
    assert stats(writer).invalidations_overflowed == 1

    assert replayed(writer)
    # Item 3 never changed, yet misses: the overflow bumped the model's generation.
    assert reader.loads_during(lambda: reader.get(Item, 3)) == 1
    other = Reader(engine, CacheManager(config))
    assert other.get(Item, 2) == {"id": 2, "name": "new too"}
    assert other.get(Item, 1) == NEW
    assert reader.get(Item, 3) == {"id": 3, "name": "item-3"}


async def test_async_commit_during_a_pause_does_not_block_the_event_loop(
    engine: Engine, key_prefix: str, private_redis: _servers.RedisProcess
) -> None:
    writer = CacheManager(redis_config(private_redis, key_prefix))
    reader = Reader(engine, writer)
    warm(reader, 1)
    async_engine = create_async_engine(engine.url.set(drivername="sqlite+aiosqlite"))
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    try:
        async with AsyncSession(async_engine, info={"cache_manager": writer}) as session:
            (await session.get(Item, 1)).name = "new"
            await session.flush()
            task = asyncio.create_task(ticker())
            pause_redis(private_redis, PAUSE_SECONDS)
            started = time.monotonic()
            await session.commit()  # its backend write times out (0.5 s) in a worker thread
            took = time.monotonic() - started
            stop.set()
            await task
    finally:
        await async_engine.dispose()
    assert took >= 0.4  # the commit did wait for the backend...
    during = [tick for tick in ticks if started <= tick <= started + took]
    assert len(during) >= took / 0.01 / 4  # ...while the event loop kept running
    assert stats(writer).invalidations_queued == 1
    assert reader.get(Item, 1) == NEW


def test_a_restarted_memcached_is_used_again_at_the_next_probe(
    engine: Engine, key_prefix: str, private_memcached: _servers.MemcachedProcess
) -> None:
    """One server gets pymemcache's plain client: no node is held out of a hash ring after a
    fault, so the breaker's probe alone decides when the cache is used again."""
    address = f"{private_memcached.host}:{private_memcached.port}"
    manager = CacheManager(
        CacheConfig(url=f"memcached://{address}", key_prefix=key_prefix, breaker_interval=0.2)
    )
    reader = Reader(engine, manager)
    warm(reader, 1)

    private_memcached.stop()
    assert reader.get(Item, 1) == {"id": 1, "name": "item-1"}  # from the database
    assert manager.breaker_stats().state == "open"

    private_memcached.start()  # empty
    time.sleep(0.3)  # past the interval: the next call is the probe
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 1  # the probe: a miss, a fill
    assert manager.breaker_stats().state == "closed"
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 0  # cached again


# --- a hung server ------------------------------------------------------------------------------


def test_commit_against_a_hung_memcached_returns(
    engine: Engine, key_prefix: str, private_memcached: _servers.MemcachedProcess
) -> None:
    writer = CacheManager(memcached_config(private_memcached, key_prefix))
    warm(Reader(engine, writer), 1)
    pid = private_memcached._process.pid  # type: ignore[union-attr]
    commit = threading.Thread(target=commit_rename, args=(engine, writer, 1, "new"), daemon=True)
    os.kill(pid, signal.SIGSTOP)
    try:
        commit.start()
        commit.join(2.0)
        assert not commit.is_alive(), "the commit is still waiting for the hung server"
    finally:
        os.kill(pid, signal.SIGCONT)
        commit.join(10)
    assert database_row(engine, 1) == NEW


# --- replay under concurrency (fault injection into the manager's store) ------------------------


class FlakyStore:
    """Wraps a store: ``down`` makes writes fail; ``hold_next`` blocks the next write."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False
        self.hold_next = False
        self.holding = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        #: ``(thread name, keys)`` of every write that went through.
        self.writes: list[tuple[str, int]] = []

    def _write_gate(self, keys: int = 1) -> None:
        if self.down:
            raise ConnectionError("injected: backend down")
        self.writes.append((threading.current_thread().name, keys))
        with self._lock:
            hold, self.hold_next = self.hold_next, False
        if hold:
            self.holding.set()
            assert self.release.wait(10)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return self.inner.get_many(keys)  # type: ignore[no-any-return]

    def set_many(self, mapping: Mapping[str, bytes], ttl: int) -> None:
        self._write_gate()
        self.inner.set_many(mapping, ttl)

    def write_many(self, entries: Sequence[tuple[str, bytes, int]]) -> None:
        self._write_gate(len(entries))
        self.inner.write_many(entries)

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        return self.inner.add(key, value, ttl)  # type: ignore[no-any-return]

    def compare_and_set(self, swaps: Sequence[Any], ttl: int) -> list[bool]:
        return self.inner.compare_and_set(swaps, ttl)  # type: ignore[no-any-return]

    def delete_many(self, keys: Sequence[str]) -> None:
        self.inner.delete_many(keys)


def flaky_writer(engine: Engine, key_prefix: str) -> tuple[CacheManager, Reader, FlakyStore]:
    """A writing manager whose store is a :class:`FlakyStore`, and a reader of another
    manager on the same memory backend; items 1 to 3 cached."""
    config = CacheConfig(
        backend="dogpile.cache.memory",
        arguments={"cache_dict": {}},
        key_prefix=key_prefix,
        breaker_interval=0,
    )
    writer = CacheManager(config)
    reader = Reader(engine, CacheManager(config))
    warm(reader, 1, 2, 3)
    cache = writer._cache(Item)
    assert cache is not None
    store = FlakyStore(cache.store)
    cache.store = store  # fault injection: the manager's own store, wrapped
    return writer, reader, store


def test_a_commit_writes_its_own_invalidation_and_never_the_queue(
    engine: Engine, key_prefix: str
) -> None:
    """Queued invalidations are written by the replay thread in batches, never by a commit."""
    writer, reader, store = flaky_writer(engine, key_prefix)

    store.down = True
    for round_ in range(200):  # 200 queued changes of item 1
        commit_rename(engine, writer, 1, f"round {round_}")
    assert stats(writer).invalidations_queued == 200
    store.writes.clear()
    store.down = False
    commit_rename(engine, writer, 2, "new")  # may run while the replay drains
    mine = [keys for thread, keys in store.writes if thread == "MainThread"]
    assert len(mine) == 1  # its own invalidation: one write, whatever was queued

    assert replayed(writer)
    replays = [keys for thread, keys in store.writes if thread == "declcache-replay"]
    assert len(replays) == 1  # the 200 changes of one key, merged into one write
    assert reader.get(Item, 1) == {"id": 1, "name": "round 199"}
    assert reader.get(Item, 2) == {"id": 2, "name": "new"}


def test_a_change_queued_during_a_replay_is_replayed_too(engine: Engine, key_prefix: str) -> None:
    """The replay removes only what it wrote: a change queued meanwhile is written next."""
    writer, reader, store = flaky_writer(engine, key_prefix)

    store.hold_next = True
    store.down = True
    commit_rename(engine, writer, 1, "one")  # queued: [item 1]; the replay thread starts
    store.down = False
    assert store.holding.wait(10)  # the replay of [item 1] is stuck in its first write
    store.down = True
    commit_rename(engine, writer, 3, "three")  # its own write fails: queued [item 1, item 3]
    store.down = False
    store.release.set()  # the replay finishes [item 1], then writes [item 3]
    assert replayed(writer)
    assert reader.get(Item, 1) == {"id": 1, "name": "one"}
    assert reader.get(Item, 3) == {"id": 3, "name": "three"}


# --- what the logs say ------------------------------------------------------------------------


def test_fault_warnings_name_the_server_and_the_cause(
    engine: Engine,
    key_prefix: str,
    private_redis: _servers.RedisProcess,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="declcache")
    manager = CacheManager(redis_config(private_redis, key_prefix))
    warm(Reader(engine, manager), 1)
    private_redis.stop()
    commit_rename(engine, manager, 1, "new")
    private_redis.start()
    assert replayed(manager)

    messages = [record.getMessage() for record in caplog.records]
    where = f"host={private_redis.host}, port={private_redis.port}"
    refused = f"ConnectionError: Error 111 connecting to {private_redis.host}:{private_redis.port}"
    failed = [m for m in messages if "cache invalidate failed for Item" in m]
    assert len(failed) == 1
    assert where in failed[0]
    assert refused in failed[0]
    opened = [m for m in messages if "circuit breaker open" in m]
    assert len(opened) == 1
    assert where in opened[0]
    assert refused in opened[0]
    replays = [m for m in messages if m.startswith("replayed ")]
    assert replays
    assert all(not m.startswith("replayed 0 ") for m in replays)
