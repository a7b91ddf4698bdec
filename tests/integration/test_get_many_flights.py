"""Concurrent ``get_many`` calls asking for overlapping ids query each missing id once between them.

Eight callers ask for overlapping windows of 20 cold ids (55 distinct): each missing id is led by
the first caller to miss it and followed by the others, so the ids the database is asked for
(counted from the bound parameters of every SELECT of the authors' table) are exactly the 55,
whatever the interleaving. Threads (a session each), tasks (a session each, and all on one
``AsyncSession``), and a ``get`` joining a ``get_many``'s flight.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import event

from declcache.config import SQLAlchemyAsyncConfig, SQLAlchemySyncConfig
from tests.integration._repo_models import (
    AsyncAuthorRepo,
    AuthorFactory,
    AuthorRepo,
    Base,
    reset_factories,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine

    from declcache import CacheConfig

AUTHORS = "repo_authors"
ROWS = 60
#: Caller ``k`` asks for ``WINDOW`` ids from ``1 + STRIDE * k``: 55 distinct ids for 8 callers.
CALLERS, WINDOW, STRIDE = 8, 20, 5
#: Each run repeats the trial on fresh ids this many times (the brief: 10 in a row).
REPEATS = 10


@pytest.fixture(params=["memory", "redis"])
def cache_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def windows(base: int) -> list[list[int]]:
    return [list(range(base + STRIDE * k, base + STRIDE * k + WINDOW)) for k in range(CALLERS)]


def distinct(asked: list[list[int]]) -> set[int]:
    return {ident for window in asked for ident in window}


class IdCounter:
    """The ids SELECTs of the authors' table asked for (one bound value per id)."""

    def __init__(self, engine: Engine, delay: float = 0.0) -> None:
        self.asked: list[Any] = []
        self.delay = delay
        self._lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        statement, parameters = args[2], args[3]
        if not statement.lstrip().upper().startswith("SELECT") or AUTHORS not in statement:
            return
        bound = list(parameters.values() if isinstance(parameters, dict) else parameters)
        with self._lock:
            self.asked += bound
        if self.delay:  # the misses of concurrent callers overlap
            time.sleep(self.delay)

    def take(self) -> list[Any]:
        with self._lock:
            asked, self.asked = self.asked, []
        return asked


@pytest.fixture
def sync_db(
    database: str, cache_config: CacheConfig, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[SQLAlchemySyncConfig]:
    url = (
        f"sqlite:///{tmp_path}/many.db"
        if database == "sqlite"
        else str(request.getfixturevalue("postgres_url"))
    )
    config = SQLAlchemySyncConfig(
        connection_string=url, cache_config=cache_config, engine_config={"pool_size": CALLERS}
    )
    config.drop_all(Base.metadata)
    config.create_all(Base.metadata)
    reset_factories()
    with config.get_session() as session:
        session.add_all(AuthorFactory.build_batch(ROWS * REPEATS))
        session.commit()
    yield config
    config.drop_all(Base.metadata)
    config.dispose()


@pytest.fixture
async def async_db(
    database: str, cache_config: CacheConfig, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[SQLAlchemyAsyncConfig]:
    url = (
        f"sqlite+aiosqlite:///{tmp_path}/many.db"
        if database == "sqlite"
        else str(request.getfixturevalue("postgres_async_url"))
    )
    config = SQLAlchemyAsyncConfig(connection_string=url, cache_config=cache_config)
    await config.drop_all(Base.metadata)
    await config.create_all(Base.metadata)
    reset_factories()
    async with config.get_session() as session:
        session.add_all(AuthorFactory.build_batch(ROWS * REPEATS))
        await session.commit()
    yield config
    await config.drop_all(Base.metadata)
    await config.dispose()


def check(asked: list[list[int]], results: list[list[Any]]) -> None:
    for window, items in zip(asked, results, strict=True):
        assert [item.id for item in items] == window
        assert [item.email for item in items] == [f"author{i}@example.com" for i in window]


def threads_get_many(sync_db: SQLAlchemySyncConfig, asked: list[list[int]]) -> list[list[Any]]:
    """One thread per window, a session each, all calling ``get_many`` at once."""
    results: list[list[Any]] = [[] for _ in asked]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(asked))

    def call(index: int, window: list[int]) -> None:
        try:
            with sync_db.get_session() as session:
                repository = AuthorRepo(session=session)
                barrier.wait()
                results[index] = repository.get_many(window)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=call, args=item) for item in enumerate(asked)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return results


def test_threads_query_each_missing_id_once(sync_db: SQLAlchemySyncConfig) -> None:
    counter = IdCounter(sync_db.engine, delay=0.02)
    for trial in range(REPEATS):
        asked = windows(1 + trial * ROWS)
        results = threads_get_many(sync_db, asked)
        queried = counter.take()
        assert sorted(queried) == sorted(distinct(asked)), f"trial {trial}"
        check(asked, results)
        # ...and every one of them is now a hit
        with sync_db.get_session() as session:
            again = AuthorRepo(session=session).get_many(sorted(distinct(asked)))
        assert counter.take() == []
        assert [item.id for item in again] == sorted(distinct(asked))


@pytest.mark.parametrize("shared_session", [False, True], ids=["session each", "one session"])
async def test_tasks_query_each_missing_id_once(
    async_db: SQLAlchemyAsyncConfig, shared_session: bool
) -> None:
    counter = IdCounter(async_db.engine.sync_engine)
    for trial in range(REPEATS):
        asked = windows(1 + trial * ROWS)
        if shared_session:
            async with async_db.get_session() as session:
                repository = AsyncAuthorRepo(session=session)
                results = await asyncio.gather(*(repository.get_many(w) for w in asked))
                # one session: the followers took the leaders' very instances
                by_id = {id(item) for items in results for item in items}
                assert len(by_id) == len(distinct(asked))
        else:

            async def call(window: list[int]) -> list[Any]:
                async with async_db.get_session() as session:
                    return await AsyncAuthorRepo(session=session).get_many(window)

            results = await asyncio.gather(*(call(w) for w in asked))
        queried = counter.take()
        assert sorted(queried) == sorted(distinct(asked)), f"trial {trial}"
        check(asked, list(results))


def get_beside_get_many(sync_db: SQLAlchemySyncConfig, window: list[int]) -> dict[str, Any]:
    """A ``get_many`` of ``window`` and a ``get`` of one of its ids, in two threads at once."""
    barrier = threading.Barrier(2)
    found: dict[str, Any] = {}

    def many() -> None:
        with sync_db.get_session() as session:
            repository = AuthorRepo(session=session)
            barrier.wait()
            found["many"] = [item.id for item in repository.get_many(window)]

    def one() -> None:
        with sync_db.get_session() as session:
            repository = AuthorRepo(session=session)
            barrier.wait()
            found["one"] = repository.get(window[3]).id

    threads = [threading.Thread(target=many), threading.Thread(target=one)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return found


def test_a_get_joins_a_get_many_flight(sync_db: SQLAlchemySyncConfig) -> None:
    """``get`` and ``get_many`` of one id are one flight: one of them queries it."""
    counter = IdCounter(sync_db.engine, delay=0.05)
    for trial in range(REPEATS):
        window = list(range(1 + trial * ROWS, 1 + trial * ROWS + WINDOW))
        found = get_beside_get_many(sync_db, window)
        assert found == {"many": window, "one": window[3]}
        assert sorted(counter.take()) == window, f"trial {trial}"
