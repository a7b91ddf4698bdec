"""Fixtures shared by the integration tests: one cache config per backend, raw backend access,
and a recorder of the SQL statements an engine sends.

``cache_config``
    A :class:`~declcache.CacheConfig` for each backend declcache supports, one test per backend
    (ids ``memory``, ``redis``, ``memcached``, ``dbm``; a module may add ``valkey`` by
    overriding ``cache_backend``, see :data:`WITH_VALKEY`). Every config uses the test's own
    ``key_prefix``, so tests never see each other's keys on the shared servers. Build as many
    managers from it as a test needs: managers of one config share one store, as processes
    sharing a server would (the memory config carries one ``cache_dict`` for all of them).
    Derive variants with ``cache_config.with_overrides(serializer="msgpack")``.

    Write a backend-agnostic test once and it runs on all four::

        def test_round_trip(cache_config: CacheConfig) -> None:
            manager = CacheManager(cache_config)
            ...

    Request ``cache_backend`` to know which one runs (e.g. to skip a case on one backend).
    On dbm a watchdog turns a wait of over a second on dogpile's file lock into a
    :class:`DbmLockDeadlock` failure instead of a hang: a guard against the store taking the
    lock again while it holds it (the self-deadlock fixed in 7ce5817), since one process
    never legitimately waits that long on its own file.

``raw_cache``
    Reads and writes the raw bytes stored under a key with the backend's own client
    (redis-py, valkey-py, pymemcache, the ``dbm`` module, the memory config's dict),
    bypassing declcache and dogpile. Use it to plant corrupt or foreign payloads under the
    keys a manager reads.

``statements``
    ``statements(engine)`` starts recording every SQL statement ``engine`` sends to the
    database (SQLAlchemy's ``before_cursor_execute`` event) and returns the
    :class:`StatementLog`; the listener is removed when the test ends.
"""

from __future__ import annotations

import dbm
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import pytest
from _pytest.outcomes import OutcomeException
from sqlalchemy import event

from declcache import CacheConfig
from tests import _servers
from tests.integration._invalidation_models import sqlite_engine

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path
    from types import FrameType

    from sqlalchemy.engine import Engine


class DbmLockDeadlock(OutcomeException):
    """A dbm call waited on dogpile's file lock too long: declcache deadlocked on itself.

    Not an ``Exception``, so that declcache's ``except Exception`` fault handling cannot eat
    it and hypothesis does not retry it; an ``OutcomeException``, so that pytest handles it
    cleanly in fixture set-up too (a bare ``BaseException`` there corrupts pytest's fixture
    state for the following tests).
    """


#: Backend ids, in the order the parametrized tests run.
BACKENDS = ("memory", "redis", "memcached", "dbm")
#: The same and Valkey, for the modules that must pass on it too (stale fill, repositories):
#: ``@pytest.fixture(params=WITH_VALKEY)`` over ``cache_backend`` in the module.
WITH_VALKEY = (*BACKENDS, "valkey")


@pytest.fixture(params=BACKENDS)
def cache_backend(request: pytest.FixtureRequest) -> str:
    """The name of the backend this test runs on: memory, redis, memcached or dbm (or valkey)."""
    return str(request.param)


_DOGPILE_FILE_LOCK = os.path.join("dogpile", "cache", "backends", "file.py")


@contextmanager
def _dbm_deadlock_watchdog(limit: float = 1.0) -> Iterator[None]:
    """Raise :class:`DbmLockDeadlock` when one ``flock`` of dogpile's waits over ``limit`` s.

    One process never legitimately waits that long on its own dbm file, so this turns a hang
    into a failure (main thread only, like every signal handler).
    """
    stuck: dict[str, Any] = {"frame": None, "since": 0.0}

    def tick(_signum: int, frame: FrameType | None) -> None:
        in_lock = (
            frame is not None
            and frame.f_code.co_name == "_acquire"
            and frame.f_code.co_filename.endswith(_DOGPILE_FILE_LOCK)
        )
        if not in_lock:
            stuck["frame"] = None
        elif stuck["frame"] is not frame:
            stuck["frame"], stuck["since"] = frame, time.monotonic()
        elif time.monotonic() - stuck["since"] > limit:
            stuck["frame"] = None
            raise DbmLockDeadlock(f"blocked in dogpile's dbm file lock for over {limit} s")

    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        yield
        return
    previous = signal.signal(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A SQLite file with the invalidation tests' tables and rows (modules may override it)."""
    with sqlite_engine(tmp_path / "db.sqlite") as engine:
        yield engine


@pytest.fixture
def private_redis() -> Iterator[_servers.RedisProcess]:
    """A Redis server of this test alone, which it may stop, restart or pause."""
    server = _servers.start_redis_server()
    yield server
    server.stop()


@pytest.fixture
def private_memcached() -> Iterator[_servers.MemcachedProcess]:
    """A Memcached server of this test alone."""
    server = _servers.start_memcached_server()
    yield server
    server.stop()


@pytest.fixture
def cache_config(
    cache_backend: str, key_prefix: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[CacheConfig]:
    """A config for ``cache_backend`` under this test's ``key_prefix`` (see the module doc).

    Only the server the backend needs is asked for, so a memory test never waits for Redis.
    Redis and Valkey keys under the prefix are deleted when the test ends; memcached entries
    expire.
    """
    if cache_backend == "memory":
        yield CacheConfig(
            backend="dogpile.cache.memory",
            arguments={"cache_dict": {}},
            key_prefix=key_prefix,
        )
    elif cache_backend == "redis":
        host, port = request.getfixturevalue("redis_address")
        yield CacheConfig(
            backend="dogpile.cache.redis",
            arguments={"host": host, "port": port},
            key_prefix=key_prefix,
        )
        delete_redis_keys(host, port, key_prefix)
    elif cache_backend == "valkey":
        host, port = request.getfixturevalue("valkey_address")
        yield CacheConfig(
            backend="dogpile.cache.valkey",
            arguments={"host": host, "port": port},
            key_prefix=key_prefix,
        )
        delete_redis_keys(host, port, key_prefix)
    elif cache_backend == "memcached":
        host, port = request.getfixturevalue("memcached_address")
        yield CacheConfig(
            backend="dogpile.cache.pymemcache",
            arguments={"url": [f"{host}:{port}"]},
            key_prefix=key_prefix,
        )
    elif cache_backend == "dbm":
        with _dbm_deadlock_watchdog():
            yield CacheConfig(
                backend="dogpile.cache.dbm",
                arguments={"filename": str(tmp_path / "c.dbm")},
                key_prefix=key_prefix,
            )
    else:  # pragma: no cover - BACKENDS and this function go together
        raise AssertionError(f"unknown backend {cache_backend!r}")


def delete_redis_keys(host: str, port: int, key_prefix: str, *, db: int = 0) -> None:
    """Delete a test's keys and dogpile's lock keys for them: SCAN, never KEYS, never FLUSH."""
    import redis

    escaped = re.sub(r"([*?\[\]\\])", r"\\\1", key_prefix)
    client = redis.Redis(host=host, port=port, db=db, socket_timeout=5)
    try:
        for pattern in (f"{escaped}*", f"_lock{escaped}*"):
            keys = list(client.scan_iter(match=pattern, count=500))
            if keys:
                client.delete(*keys)
    finally:
        client.close()


class RawCache(Protocol):
    """Raw bytes under a backend key, read and written past declcache and dogpile."""

    def get(self, key: str) -> bytes | None:
        """The stored bytes, or ``None`` when the key is absent."""

    def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` as it is."""


class _DictRaw:
    """A backend's dict, or a client with the same ``get``; ``set`` per backend below."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def get(self, key: str) -> bytes | None:
        value = self._client.get(key)
        return None if value is None else bytes(value)

    def set(self, key: str, value: bytes) -> None:
        self._client[key] = value


class _RedisRaw(_DictRaw):
    def set(self, key: str, value: bytes) -> None:
        self._client.set(key, value, ex=300)


class _MemcachedRaw(_DictRaw):
    def set(self, key: str, value: bytes) -> None:
        assert self._client.set(key, value, expire=300, noreply=False)


class _DbmRaw:
    def __init__(self, filename: str) -> None:
        self._filename = filename

    def get(self, key: str) -> bytes | None:
        with dbm.open(self._filename, "c") as db:
            return db.get(key)

    def set(self, key: str, value: bytes) -> None:
        with dbm.open(self._filename, "c") as db:
            db[key] = value


@pytest.fixture
def raw_cache(cache_backend: str, cache_config: CacheConfig) -> Iterator[RawCache]:
    """The backend's own client for ``cache_config`` (see the module doc)."""
    arguments = cache_config.arguments
    if cache_backend == "memory":
        yield _DictRaw(arguments["cache_dict"])
    elif cache_backend == "redis":
        import redis

        client = redis.Redis(host=arguments["host"], port=arguments["port"], socket_timeout=5)
        yield _RedisRaw(client)
        client.close()
    elif cache_backend == "valkey":
        import valkey

        client = valkey.Valkey(host=arguments["host"], port=arguments["port"], socket_timeout=5)
        yield _RedisRaw(client)
        client.close()
    elif cache_backend == "memcached":
        from pymemcache.client.base import Client

        host, _, port = arguments["url"][0].rpartition(":")
        client = Client((host, int(port)), connect_timeout=5, timeout=5)
        yield _MemcachedRaw(client)
        client.close()
    elif cache_backend == "dbm":
        yield _DbmRaw(arguments["filename"])
    else:  # pragma: no cover
        raise AssertionError(f"unknown backend {cache_backend!r}")


class StatementLog:
    """Every SQL statement an engine sent while recording, in order."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __len__(self) -> int:
        return len(self.statements)

    def clear(self) -> None:
        """Forget what was recorded so far."""
        self.statements.clear()

    def of_kind(self, verb: str) -> list[str]:
        """The statements starting with ``verb`` (``"SELECT"``, ``"INSERT"``…)."""
        return [sql for sql in self.statements if sql.lstrip().upper().startswith(verb.upper())]

    @contextmanager
    def fresh(self) -> Iterator[list[str]]:
        """Record into a new list for the ``with`` block: ``with log.fresh() as sent: ...``."""
        self.clear()
        yield self.statements


@pytest.fixture
def statements() -> Iterator[Callable[[Engine], StatementLog]]:
    """``statements(engine)``: record what ``engine`` sends until the test ends."""
    listeners: list[tuple[Engine, Callable[..., None]]] = []

    def record(engine: Engine) -> StatementLog:
        log = StatementLog()

        def before_cursor_execute(*args: Any) -> None:
            log.statements.append(str(args[2]))

        event.listen(engine, "before_cursor_execute", before_cursor_execute)
        listeners.append((engine, before_cursor_execute))
        return log

    yield record
    for engine, listener in listeners:
        event.remove(engine, "before_cursor_execute", listener)
