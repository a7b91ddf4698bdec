"""The near cache (L1) on real Redis: hits without a round trip, and never a stale read.

Reads go through :class:`Reader` (``manager.load`` in a fresh session) and writes through
committed sessions, so the whole manager runs: generation tokens, tombstones, compare-and-set
fills. Redis round trips are counted by a wrapper around the real Redis store under the near
cache; nothing of Redis is mocked. Tests that kill, restart or flush a server use a private
``redis-server`` (``tests/_servers.py``); on the shared one only this test's keys are touched
and only its own tracking connection is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis

from declcache import CacheConfig, CacheManager, SettingsError
from declcache._near import NearCache, NearStore
from declcache.config import SQLAlchemyAsyncConfig
from declcache.repository import SQLAlchemyAsyncRepository
from tests import _servers
from tests.integration._invalidation_models import Item, Reader, writing
from tests.integration.conftest import delete_redis_keys

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from sqlalchemy.engine import Engine

REPO_ROOT = Path(__file__).resolve().parents[2]


class CountingStore:
    """The real Redis store, counting its reads; ``after_read`` runs once after the next one."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads = 0
        self.after_read: Callable[[], None] | None = None

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self.reads += 1
        values: list[bytes | None] = self.inner.get_many(keys)
        hook, self.after_read = self.after_read, None
        if hook is not None:
            hook()
        return values

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def counting(manager: CacheManager, model: type) -> CountingStore:
    """Put a :class:`CountingStore` between ``model``'s near cache and Redis."""
    cache = manager._cache(model)
    assert cache is not None
    near_store = cache.store
    assert isinstance(near_store, NearStore)
    near_store.inner = CountingStore(near_store.inner)
    return near_store.inner


def near_of(manager: CacheManager) -> NearCache:
    near = manager._near
    assert near is not None
    return near


def reconnect_now(manager: CacheManager) -> None:
    """Skip the one-second wait before the next reconnection attempt."""
    near_of(manager)._next_attempt = float("-inf")


@pytest.fixture
def redis_config(redis_address: tuple[str, int], key_prefix: str) -> Iterator[CacheConfig]:
    host, port = redis_address
    yield CacheConfig(
        backend="dogpile.cache.redis",
        arguments={"host": host, "port": port},
        key_prefix=key_prefix,
    )
    delete_redis_keys(host, port, key_prefix)


@pytest.fixture
def near_config(redis_config: CacheConfig) -> CacheConfig:
    return redis_config.with_overrides(near_cache=True)


@pytest.fixture
def raw_redis(redis_address: tuple[str, int]) -> Iterator[redis.Redis]:
    client = redis.Redis(*redis_address, socket_timeout=5)
    yield client
    client.close()


def rename(engine: Engine, manager: CacheManager, name: str) -> None:
    """Commit a new name for item 1 in a session whose commit invalidates through ``manager``."""
    with writing(engine, manager) as session:
        item = session.get(Item, 1)
        assert item is not None
        item.name = name
        session.commit()


def warm(reader: Reader, ident: int = 1) -> None:
    """Read until the entry is in L1: a miss fills Redis, the next read fills L1."""
    reader.get(Item, ident)
    reader.get(Item, ident)


# --- hits -------------------------------------------------------------------------------------


def test_a_warm_read_makes_no_redis_call_and_no_query(
    engine: Engine, near_config: CacheConfig
) -> None:
    manager = CacheManager(near_config)
    reader = Reader(engine, manager)
    store = counting(manager, Item)
    warm(reader)
    reads = store.reads

    assert reader.loads_during(lambda: reader.get(Item, 1)) == 0
    assert reader.get(Item, 1) == {"id": 1, "name": "item-1"}

    assert store.reads == reads  # served from this process's memory only
    stats = manager.near_cache_stats()
    assert stats is not None
    assert stats.tracking
    assert stats.hits >= 4  # two reads, each of the generation token and the item
    assert 0 < stats.hit_ratio < 1
    assert manager.stats()["Item"].hits >= 2


def test_without_a_near_cache_every_read_goes_to_redis(
    engine: Engine, redis_config: CacheConfig
) -> None:
    manager = CacheManager(redis_config)
    reader = Reader(engine, manager)
    warm(reader)

    assert manager.near_cache_stats() is None
    cache = manager._cache(Item)
    assert cache is not None
    assert not isinstance(cache.store.inner, NearStore)  # type: ignore[attr-defined]


def test_the_near_cache_keeps_at_most_max_entries(engine: Engine, near_config: CacheConfig) -> None:
    with writing(engine, CacheManager(near_config)) as session:
        session.add_all(Item(id=i, name=f"item-{i}") for i in range(4, 21))
        session.commit()
    manager = CacheManager(near_config.with_overrides(near_cache_max_entries=5))
    reader = Reader(engine, manager)
    for ident in range(1, 21):
        warm(reader, ident)

    stats = manager.near_cache_stats()
    assert stats is not None
    assert stats.entries == 5
    # The most recent entries are still served without a round trip; the oldest were dropped.
    store = counting(manager, Item)
    assert reader.get(Item, 20) == {"id": 20, "name": "item-20"}
    assert store.reads == 0
    assert reader.get(Item, 1) == {"id": 1, "name": "item-1"}
    assert store.reads == 1


# --- coherence --------------------------------------------------------------------------------


def test_a_commit_in_this_manager_is_seen_at_once(engine: Engine, near_config: CacheConfig) -> None:
    manager = CacheManager(near_config)
    reader = Reader(engine, manager)
    for round_ in range(50):
        warm(reader)
        rename(engine, manager, f"mine-{round_}")
        assert reader.get(Item, 1) == {"id": 1, "name": f"mine-{round_}"}


def test_a_commit_in_another_manager_is_never_read_stale(
    engine: Engine, near_config: CacheConfig, redis_config: CacheConfig
) -> None:
    manager = CacheManager(near_config)
    other = CacheManager(redis_config)
    reader = Reader(engine, manager)
    for round_ in range(200):
        warm(reader)
        rename(engine, other, f"other-{round_}")
        assert reader.get(Item, 1) == {"id": 1, "name": f"other-{round_}"}
    stats = manager.near_cache_stats()
    assert stats is not None
    assert stats.invalidations >= 200  # L1 held the old row each time the other one wrote


def test_a_commit_in_another_process_is_never_read_stale(
    engine: Engine,
    near_config: CacheConfig,
    redis_address: tuple[str, int],
    key_prefix: str,
) -> None:
    host, port = redis_address
    options = {
        "db_url": str(engine.url),
        "host": host,
        "port": port,
        "key_prefix": key_prefix,
    }
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.integration._near_writer", json.dumps(options)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None
    assert writer.stdout is not None
    try:
        assert writer.stdout.readline().strip() == "ready"
        manager = CacheManager(near_config)
        reader = Reader(engine, manager)
        store = counting(manager, Item)
        served_from_memory = 0
        for round_ in range(300):
            warm(reader)
            before = store.reads
            assert reader.get(Item, 1) == {"id": 1, "name": f"{round_ - 1}" if round_ else "item-1"}
            served_from_memory += store.reads == before
            writer.stdin.write(f"{round_}\n")
            writer.stdin.flush()
            assert writer.stdout.readline().strip() == "done"
            assert reader.get(Item, 1) == {"id": 1, "name": str(round_)}
        assert served_from_memory == 300  # the old row was in L1 every time it was overwritten
    finally:
        writer.stdin.write("\n")
        writer.stdin.flush()
        writer.wait(timeout=60)
    assert writer.returncode == 0


def test_a_fill_racing_a_write_is_not_kept(
    engine: Engine, near_config: CacheConfig, redis_config: CacheConfig
) -> None:
    manager = CacheManager(near_config)
    other = CacheManager(redis_config)
    reader = Reader(engine, manager)
    reader.get(Item, 1)  # a miss: the database row is now in Redis, not yet in L1
    store = counting(manager, Item)

    renamed: list[bool] = []

    def rename_in_the_other_manager() -> None:
        renamed.append(True)
        rename(engine, other, "renamed")

    # The next read fetches the old row from Redis; the write lands before L1 may keep it.
    store.after_read = rename_in_the_other_manager
    assert reader.get(Item, 1) == {"id": 1, "name": "item-1"}  # read before the commit
    assert renamed == [True]

    assert reader.get(Item, 1) == {"id": 1, "name": "renamed"}


def test_many_threads_read_while_another_manager_writes(
    engine: Engine, near_config: CacheConfig, redis_config: CacheConfig
) -> None:
    manager = CacheManager(near_config)
    other = CacheManager(redis_config)
    errors: list[BaseException] = []
    stop = threading.Event()

    def read_forever() -> None:
        reader = Reader(engine, manager)
        try:
            while not stop.is_set():
                name = reader.get(Item, 2)
                assert name is not None
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=read_forever) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(100):
            with writing(engine, other) as session:
                item = session.get(Item, 2)
                assert item is not None
                item.name = f"threaded-{round_}"
                session.commit()
            assert Reader(engine, manager).get(Item, 2) == {"id": 2, "name": f"threaded-{round_}"}
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []


# --- faults -----------------------------------------------------------------------------------


def test_a_killed_tracking_connection_bypasses_then_returns(
    engine: Engine,
    near_config: CacheConfig,
    redis_config: CacheConfig,
    raw_redis: redis.Redis,
) -> None:
    manager = CacheManager(near_config)
    other = CacheManager(redis_config)
    reader = Reader(engine, manager)
    store = counting(manager, Item)
    warm(reader)
    near = near_of(manager)
    tracking_id = near.tracking_client_id
    assert tracking_id is not None

    assert raw_redis.client_kill_filter(_id=str(tracking_id)) == 1
    rename(engine, other, "while-untracked")  # no push reaches this manager for this write

    reads = store.reads
    assert reader.get(Item, 1) == {"id": 1, "name": "while-untracked"}
    assert reader.get(Item, 1) == {"id": 1, "name": "while-untracked"}
    stats = manager.near_cache_stats()
    assert stats is not None
    assert (stats.tracking, stats.entries) == (False, 0)
    assert store.reads - reads >= 2  # bypassed: every read went to Redis

    reconnect_now(manager)
    warm(reader)
    assert near.tracking_client_id not in {None, tracking_id}
    reads = store.reads
    assert reader.get(Item, 1) == {"id": 1, "name": "while-untracked"}
    assert store.reads == reads  # back to memory hits


@pytest.fixture
def private_near(key_prefix: str) -> Iterator[tuple[_servers.RedisProcess, CacheManager]]:
    """A near-cache manager on a private ``redis-server`` the test may flush, stop or pause."""
    server = _servers.start_redis_server()
    host, port = server.address
    config = CacheConfig(
        url=f"redis://{host}:{port}/0", key_prefix=key_prefix, near_cache=True, breaker_interval=0
    )
    try:
        yield server, CacheManager(config)
    finally:
        server.stop()


def test_a_flush_and_a_restart_of_redis_empty_the_near_cache(
    engine: Engine, private_near: tuple[_servers.RedisProcess, CacheManager]
) -> None:
    server, manager = private_near
    host, port = server.address
    reader = Reader(engine, manager)
    store = counting(manager, Item)
    warm(reader)
    near = near_of(manager)
    flushes = near.stats().flushes

    with redis.Redis(host, port, socket_timeout=5) as client:
        client.flushall()  # pushes a null invalidation: drop everything
    reads = store.reads
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 1
    assert store.reads > reads
    assert near.stats().flushes == flushes + 1
    assert near.stats().tracking

    warm(reader)
    server.stop()
    server.start()
    rename(engine, manager, "after-restart")  # the first call after the restart fails
    assert reader.get(Item, 1) == {"id": 1, "name": "after-restart"}
    assert not near.stats().tracking or near.stats().entries <= 1

    reconnect_now(manager)
    warm(reader)
    reads = store.reads
    assert reader.get(Item, 1) == {"id": 1, "name": "after-restart"}
    assert store.reads == reads
    assert near.stats().tracking


def test_an_unanswered_heartbeat_turns_the_near_cache_off(
    engine: Engine, private_near: tuple[_servers.RedisProcess, CacheManager]
) -> None:
    server, manager = private_near
    reader = Reader(engine, manager)
    warm(reader)
    near = near_of(manager)
    now = [0.0]
    near._clock = lambda: now[0]
    near._last_ping, near._ping_sent = 0.0, None
    pid = server._process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)  # a silently hung path: no FIN, no RST, no answer
    try:
        now[0] = 1.5  # a heartbeat is due: PING sent, served from memory meanwhile
        assert reader.loads_during(lambda: reader.get(Item, 1)) == 0
        assert near.stats().tracking
        now[0] = 4.0  # still no PONG after twice the interval: the near cache is dropped
        assert reader.get(Item, 1) == {"id": 1, "name": "item-1"}  # from the database
        stats = near.stats()
        assert (stats.tracking, stats.entries) == (False, 0)
    finally:
        os.kill(pid, signal.SIGCONT)


def test_near_hits_never_close_the_breaker_and_stop_while_it_is_open(
    engine: Engine, key_prefix: str
) -> None:
    """A frozen Redis: the first real call opens the breaker; L1 then serves nothing.

    An L1 hit is no answer from Redis, so it must not close the breaker; and while the
    breaker is open other processes' invalidations may be stuck in their queues, so L1's
    rows may be stale: reads go to the database.
    """
    with _servers.start_redis_server() as server:
        host, port = server.address
        config = CacheConfig(
            url=f"redis://{host}:{port}/0",
            key_prefix=key_prefix,
            near_cache=True,
            breaker_interval=0.2,
        )
        manager = CacheManager(config)
        reader = Reader(engine, manager)
        warm(reader, 1)
        assert reader.loads_during(lambda: reader.get(Item, 1)) == 0  # an L1 hit
        pid = server._process.pid  # type: ignore[union-attr]
        os.kill(pid, signal.SIGSTOP)
        try:
            assert reader.loads_during(lambda: reader.get(Item, 2)) == 1  # times out: opens
            assert manager.breaker_stats().state == "open"
            for _ in range(3):
                time.sleep(0.25)  # past the interval: the next read is the breaker's probe
                # Not from L1, and the probe reaches the frozen server: it stays open.
                assert reader.loads_during(lambda: reader.get(Item, 1)) == 1
                assert manager.breaker_stats().state == "open"
            assert near_of(manager).stats().entries == 0
        finally:
            os.kill(pid, signal.SIGCONT)


def test_an_unreachable_redis_turns_the_near_cache_off_not_the_reads(
    engine: Engine, key_prefix: str
) -> None:
    server = _servers.RedisProcess()  # never started: nothing listens on its port
    host, port = server.address
    manager = CacheManager(
        CacheConfig(url=f"redis://{host}:{port}/0", key_prefix=key_prefix, near_cache=True)
    )
    reader = Reader(engine, manager)

    assert reader.get(Item, 1) == {"id": 1, "name": "item-1"}
    stats = manager.near_cache_stats()
    assert stats is not None
    assert (stats.tracking, stats.hits) == (False, 0)


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["memory://", "memcached://127.0.0.1:11211", "redis+cluster://127.0.0.1:7000"]
)
def test_a_near_cache_needs_a_single_redis_server(url: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        CacheManager(CacheConfig(url=url, near_cache=True))
    assert excinfo.value.setting == "CacheConfig.near_cache"


def test_the_tracking_connection_uses_the_configured_database(
    engine: Engine, redis_address: tuple[str, int], key_prefix: str
) -> None:
    host, port = redis_address
    manager = CacheManager(
        CacheConfig(url=f"redis://{host}:{port}/3", key_prefix=key_prefix, near_cache=True)
    )
    reader = Reader(engine, manager)
    try:
        warm(reader)
        tracking_id = near_of(manager).tracking_client_id
        with redis.Redis(host, port, socket_timeout=5) as client:
            info = next(c for c in client.client_list() if int(c["id"]) == tracking_id)
        assert info["db"] == "3"
        assert "t" in info["flags"]  # tracking on
        assert "B" in info["flags"]  # broadcast mode
    finally:
        delete_redis_keys(host, port, key_prefix, db=3)


def test_a_write_of_this_process_evicts_without_waiting_for_its_push(
    engine: Engine, near_config: CacheConfig
) -> None:
    manager = CacheManager(near_config)
    reader = Reader(engine, manager)
    warm(reader)
    cache = manager._cache(Item)
    assert cache is not None
    key = cache.keys.of_ident(1)[1]
    near = near_of(manager)
    assert key in near._entries

    cache.store.write_many([(key, cache.payloads.tombstone(), 60)])

    assert key not in near._entries  # evicted before the push for this write is even read
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 1


# --- async repositories ------------------------------------------------------------------------


async def test_async_hits_are_answered_from_the_near_cache_on_the_event_loop(
    engine: Engine, near_config: CacheConfig, redis_config: CacheConfig
) -> None:
    class ItemRepo(SQLAlchemyAsyncRepository[Item]):
        model_type = Item

    database = engine.url.database
    db = SQLAlchemyAsyncConfig(
        connection_string=f"sqlite+aiosqlite:///{database}", cache_config=near_config
    )
    manager = db.cache_manager
    assert manager is not None
    other = CacheManager(redis_config)  # another process's manager on the same server

    async def read() -> str:
        async with db.get_session() as session:
            return (await ItemRepo(session=session).get(1)).name

    hops: list[Any] = []
    to_thread = asyncio.to_thread

    async def counted(function: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(function)
        return await to_thread(function, *args, **kwargs)

    try:
        for _ in range(2):  # a miss fills Redis, the next read fills the near cache
            assert await read() == "item-1"
        asyncio.to_thread = counted  # type: ignore[assignment]
        redis_reads = counting(manager, Item)
        for round_ in range(10):
            rename(engine, other, f"renamed {round_}")
            assert await read() == f"renamed {round_}"  # evicted and tombstoned: the database
            assert await read() == f"renamed {round_}"  # Redis, which fills the near cache
            before = (len(hops), redis_reads.reads)
            assert await read() == f"renamed {round_}"  # the near cache, on the loop
            assert (len(hops), redis_reads.reads) == before
    finally:
        asyncio.to_thread = to_thread  # type: ignore[assignment]
        await db.dispose()
    assert redis_reads.reads == 20  # two per round: the miss's look-up and the refill's
