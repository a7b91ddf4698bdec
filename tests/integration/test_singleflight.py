"""Concurrent misses of one key make one query: coroutines, threads, and processes.

* ``asyncio.gather`` of ten reads on ONE ``AsyncSession``: one SELECT (the followers await the
  leader's future; an AsyncSession could not run two queries at once anyway);
* ten threads, each with its own session, sharing one manager: one SELECT;
* two processes on Redis with ``distributed_lock=True``: one SELECT between them (and two
  without the lock, which shows the test can tell).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import event

from declcache._singleflight import AsyncFlights, ThreadFlights
from declcache.config import SQLAlchemyAsyncConfig, SQLAlchemySyncConfig
from declcache.repository import _async as async_repository
from tests.integration._repo_models import (
    AsyncAuthorRepo,
    Author,
    AuthorFactory,
    AuthorRepo,
    Base,
    reset_factories,
    selects,
    values,
)
from tests.integration.conftest import delete_redis_keys

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from declcache import CacheConfig
    from tests.integration.conftest import StatementLog

AUTHORS = "repo_authors"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["memory", "redis", "memcached"])
def cache_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sync_db(
    database: str, cache_config: CacheConfig, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[SQLAlchemySyncConfig]:
    url = (
        f"sqlite:///{tmp_path}/flight.db"
        if database == "sqlite"
        else str(request.getfixturevalue("postgres_url"))
    )
    config = SQLAlchemySyncConfig(connection_string=url, cache_config=cache_config)
    config.drop_all(Base.metadata)
    config.create_all(Base.metadata)
    reset_factories()
    with config.get_session() as session:
        session.add_all(AuthorFactory.build_batch(5))
        session.commit()
    yield config
    config.drop_all(Base.metadata)
    config.dispose()


@pytest.fixture
async def async_db(
    database: str, cache_config: CacheConfig, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[SQLAlchemyAsyncConfig]:
    url = (
        f"sqlite+aiosqlite:///{tmp_path}/flight.db"
        if database == "sqlite"
        else str(request.getfixturevalue("postgres_async_url"))
    )
    config = SQLAlchemyAsyncConfig(connection_string=url, cache_config=cache_config)
    await config.drop_all(Base.metadata)
    await config.create_all(Base.metadata)
    reset_factories()
    async with config.get_session() as session:
        session.add_all(AuthorFactory.build_batch(5))
        await session.commit()
    yield config
    await config.drop_all(Base.metadata)
    await config.dispose()


# -- the primitives ----------------------------------------------------------------------------


def test_thread_flights_run_one_load_for_concurrent_callers() -> None:
    flights = ThreadFlights()
    calls = []
    start = threading.Barrier(10)

    def load() -> str:
        calls.append(1)
        time.sleep(0.2)
        return "value"

    outcomes: list[Any] = []

    def worker(owner: int) -> None:
        start.wait()
        outcomes.append(flights.run("key", owner, load))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert [o.result() for o in outcomes] == ["value"] * 10
    assert sum(o.leader for o in outcomes) == 1
    assert len({o.owner for o in outcomes}) == 1  # every follower names the leader's owner


def test_thread_flight_followers_receive_the_leaders_error() -> None:
    flights = ThreadFlights()
    entered = threading.Event()

    def failing() -> None:
        entered.set()
        time.sleep(0.1)
        raise RuntimeError("database down")

    follower: list[Any] = []

    def follow() -> None:
        entered.wait()
        follower.append(flights.run("key", "b", lambda: "unused"))

    thread = threading.Thread(target=follow)
    thread.start()
    with pytest.raises(RuntimeError, match="database down"):
        flights.run("key", "a", failing)
    thread.join()
    assert isinstance(follower[0].error, RuntimeError)
    assert flights.run("key", "a", lambda: "again").value == "again"  # the key was released


async def test_async_flights_share_one_load_and_survive_a_cancelled_follower() -> None:
    flights = AsyncFlights()
    calls = []

    async def load() -> str:
        calls.append(1)
        await asyncio.sleep(0.05)
        return "value"

    tasks = [asyncio.create_task(flights.run("key", "owner", load)) for _ in range(5)]
    await asyncio.sleep(0.01)
    tasks[3].cancel()  # a follower gives up; the leader and the others carry on
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert len(calls) == 1
    assert isinstance(results[3], asyncio.CancelledError)
    assert [r.result() for i, r in enumerate(results) if i != 3] == ["value"] * 4


async def test_async_followers_load_themselves_when_the_leader_is_cancelled() -> None:
    flights = AsyncFlights()
    calls = []

    async def load() -> int:
        calls.append(1)
        await asyncio.sleep(0.05)
        return len(calls)

    leader = asyncio.create_task(flights.run("key", "a", load))
    await asyncio.sleep(0.01)
    follower = asyncio.create_task(flights.run("key", "b", load))
    await asyncio.sleep(0.01)
    leader.cancel()
    outcome = await follower
    assert outcome.leader  # it took over
    assert outcome.result() == 2


# -- asyncio.gather on one AsyncSession ---------------------------------------------------------


async def test_gather_on_one_async_session_makes_one_select(
    async_db: SQLAlchemyAsyncConfig, statements: Callable[..., StatementLog]
) -> None:
    sent = statements(async_db.engine.sync_engine)
    async with async_db.get_session() as session:
        repo = AsyncAuthorRepo(session=session)
        found = await asyncio.gather(*[repo.get(3) for _ in range(10)])
        assert selects(sent, AUTHORS) == 1
        assert len({id(item) for item in found}) == 1  # one session: one instance for all

        sent.clear()
        lists = await asyncio.gather(*[repo.list(order_by=Author.id) for _ in range(10)])
        assert selects(sent, AUTHORS) == 1
        assert all([a.id for a in items] == [1, 2, 3, 4, 5] for items in lists)

    sent.clear()  # different keys on one session: one query each, never concurrently
    async with async_db.get_session() as session:
        repo = AsyncAuthorRepo(session=session)
        many = await asyncio.gather(*[repo.get(i) for i in (1, 2, 4, 5)])
        assert [a.id for a in many] == [1, 2, 4, 5]
        assert selects(sent, AUTHORS) == 4


@pytest.mark.parametrize("late", ["look-up", "answer"])
async def test_a_late_look_up_returns_the_instance_its_session_holds(
    async_db: SQLAlchemyAsyncConfig, monkeypatch: pytest.MonkeyPatch, late: str
) -> None:
    # Of reads gathered on one session, all but the first are held back until the first
    # one's load has landed (filled the cache, put the row in the session): either before
    # they look the cache up (they hit) or before the look-up's MISS reaches them (they lead
    # a new flight that finds the fill). Each must hand back the session's instance, not a
    # detached copy from the cache.
    manager = async_db.cache_manager
    assert manager is not None
    real_probe = manager.aprobe
    before = async_repository._FLIGHTS.landed

    async def landed() -> None:
        while async_repository._FLIGHTS.landed == before:
            await asyncio.sleep(0.001)

    first = True

    async def held_back(model: type, idents: Any, **options: Any) -> Any:
        nonlocal first
        if first:
            first = False
            return await real_probe(model, idents, **options)
        if late == "look-up":
            await landed()
            return await real_probe(model, idents, **options)
        probe = await real_probe(model, idents, **options)
        await landed()
        return probe

    monkeypatch.setattr(manager, "aprobe", held_back)
    async with async_db.get_session() as session:
        repo = AsyncAuthorRepo(session=session)
        singles = asyncio.gather(*[repo.get(3) for _ in range(3)])
        batches = asyncio.gather(*[repo.get_many([3]) for _ in range(2)])
        found = [*await singles, *[items[0] for items in await batches]]
        held = await session.get(Author, 3)
        assert held is not None
        assert all(item is held for item in found)


async def test_gather_over_ten_async_sessions_makes_one_select(
    async_db: SQLAlchemyAsyncConfig, statements: Callable[..., StatementLog]
) -> None:
    sent = statements(async_db.engine.sync_engine)

    async def read() -> dict[str, Any]:
        async with async_db.get_session() as session:
            return values(await AsyncAuthorRepo(session=session).get(2))

    found = await asyncio.gather(*[read() for _ in range(10)])
    assert selects(sent, AUTHORS) == 1
    assert all(item == found[0] for item in found)


# -- threads sharing one manager -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["get", "list"])
def test_ten_threads_sharing_a_manager_make_one_select(
    sync_db: SQLAlchemySyncConfig, statements: Callable[..., StatementLog], kind: str
) -> None:
    sent = statements(sync_db.engine)

    @event.listens_for(sync_db.engine, "before_cursor_execute")
    def slow(*args: Any) -> None:  # the leader's query outlasts every thread's cache miss
        if args[2].lstrip().upper().startswith("SELECT") and AUTHORS in args[2]:
            time.sleep(0.2)

    start = threading.Barrier(10)
    results: list[Any] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            start.wait()
            with sync_db.get_session() as session:
                repo = AuthorRepo(session=session)
                if kind == "get":
                    results.append(values(repo.get(3)))
                else:
                    results.append([a.id for a in repo.list(order_by=Author.id)])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    event.remove(sync_db.engine, "before_cursor_execute", slow)
    assert errors == []
    assert selects(sent, AUTHORS) == 1
    assert len(results) == 10
    assert all(item == results[0] for item in results)


# -- processes: the backend's distributed lock ------------------------------------------------


def _run_two_workers(
    tmp_path: Path,
    redis_address: tuple[str, int],
    key_prefix: str,
    distributed_lock: bool,
    mode: str,
) -> list[dict[str, Any]]:
    db_url = f"sqlite:///{tmp_path}/shared.db"
    config = SQLAlchemySyncConfig(connection_string=db_url)
    config.create_all(Base.metadata)
    with config.get_session() as session:
        session.add(AuthorFactory.build(id=1))
        session.commit()
    config.dispose()

    go = tmp_path / "go"
    workers = []
    for index in range(2):
        options = {
            "db_url": db_url,
            "host": redis_address[0],
            "port": redis_address[1],
            "key_prefix": key_prefix,
            "distributed_lock": distributed_lock,
            "mode": mode,
            "delay": 0.5,
            "ready": str(tmp_path / f"ready{index}"),
            "go": str(go),
        }
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.integration._dlock_worker", json.dumps(options)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
            for worker in workers:
                worker.kill()
            raise AssertionError([w.communicate() for w in workers])
        time.sleep(0.01)
    go.touch()
    reports = []
    try:
        for worker in workers:
            out, err = worker.communicate(timeout=30)
            assert worker.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    return reports


@pytest.mark.parametrize(
    ("mode", "distributed_lock"),
    [("sync", True), ("async", True), ("sync", False)],
    ids=["sync-locked", "async-locked", "sync-unlocked"],
)
def test_two_processes_fill_once_with_the_distributed_lock(
    tmp_path: Path,
    redis_address: tuple[str, int],
    key_prefix: str,
    mode: str,
    distributed_lock: bool,
) -> None:
    try:
        reports = _run_two_workers(tmp_path, redis_address, key_prefix, distributed_lock, mode)
    finally:
        delete_redis_keys(*redis_address, key_prefix)
    assert reports[0]["name"] == reports[1]["name"]
    total = sum(report["selects"] for report in reports)
    assert total == (1 if distributed_lock else 2)


@pytest.mark.parametrize("cache_backend", ["redis", "memcached"])
def test_the_fill_mutex_is_the_backends_distributed_lock(cache_config: CacheConfig) -> None:
    from declcache import CacheManager

    plain = CacheManager(cache_config)
    assert plain.fill_mutex(Author, 1) is None  # no distributed_lock: no mutex
    arguments = {**cache_config.arguments, "distributed_lock": True}
    manager = CacheManager(cache_config.with_overrides(arguments=arguments))
    mine, theirs = manager.fill_mutex(Author, 1), manager.fill_mutex(Author, 1)
    assert mine.acquire(True)
    try:
        assert not theirs.acquire(False)  # held: another process would wait
        other_key = manager.fill_mutex(Author, 2)
        assert other_key.acquire(False)  # one lock per key
        other_key.release()
    finally:
        mine.release()
    assert theirs.acquire(False)
    theirs.release()
    assert manager.fill_mutex(Author, query_key="list:abc") is not None
