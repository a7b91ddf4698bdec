"""A reader waits for another process's fill lock at most ``lock_blocking_timeout``.

An orphaned lock (its holder died, or its request ran after a freeze the client had given up
on) is held until its ``lock_timeout``. Every test here sets that to ten minutes, so the only
way a reader returns in reasonable time is the bound: each read below returns the row from
the database *while the lock is still held*, which the tests check instead of a wall clock.

* on a private Redis and a private Memcached, sync and async: an orphaned lock costs the first
  reader one bounded wait; it fills the cache, so the next reader hits; after an invalidation
  the next miss tries the lock once (the key is remembered as stuck) and reads the database;
  a lock that came free is taken again as usual;
* a lock request sent while Redis was frozen (``SIGSTOP``) runs when it thaws and leaves a
  lock nobody holds: the same bounded wait;
* ``lock_blocking_timeout`` is checked like every backend argument, from
  ``DECLCACHE_ARGUMENTS`` and URL query options, with the variable named and no secret shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import pytest
import redis

from declcache import CacheConfig, CacheManager
from declcache._fill_lock import FillLock
from declcache.backends._base import DEFAULT_LOCK_BLOCKING_TIMEOUT, DEFAULT_LOCK_TIMEOUT
from declcache.config import SQLAlchemyAsyncConfig, SQLAlchemySyncConfig
from declcache.exceptions import SettingsError
from tests import _servers
from tests.integration._repo_models import (
    AsyncAuthorRepo,
    Author,
    AuthorFactory,
    AuthorRepo,
    Base,
    reset_factories,
    seed,
    selects,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.integration.conftest import StatementLog

AUTHORS = "repo_authors"
#: Far longer than any test: an orphaned lock outlives the test unless a reader bounds its wait.
LONG_LOCK = 600
#: The bound under test, and the pause between two attempts.
BOUND, SLEEP = 0.3, 0.05


def lock_arguments(**extra: Any) -> dict[str, Any]:
    return {
        "distributed_lock": True,
        "lock_timeout": LONG_LOCK,
        "lock_blocking_timeout": BOUND,
        "lock_sleep": SLEEP,
        **extra,
    }


def backend_config(server: _servers.ServerProcess, key_prefix: str, **extra: Any) -> CacheConfig:
    host, port = server.address
    if isinstance(server, _servers.RedisProcess):
        arguments: dict[str, Any] = {"host": host, "port": port}
        backend = "dogpile.cache.redis"
    else:
        arguments = {"url": [f"{host}:{port}"]}
        backend = "dogpile.cache.pymemcache"
    return CacheConfig(
        backend=backend,
        arguments={**arguments, **lock_arguments(**extra)},
        key_prefix=key_prefix,
        breaker_interval=0,  # a freeze's timeouts must not keep later calls from the server
    )


class LockSpy:
    """Every fill lock a manager hands out, in order."""

    def __init__(self, manager: CacheManager, monkeypatch: pytest.MonkeyPatch) -> None:
        self.locks: list[FillLock] = []
        real = manager.fill_mutex

        def spy(*args: Any, **kwargs: Any) -> Any:
            lock = real(*args, **kwargs)
            assert isinstance(lock, FillLock)
            self.locks.append(lock)
            return lock

        monkeypatch.setattr(manager, "fill_mutex", spy)


class Reader:
    """Reads author 1 through a fresh session of a sync or an async repository."""

    def __init__(self, mode: str, db_path: Path, cache_config: CacheConfig) -> None:
        url = f"sqlite:///{db_path}"
        self.mode = mode
        seeder = SQLAlchemySyncConfig(connection_string=url)
        seeder.create_all(Base.metadata)
        reset_factories()
        seed(seeder, *AuthorFactory.build_batch(2))
        with seeder.get_session() as session:
            self.expected = session.get(Author, 1).name  # type: ignore[union-attr]
        seeder.dispose()
        self.db: SQLAlchemySyncConfig | SQLAlchemyAsyncConfig
        if mode == "sync":
            self.db = SQLAlchemySyncConfig(connection_string=url, cache_config=cache_config)
            self.engine = self.db.engine
        else:
            url = url.replace("sqlite://", "sqlite+aiosqlite://")
            self.db = SQLAlchemyAsyncConfig(connection_string=url, cache_config=cache_config)
            self.engine = self.db.engine.sync_engine
        assert self.db.cache_manager is not None
        self.manager: CacheManager = self.db.cache_manager

    def name(self) -> str:
        if isinstance(self.db, SQLAlchemySyncConfig):
            with self.db.get_session() as session:
                author = AuthorRepo(session=session).get(1)
            return author.name
        return asyncio.run(self._aname())

    async def _aname(self) -> str:
        assert isinstance(self.db, SQLAlchemyAsyncConfig)
        async with self.db.get_session() as session:
            author = await AsyncAuthorRepo(session=session).get(1)
        await self.manager.aclose()  # its connections belong to this event loop
        return author.name

    def dispose(self) -> None:
        if isinstance(self.db, SQLAlchemySyncConfig):
            self.db.dispose()
        else:
            asyncio.run(self.db.dispose())


@pytest.fixture(params=["redis", "memcached"])
def server(request: pytest.FixtureRequest) -> _servers.ServerProcess:
    server: _servers.ServerProcess = request.getfixturevalue(f"private_{request.param}")
    return server


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def reader(
    mode: str, server: _servers.ServerProcess, key_prefix: str, tmp_path: Path
) -> Iterator[Reader]:
    reader = Reader(mode, tmp_path / "authors.db", backend_config(server, key_prefix))
    yield reader
    reader.dispose()


def test_an_orphaned_lock_costs_one_bounded_wait_then_none(
    reader: Reader,
    monkeypatch: pytest.MonkeyPatch,
    statements: Callable[..., StatementLog],
) -> None:
    log = statements(reader.engine)
    spy = LockSpy(reader.manager, monkeypatch)
    # another process took the lock for author 1 and died: nobody will release it
    dead = CacheManager(reader.manager.config).fill_mutex(Author, 1)
    assert dead is not None
    assert dead.acquire(False)

    assert reader.name() == reader.expected  # read from the database while the lock is held
    assert selects(log, AUTHORS) == 1
    assert dead.locked()  # only the bound ended the wait: the lock lives ten minutes
    first = spy.locks[0]
    assert first.attempts >= 1
    assert first.key in first.stuck

    assert reader.name() == reader.expected  # the timed-out reader filled the cache: a hit
    assert selects(log, AUTHORS) == 1
    assert len(spy.locks) == 1  # a hit never takes the lock

    reader.manager.invalidate(Author, 1)
    assert reader.name() == reader.expected  # a miss again: the stuck key is not waited for
    assert selects(log, AUTHORS) == 2
    assert spy.locks[1].attempts == 1
    assert dead.locked()

    dead.release()  # the lock comes free: the next miss takes it and forgets the stuck key
    reader.manager.invalidate(Author, 1)
    assert reader.name() == reader.expected
    assert selects(log, AUTHORS) == 3
    assert spy.locks[2].attempts == 1
    assert spy.locks[2].key not in spy.locks[2].stuck
    assert not dead.locked()  # the reader released what it took


@contextlib.contextmanager
def frozen(server: _servers.RedisProcess) -> Iterator[None]:
    """``SIGSTOP`` the server (it keeps its sockets and answers nothing) until the block ends."""
    admin = redis.Redis(host=server.host, port=server.port, socket_timeout=5)
    try:
        pid = int(admin.info("server")["process_id"])
    finally:
        admin.close()
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_lock_request_sent_during_a_freeze_costs_one_bounded_wait(
    private_redis: _servers.RedisProcess,
    tmp_path: Path,
    key_prefix: str,
    statements: Callable[..., StatementLog],
) -> None:
    reader = Reader("sync", tmp_path / "authors.db", backend_config(private_redis, key_prefix))
    try:
        log = statements(reader.engine)
        frozen_out = CacheManager(reader.manager.config).fill_mutex(Author, 1)
        assert frozen_out is not None
        assert frozen_out.acquire(False)  # connected: the request is sent during the freeze
        frozen_out.release()
        with frozen(private_redis), pytest.raises(redis.exceptions.TimeoutError):
            frozen_out.acquire(True)  # the client gives up
        # the SET NX sent during the freeze runs now: a lock whose token nobody has
        watcher = CacheManager(reader.manager.config).fill_mutex(Author, 1)
        assert watcher is not None
        deadline = time.monotonic() + 10
        while not watcher.locked():
            assert time.monotonic() < deadline, "the request sent during the freeze never ran"
            time.sleep(0.01)

        assert reader.name() == reader.expected
        assert selects(log, AUTHORS) == 1
        assert watcher.locked()  # still held: the bound, not the lock's expiry, ended the wait
        assert not watcher.acquire(False)
    finally:
        reader.dispose()


# -- the defaults and the argument --------------------------------------------------------------


@pytest.mark.parametrize("cache_backend", ["redis", "memcached"])
def test_the_wait_is_bounded_unless_configured(cache_config: CacheConfig) -> None:
    arguments = {**cache_config.arguments, "distributed_lock": True}
    manager = CacheManager(cache_config.with_overrides(arguments=arguments))
    lock = manager.fill_mutex(Author, 1)
    assert isinstance(lock, FillLock)
    assert lock.blocking_timeout == DEFAULT_LOCK_BLOCKING_TIMEOUT
    assert lock.stuck_for == DEFAULT_LOCK_TIMEOUT
    no_wait = {**arguments, "lock_blocking_timeout": 0}
    lock = CacheManager(cache_config.with_overrides(arguments=no_wait)).fill_mutex(Author, 1)
    assert isinstance(lock, FillLock)
    assert lock.blocking_timeout == 0


@pytest.mark.parametrize("cache_backend", ["redis", "memcached"])
def test_zero_means_one_attempt(cache_config: CacheConfig) -> None:
    arguments = {**cache_config.arguments, **lock_arguments(lock_blocking_timeout=0)}
    config = cache_config.with_overrides(arguments=arguments)
    holder = CacheManager(config).fill_mutex(Author, 1)
    assert holder is not None
    assert holder.acquire(False)
    try:
        lock = CacheManager(config).fill_mutex(Author, 1)
        assert isinstance(lock, FillLock)
        assert not lock.acquire(True)
        assert lock.attempts == 1
        assert lock.key not in lock.stuck  # it did not wait: not stuck
    finally:
        holder.release()


SECRET = "s3cr3t-pa55"


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        (
            "DECLCACHE_ARGUMENTS",
            f'{{"password": "{SECRET}", "distributed_lock": true, "lock_blocking_timeout": -1}}',
            "argument 'lock_blocking_timeout': expected a number of seconds at least 0",
        ),
        (
            "DECLCACHE_ARGUMENTS",
            '{"distributed_lock": true, "lock_blocking_timeout": "2"}',
            "argument 'lock_blocking_timeout': expected a number of seconds",
        ),
        (
            "DECLCACHE_URL",
            f"redis://app:{SECRET}@h/0?distributed_lock=true&lock_blocking_timeout=soon",
            "query option 'lock_blocking_timeout': expected a number of seconds",
        ),
        (
            "DECLCACHE_URL",
            "redis://h/0?lock_blocking_timeout=7200",
            "at most 3600",
        ),
        (
            "DECLCACHE_URL",
            "memcached://h:11211?distributed_lock=true&lock_blocking_timeout=inf",
            "non-finite",
        ),
        (
            "DECLCACHE_URL",
            "memcached://h:11211?lock_blocking_timout=1",
            "did you mean 'lock_blocking_timeout'?",
        ),
    ],
)
def test_a_bad_lock_blocking_timeout_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    if variable == "DECLCACHE_ARGUMENTS":
        monkeypatch.setenv("DECLCACHE_URL", "redis://h:6379/0")
    monkeypatch.setenv(variable, value)

    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env()

    message = str(excinfo.value)
    assert excinfo.value.setting == variable
    assert says in message
    assert SECRET not in message
    assert SECRET not in repr(excinfo.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h/0?distributed_lock=true&lock_blocking_timeout=0.5", 0.5),
        ("memcached://h:11211?distributed_lock=true&lock_blocking_timeout=0", 0.0),
        ("memcached://h:11211?distributed_lock=true&lock_blocking_timeout=5&lock_sleep=0.2", 5.0),
    ],
)
def test_lock_blocking_timeout_is_read_from_urls(url: str, expected: float) -> None:
    assert CacheConfig(url=url).arguments["lock_blocking_timeout"] == expected
