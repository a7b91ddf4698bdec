"""``CacheManager.close()`` / ``aclose()`` hang up on the backend and lose nothing.

What the server sees decides: every Redis connection of a manager carries the manager's
``client_name`` (the sync pools, the async reader's and the near cache's tracking
connection), so ``CLIENT LIST`` tells whether any is left; a private Memcached counts its
``curr_connections``. After a close the manager keeps working: its next call reconnects,
what was cached is still a hit, and commits still invalidate.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import pytest
import redis
from pymemcache.client.base import Client as MemcachedClient

from declcache import CacheConfig, CacheManager, Lookup
from declcache import _replay as replay_module
from declcache.config import SQLAlchemyAsyncConfig, SQLAlchemySyncConfig
from declcache.repository import SQLAlchemyAsyncRepository, SQLAlchemySyncRepository
from tests.integration._invalidation_models import (
    Base,
    Document,
    Item,
    Reader,
    reset_rows,
    writing,
)
from tests.integration.conftest import delete_redis_keys
from tests.integration.test_backend_faults import commit_rename, pause_redis, sleep_until, warm

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine

    from tests import _servers

NEW = {"id": 1, "name": "new"}


class ItemRepo(SQLAlchemySyncRepository[Item]):
    model_type = Item


class AsyncItemRepo(SQLAlchemyAsyncRepository[Item]):
    model_type = Item


@pytest.fixture
def redis_config_for(
    redis_address: tuple[str, int], key_prefix: str
) -> Iterator[Callable[..., tuple[CacheConfig, Callable[[], int]]]]:
    host, port = redis_address
    admin = redis.Redis(host, port, socket_timeout=5)

    def make(client_name: str, **overrides: Any) -> tuple[CacheConfig, Callable[[], int]]:
        config = CacheConfig(
            backend="dogpile.cache.redis",
            arguments={
                "host": host,
                "port": port,
                "connection_kwargs": {"client_name": client_name},
            },
            key_prefix=key_prefix,
        ).with_overrides(**overrides)

        def live() -> int:
            return sum(c.get("name") == client_name for c in admin.client_list())

        return config, live

    yield make
    admin.close()
    delete_redis_keys(host, port, key_prefix)


@pytest.fixture
def named_redis(
    redis_config_for: Callable[..., tuple[CacheConfig, Callable[[], int]]], key_prefix: str
) -> tuple[CacheConfig, Callable[[], int]]:
    """A Redis config whose connections are named after this test, and their live count."""
    return redis_config_for(key_prefix)


def settles_at(expected: int, count: Callable[[], int]) -> bool:
    """Whether ``count()`` reaches ``expected``: a server notices a closed socket a moment later."""
    deadline = time.monotonic() + 5.0
    while count() != expected:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def memcached_connections(server: _servers.MemcachedProcess) -> Callable[[], int]:
    """Connections the private server holds, besides the one asking.

    One admin connection asks every time: a new one per question would leave the server
    counting the previous one until it noticed that close (one too many, now and then).
    """
    admin = MemcachedClient((server.host, server.port), timeout=5)

    def count() -> int:
        return int(admin.stats()[b"curr_connections"]) - 1

    return count


# --- sync -----------------------------------------------------------------------------------------


def test_close_hangs_up_on_redis_and_the_next_read_reconnects(
    engine: Engine,
    named_redis: tuple[CacheConfig, Callable[[], int]],
) -> None:
    config, live = named_redis
    manager = CacheManager(config)
    reader = Reader(engine, manager)
    other = Reader(engine, CacheManager(config))
    warm(reader, 1, 2)
    assert live() >= 1

    manager.close()
    assert settles_at(0, live)
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 0  # still cached: a hit
    assert live() >= 1  # reconnected

    manager.close()
    commit_rename(engine, manager, 1, "new")  # the commit's invalidation reconnects too
    assert other.get(Item, 1) == NEW
    assert reader.get(Item, 1) == NEW


def test_close_hangs_up_on_memcached_and_the_next_read_reconnects(
    engine: Engine,
    private_memcached: _servers.MemcachedProcess,
    key_prefix: str,
) -> None:
    config = CacheConfig(
        backend="dogpile.cache.pymemcache",
        arguments={"url": [f"{private_memcached.host}:{private_memcached.port}"]},
        key_prefix=key_prefix,
    )
    connections = memcached_connections(private_memcached)
    idle = 0  # a private server: nothing but the admin connection, once the start-up ping left
    assert settles_at(idle, connections)
    manager = CacheManager(config)
    reader = Reader(engine, manager)
    other = Reader(engine, CacheManager(config))
    warm(reader, 1)
    warm(other, 1)
    assert connections() == idle + 2

    manager.close()
    assert settles_at(idle + 1, connections)  # only the other manager's is left
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 0
    assert connections() == idle + 2

    manager.close()
    commit_rename(engine, manager, 1, "new")
    assert other.get(Item, 1) == NEW


def test_close_delivers_invalidations_queued_during_an_outage(
    engine: Engine,
    private_redis: _servers.RedisProcess,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The background replay waits a minute here: only close() can deliver it in time.
    monkeypatch.setattr(replay_module, "RETRY_INTERVAL", 60.0)
    config = CacheConfig(
        backend="dogpile.cache.redis",
        arguments={"host": private_redis.host, "port": private_redis.port},
        key_prefix=key_prefix,
    )
    writer = CacheManager(config)
    other = Reader(engine, CacheManager(config))
    warm(other, 1)

    paused_until = pause_redis(private_redis, 1.5)
    commit_rename(engine, writer, 1, "new")
    assert writer.pending_invalidations > 0
    sleep_until(paused_until + 0.1)

    writer.close()
    assert writer.pending_invalidations == 0
    assert other.get(Item, 1) == NEW  # the server kept the old row; close dropped it


def test_close_while_the_backend_is_down_warns_and_keeps_the_queue(
    engine: Engine,
    private_redis: _servers.RedisProcess,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = CacheConfig(
        backend="dogpile.cache.redis",
        arguments={"host": private_redis.host, "port": private_redis.port},
        key_prefix=key_prefix,
    )
    manager = CacheManager(config)
    warm(Reader(engine, manager), 1)
    private_redis.stop()
    commit_rename(engine, manager, 1, "new")

    with caplog.at_level(logging.WARNING, logger="declcache.manager"):
        manager.close()  # no exception
    assert manager.pending_invalidations > 0  # still queued: the replay thread keeps trying
    assert any("invalidations the backend has not taken" in r.message for r in caplog.records)


def test_close_hangs_up_the_near_cache_which_reconnects_at_once(
    engine: Engine,
    redis_config_for: Callable[..., tuple[CacheConfig, Callable[[], int]]],
    key_prefix: str,
) -> None:
    config, live = redis_config_for(key_prefix, near_cache=True)
    writer_config, _ = redis_config_for(f"{key_prefix}-writer")
    manager = CacheManager(config)
    reader = Reader(engine, manager)
    writer = CacheManager(writer_config)
    warm(reader, 1)
    warm(reader, 1)  # the second read keeps it in L1
    stats = manager.near_cache_stats()
    assert stats is not None
    assert stats.tracking

    manager.close()
    assert settles_at(0, live)  # the tracking connection too
    stats = manager.near_cache_stats()
    assert stats is not None
    assert (stats.tracking, stats.entries) == (False, 0)

    commit_rename(engine, writer, 1, "new")  # no push can reach the closed tracking connection
    assert reader.get(Item, 1) == NEW
    stats = manager.near_cache_stats()
    assert stats is not None
    assert stats.tracking  # reconnected on that look-up, without the one-second wait


def test_sync_config_dispose_closes_the_manager(
    tmp_path: Path, named_redis: tuple[CacheConfig, Callable[[], int]]
) -> None:
    config, live = named_redis
    db = SQLAlchemySyncConfig(
        connection_string=f"sqlite:///{tmp_path}/db.sqlite", cache_config=config
    )
    db.create_all(Base.metadata)
    reset_rows(db.engine)
    with db.get_session() as session:
        assert ItemRepo(session=session).get(1).name == "item-1"
    assert live() >= 1

    db.dispose()
    assert settles_at(0, live)


# --- async ----------------------------------------------------------------------------------------


async def test_aclose_hangs_up_the_async_reader_too(
    engine: Engine, tmp_path: Path, named_redis: tuple[CacheConfig, Callable[[], int]]
) -> None:
    config, live = named_redis
    db = SQLAlchemyAsyncConfig(  # the file the engine fixture filled
        connection_string=f"sqlite+aiosqlite:///{tmp_path}/db.sqlite", cache_config=config
    )
    manager = db.cache_manager
    assert manager is not None
    for _ in range(3):  # a miss, then hits awaited through redis.asyncio
        async with db.get_session() as session:
            assert (await AsyncItemRepo(session=session).get(1)).name == "item-1"
    assert manager.stats()["Item"].hits >= 2

    await manager.aclose()
    assert settles_at(0, live)
    async with db.get_session() as session:  # reconnects
        assert (await AsyncItemRepo(session=session).get(1)).name == "item-1"
    assert manager.stats()["Item"].hits >= 3

    await db.dispose()
    assert settles_at(0, live)


async def test_models_share_their_async_connections_as_they_share_the_sync_pool(
    engine: Engine, named_redis: tuple[CacheConfig, Callable[[], int]]
) -> None:
    config, live = named_redis
    manager = CacheManager(config)
    reader = Reader(engine, manager)
    warm(reader, 1)
    assert reader.get(Document, 1) == {"id": 1, "folder_id": 1, "title": "one"}
    for model in (Item, Document, Item):  # look-ups awaited through redis.asyncio, one by one
        probe = await manager.aprobe(model, [1])
        assert probe.results[0] is not Lookup.MISS
    assert live() == 2  # one sync connection and one async connection for both models

    await manager.aclose()
    assert settles_at(0, live)


def test_writing_through_a_closed_manager_needs_no_reopen(
    engine: Engine,
    named_redis: tuple[CacheConfig, Callable[[], int]],
) -> None:
    config, _ = named_redis
    manager = CacheManager(config)
    manager.close()  # before any use: nothing to close, nothing breaks
    with writing(engine, manager) as session:
        item = session.get(Item, 2)
        assert item is not None
        item.name = "renamed"
        session.commit()
    assert Reader(engine, manager).get(Item, 2) == {"id": 2, "name": "renamed"}
