"""The async Redis pool under more concurrent reads than it has connections.

Each event loop's ``redis.asyncio`` pool holds ``max_connections`` (unset: 20 per loop); a
coroutine beyond it waits for a free connection (``pool_timeout``, default 2 s) instead of
failing. Hundreds of reads above the bound are all hits, with no error and no
breaker opening; a pool exhaustion that still happens (a wait that times out) sends that read
to the database and leaves the breaker closed. ``max_connections`` and ``pool_timeout`` are
checked like every backend argument. No wall-clock asserts.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from declcache import CacheConfig, CacheManager
from declcache.backends.redis import DEFAULT_ASYNC_MAX_CONNECTIONS, DEFAULT_POOL_TIMEOUT
from declcache.config import SQLAlchemyAsyncConfig
from declcache.exceptions import SettingsError
from tests.integration._repo_models import (
    AsyncAuthorRepo,
    AuthorFactory,
    Base,
    reset_factories,
    selects,
)
from tests.integration.conftest import delete_redis_keys

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from sqlalchemy.engine import Engine

    from tests.integration.conftest import StatementLog

ROWS = 200
#: Runs of each concurrency test in a row, each on a fresh manager and fresh keys.
REPEATS = 10


def redis_config(address: tuple[str, int], key_prefix: str, **arguments: Any) -> CacheConfig:
    host, port = address
    return CacheConfig(
        backend="dogpile.cache.redis",
        arguments={"host": host, "port": port, **arguments},
        key_prefix=key_prefix,
    )


async def database(tmp_path: Path, cache_config: CacheConfig) -> SQLAlchemyAsyncConfig:
    config = SQLAlchemyAsyncConfig(
        connection_string=f"sqlite+aiosqlite:///{tmp_path}/pool.db", cache_config=cache_config
    )
    await config.create_all(Base.metadata)
    return config


@pytest.fixture
async def rows(tmp_path: Path) -> None:
    """``ROWS`` authors in a SQLite file every test of the module reads."""
    config = SQLAlchemyAsyncConfig(connection_string=f"sqlite+aiosqlite:///{tmp_path}/pool.db")
    await config.drop_all(Base.metadata)
    await config.create_all(Base.metadata)
    reset_factories()
    async with config.get_session() as session:
        session.add_all(AuthorFactory.build_batch(ROWS))
        await session.commit()
    await config.dispose()


async def concurrent_reads(db: SQLAlchemyAsyncConfig, reads: int) -> list[int]:
    """``reads`` reads of cached rows at once, each in a session of its own: their ids."""

    async def one(index: int) -> int:
        async with db.get_session() as session:
            item = await AsyncAuthorRepo(session=session).get(index % ROWS + 1)
            return int(item.id)

    return list(await asyncio.gather(*(one(i) for i in range(reads))))


async def warm(db: SQLAlchemyAsyncConfig) -> None:
    async with db.get_session() as session:
        await AsyncAuthorRepo(session=session).get_many(list(range(1, ROWS + 1)))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(({}, 2_000), id="default 20 connections, 2000 reads"),
        pytest.param(({"max_connections": 100}, 2_000), id="100 connections, 2000 reads"),
        pytest.param(({"max_connections": 20}, 400), id="20 connections, 400 reads"),
    ],
)
@pytest.mark.usefixtures("rows")
async def test_reads_beyond_the_pool_wait_and_are_all_hits(
    redis_address: tuple[str, int],
    key_prefix: str,
    tmp_path: Path,
    statements: Callable[[Engine], StatementLog],
    case: tuple[dict[str, Any], int],
) -> None:
    arguments, reads = case
    for run in range(REPEATS):
        prefix = f"{key_prefix}r{run}:"
        # A wait as long as a busy machine may need: what is tested is that callers beyond
        # the bound wait instead of failing, not how fast the loop serves them.
        config = redis_config(redis_address, prefix, pool_timeout=60, **arguments)
        db = await database(tmp_path, config)
        manager = db.cache_manager
        assert manager is not None
        try:
            await warm(db)
            sent = statements(db.engine.sync_engine)
            hits = manager.stats()["Author"].hits

            found = await concurrent_reads(db, reads)

            assert found == [i % ROWS + 1 for i in range(reads)]
            assert manager.stats()["Author"].hits - hits == reads, f"run {run}"
            assert selects(sent, "repo_authors") == 0
            assert manager.breaker_stats().opened == 0
            assert manager.breaker_stats().state == "closed"
        finally:
            await db.dispose()
            delete_redis_keys(*redis_address, prefix)


@pytest.mark.usefixtures("rows")
async def test_a_pool_exhaustion_reads_the_database_and_keeps_the_breaker_closed(
    redis_address: tuple[str, int],
    key_prefix: str,
    tmp_path: Path,
    statements: Callable[[Engine], StatementLog],
) -> None:
    """One connection, a wait of 1 ms: most of 300 reads find no connection in time."""
    config = redis_config(redis_address, key_prefix, max_connections=1, pool_timeout=0.001)
    db = await database(tmp_path, config)
    manager = db.cache_manager
    assert manager is not None
    try:
        await warm(db)
        sent = statements(db.engine.sync_engine)

        found = await concurrent_reads(db, 300)

        assert found == [i % ROWS + 1 for i in range(300)]  # every read answered, right
        assert selects(sent, "repo_authors") > 0  # ...some by the database
        assert manager.breaker_stats().opened == 0
        assert manager.breaker_stats().state == "closed"
        assert await concurrent_reads(db, 1) == [1]
    finally:
        await db.dispose()
        delete_redis_keys(*redis_address, key_prefix)


async def test_the_async_pool_takes_the_sync_pools_bound_and_waits(
    redis_address: tuple[str, int], key_prefix: str
) -> None:
    from redis.asyncio import BlockingConnectionPool

    config = redis_config(redis_address, key_prefix, max_connections=7, socket_timeout=0.75)
    manager = CacheManager(config)
    try:
        backend = manager._backend  # the pools themselves are the subject
        assert backend is not None
        region = backend.make_region("Author", 300)
        store = backend.async_store(region, backend.store(region))
        client, _ = store._client()  # type: ignore[attr-defined]
        pool = client.connection_pool
        assert isinstance(pool, BlockingConnectionPool)
        assert pool.max_connections == region.backend.writer_client.connection_pool.max_connections
        assert pool.max_connections == 7
        assert pool.timeout == DEFAULT_POOL_TIMEOUT  # unless pool_timeout is given
    finally:
        await manager.aclose()


async def test_unset_the_async_pool_is_small(
    redis_address: tuple[str, int], key_prefix: str
) -> None:
    """One loop gains no throughput from more connections, only a longer burst of replies."""
    manager = CacheManager(redis_config(redis_address, key_prefix, pool_timeout=3))
    try:
        backend = manager._backend
        assert backend is not None
        region = backend.make_region("Author", 300)
        store = backend.async_store(region, backend.store(region))
        pool = store._client()[0].connection_pool  # type: ignore[attr-defined]
        assert pool.max_connections == DEFAULT_ASYNC_MAX_CONNECTIONS
        assert pool.timeout == 3
        assert region.backend.writer_client.connection_pool.max_connections == 100  # redis-py's
    finally:
        await manager.aclose()


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ({"max_connections": 0}, "'max_connections': expected a whole number at least 1"),
        ({"max_connections": "100"}, "'max_connections': expected a whole number"),
        ({"max_connections": 2.5}, "'max_connections': expected a whole number"),
        ({"pool_timeout": 0}, "'pool_timeout': expected a number of seconds above 0"),
        ({"pool_timeout": "1"}, "'pool_timeout': expected a number of seconds"),
        ({"pool_timout": 1}, "did you mean 'pool_timeout'?"),
    ],
)
def test_max_connections_and_pool_timeout_are_checked(arguments: dict[str, Any], says: str) -> None:
    with pytest.raises(SettingsError, match=says.replace("?", r"\?")):
        CacheConfig(backend="dogpile.cache.redis", arguments={"host": "h", **arguments})


def test_they_can_be_query_options() -> None:
    config = CacheConfig(url="redis://h/0?max_connections=500&pool_timeout=2")

    assert config.arguments["connection_kwargs"]["max_connections"] == 500
    assert config.arguments["pool_timeout"] == 2.0


class _Exhausted:
    """A store that raises ``error`` on every call: an exhausted pool, or a failing server."""

    def __init__(self, error: Exception) -> None:
        from redis.exceptions import MaxConnectionsError

        self.capacity_errors = (MaxConnectionsError,)
        self.error = error

    def get_many(self, keys: Any) -> list[bytes | None]:
        raise self.error

    def reset_connections(self) -> None:
        pass


def test_the_breaker_tells_an_exhausted_pool_from_a_failing_server() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import MaxConnectionsError

    from declcache._breaker import Breaker, GuardedStore

    now = [0.0]
    breaker = Breaker(1.0, clock=lambda: now[0])
    exhausted = GuardedStore(_Exhausted(MaxConnectionsError("Too many connections")), breaker)  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(MaxConnectionsError):
            exhausted.get_many(["k"])
    assert breaker.stats().opened == 0
    assert breaker.state == "closed"

    failing = GuardedStore(_Exhausted(RedisConnectionError("refused")), breaker)  # type: ignore[arg-type]
    with pytest.raises(RedisConnectionError):
        failing.get_many(["k"])
    assert breaker.state == "open"

    now[0] = 2.0  # half-open: an exhausted pool answers the probe with nothing either way
    with pytest.raises(MaxConnectionsError):
        exhausted.get_many(["k"])
    assert breaker.state == "open"
    assert breaker.stats().opened == 1
    assert breaker.admit() == "probe"  # the next call may probe at once


async def test_the_async_breaker_too(redis_address: tuple[str, int], key_prefix: str) -> None:
    from redis.exceptions import MaxConnectionsError

    from declcache._breaker import AsyncGuardedStore, Breaker

    host, port = redis_address
    config = redis_config(redis_address, key_prefix, max_connections=1, pool_timeout=0.001)
    manager = CacheManager(config)
    try:
        backend = manager._backend  # the pool itself is the subject
        assert backend is not None
        region = backend.make_region("Author", 300)
        breaker = Breaker(60.0)
        store = AsyncGuardedStore(backend.async_store(region, backend.store(region)), breaker)
        assert MaxConnectionsError in store.not_faults
        results = await asyncio.gather(
            *(store.get_many([f"{key_prefix}k{i}"]) for i in range(200)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors  # one connection, a 1 ms wait: some found none in time
        assert all(isinstance(error, MaxConnectionsError) for error in errors)
        assert next(r for r in results if not isinstance(r, BaseException)) == [None]
        assert breaker.stats().opened == 0
    finally:
        await manager.aclose()
        delete_redis_keys(host, port, key_prefix)
