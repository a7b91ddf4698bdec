"""The circuit breaker (issue 6, fault behaviour): a dead backend costs one call per interval.

The workload test stops a private Redis (never the shared one) under reader and writer threads,
bounded in count and time, and starts it again: no request fails, no read that starts after a
commit returned sees an older row, the breaker's state changes are logged, and the backend is
called a bounded number of times while it is down (counted by a wrapper of the manager's store).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import create_engine

from declcache import CacheConfig, CacheManager, setup_cache_listeners
from declcache._breaker import BackendUnavailable, Breaker, GuardedStore
from declcache.backends.memory import MemoryStore
from tests.integration._invalidation_models import (
    Base,
    Item,
    Person,
    Reader,
    reset_rows,
    writing,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from sqlalchemy.engine import Engine

    from tests import _servers


# --- the state machine ------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_on_a_fault_lets_one_probe_through_then_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    breaker = Breaker(5.0, clock)
    assert breaker.allow()
    with caplog.at_level(logging.WARNING, logger="declcache.breaker"):
        breaker.failed(ConnectionError("down"), clock())
        breaker.failed(ConnectionError("down"), clock())  # a second in-flight call: no new log
        assert breaker.state == "open"
        assert not breaker.allow()
        clock.now += 4.9
        assert not breaker.allow()
        clock.now += 0.1
        assert breaker.allow()  # the probe
        assert breaker.state == "half-open"
        assert not breaker.allow()  # only one probe at a time
        breaker.failed(ConnectionError("still down"), clock())  # reopens, not logged again
        assert breaker.state == "open"
        clock.now += 5
        assert breaker.allow()
        breaker.succeeded(clock())
        assert breaker.state == "closed"
        assert breaker.allow()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "circuit breaker open" in messages[0]
    assert "circuit breaker closed" in messages[1]
    stats = breaker.stats()
    assert (stats.state, stats.opened, stats.refused) == ("closed", 1, 3)


def test_a_success_that_began_before_the_fault_does_not_close_it() -> None:
    clock = FakeClock()
    breaker = Breaker(1.0, clock)
    early = clock()
    clock.now += 0.1
    breaker.failed(ConnectionError("down"), clock())
    breaker.succeeded(early)
    assert breaker.state == "open"


def test_an_interval_of_zero_never_opens() -> None:
    breaker = Breaker(0)
    breaker.failed(ConnectionError("down"), 0.0)
    assert breaker.state == "closed"
    assert breaker.allow()


async def test_a_cancelled_probe_lets_the_next_call_probe_again() -> None:
    """A probe that never answers (its caller was cancelled) must not leave it half-open."""
    clock = FakeClock()
    breaker = Breaker(1.0, clock)
    breaker.failed(ConnectionError("down"), clock())
    clock.now += 1
    started = asyncio.Event()

    async def hanging_probe() -> None:
        with breaker.attempt() as probing:
            assert probing
            started.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(hanging_probe())
    await started.wait()
    assert breaker.state == "half-open"
    assert not breaker.allow()  # the probe is out
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert breaker.allow()  # the next call probes at once
    breaker.succeeded(clock())
    assert breaker.state == "closed"


def test_the_guard_does_not_call_the_store_while_open() -> None:
    clock = FakeClock()
    calls: list[str] = []

    class Failing(MemoryStore):
        def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
            calls.append("get")
            raise ConnectionError("down")

    guard = GuardedStore(Failing({}), Breaker(1.0, clock))
    with pytest.raises(ConnectionError):
        guard.get_many(["a"])
    for _ in range(10):
        with pytest.raises(BackendUnavailable):
            guard.get_many(["a"])
    assert calls == ["get"]
    guard.inner = MemoryStore({"a": b"1"})
    clock.now += 1
    assert guard.get_many(["a"]) == [b"1"]
    assert guard.breaker.state == "closed"


# --- a Redis stopped under load ---------------------------------------------------------------


class CountingStore:
    """Wraps the store under the breaker; counts every call that reached the backend.

    ``calls`` counts the calls of requests; the background replay's probes, which do not
    wait for the breaker's interval, are counted apart in ``replay_calls``.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.replay_calls = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        replay = threading.current_thread().name == "declcache-replay"
        with self._lock:
            if replay:
                self.replay_calls += 1
            else:
                self.calls += 1

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self._count()
        return self.inner.get_many(keys)  # type: ignore[no-any-return]

    def set_many(self, mapping: Mapping[str, bytes], ttl: int) -> None:
        self._count()
        self.inner.set_many(mapping, ttl)

    def write_many(self, entries: Sequence[tuple[str, bytes, int]]) -> None:
        self._count()
        self.inner.write_many(entries)

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        self._count()
        return self.inner.add(key, value, ttl)  # type: ignore[no-any-return]

    def compare_and_set(self, swaps: Sequence[Any], ttl: int) -> list[bool]:
        self._count()
        return self.inner.compare_and_set(swaps, ttl)  # type: ignore[no-any-return]

    def delete_many(self, keys: Sequence[str]) -> None:
        self._count()
        self.inner.delete_many(keys)

    def reset_connections(self) -> None:  # closes sockets: sends no command
        self.inner.reset_connections()


@pytest.fixture
def engine(tmp_path: Any) -> Iterator[Engine]:
    setup_cache_listeners()
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", connect_args={"timeout": 30})
    Base.metadata.create_all(engine)
    reset_rows(engine)
    yield engine
    engine.dispose()


READERS = 4
IDENTS = (1, 2, 3)
INTERVAL = 0.5
OUTAGE = 2.0


class Workload:
    """Reader threads and one writer; checks every read against the commits before it."""

    def __init__(self, engine: Engine, manager: CacheManager) -> None:
        self.engine = engine
        self.manager = manager
        self.stop = threading.Event()
        self.failures: list[BaseException] = []
        self.stale: list[str] = []
        self.reads = 0
        self.writes = 0
        #: Per item: (monotonic time the commit returned, version written).
        self.committed: dict[int, list[tuple[float, int]]] = {i: [(0.0, 0)] for i in IDENTS}
        self._lock = threading.Lock()
        self.writing = threading.Event()
        self.writing.set()

    def version_before(self, ident: int, started: float) -> int:
        with self._lock:
            return max(v for t, v in self.committed[ident] if t <= started)

    def read_loop(self, offset: int) -> None:
        reader = Reader(self.engine, self.manager)
        n = offset
        while not self.stop.is_set():
            ident = IDENTS[n % len(IDENTS)]
            n += 1
            started = time.monotonic()
            try:
                got = reader.get(Item, ident)
            except BaseException as error:
                self.failures.append(error)
                continue
            assert got is not None
            name = got["name"]
            version = 0 if name.startswith("item-") else int(name.removeprefix("v"))
            expected = self.version_before(ident, started)
            if version < expected:
                self.stale.append(f"item {ident}: read v{version}, v{expected} was committed")
            try:  # a model nobody writes: its reads meet the breaker, not the replay queue
                person = reader.get(Person, 1 + n % 2)
            except BaseException as error:
                self.failures.append(error)
                continue
            assert person is not None
            assert person["name"] == ("Ann" if person["id"] == 1 else "Bob")
            with self._lock:
                self.reads += 1
            time.sleep(0.001)

    def write_loop(self) -> None:
        version = 0
        while not self.stop.is_set():
            if not self.writing.wait(0.05):
                continue
            version += 1
            ident = IDENTS[version % len(IDENTS)]
            try:
                with writing(self.engine, self.manager) as session:
                    session.get(Item, ident).name = f"v{version}"
                    session.commit()
            except BaseException as error:
                self.failures.append(error)
                continue
            with self._lock:
                self.committed[ident].append((time.monotonic(), version))
                self.writes += 1
            time.sleep(0.01)


def pause_redis(server: _servers.RedisProcess, seconds: float) -> None:
    """``CLIENT PAUSE`` every client: calls time out, the data stays."""
    import redis

    admin = redis.Redis(host=server.host, port=server.port, socket_timeout=5)
    try:
        admin.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")
    finally:
        admin.close()


def count_backend_calls(manager: CacheManager, *models: type) -> CountingStore:
    """Put one counter under the breaker of each model's store (they share connections)."""
    counter = CountingStore(None)
    for model in models:
        cache = manager._cache(model)
        assert cache is not None
        guard = cache.store
        assert isinstance(guard, GuardedStore)
        counter.inner = guard.inner
        guard.inner = counter
    return counter


def check_recovered(work: Workload) -> None:
    """Every item reads as the database has it, and from the cache again."""
    deadline = time.monotonic() + 5  # an invalidation queued as it recovered is replayed
    while work.manager.pending_invalidations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert work.manager.pending_invalidations == 0
    final = Reader(work.engine, work.manager)
    for ident in IDENTS:
        expected = work.version_before(ident, time.monotonic())
        got = final.get(Item, ident)
        assert got is not None
        assert got["name"] == (f"item-{ident}" if expected == 0 else f"v{expected}")
        loads = final.loads_during(lambda i=ident: final.get(Item, i))
        assert loads == 0, (work.manager.stats(), work.manager.breaker_stats())


def check_counted(manager: CacheManager) -> None:
    stats = manager.stats()
    assert stats["Item"].errors + stats["Person"].errors >= 1
    assert stats["Item"].invalidations_queued > 0
    assert stats["Person"].short_circuited > 0
    assert manager.breaker_stats().opened >= 1
    assert manager.breaker_stats().refused > 0


def check_logged_once_per_change(caplog: pytest.LogCaptureFixture, opened: int) -> None:
    messages = [r.getMessage() for r in caplog.records if r.name == "declcache.breaker"]
    assert sum("circuit breaker open" in m for m in messages) == opened
    assert sum("circuit breaker closed" in m for m in messages) == opened


@pytest.mark.parametrize("fault", ["stop", "pause"])
def test_a_redis_failing_under_load_costs_one_call_per_interval(
    engine: Engine,
    key_prefix: str,
    private_redis: _servers.RedisProcess,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    """``stop``: refused connections, back empty; ``pause``: timeouts, back with its data."""
    config = CacheConfig(
        backend="dogpile.cache.redis",
        arguments={"host": private_redis.host, "port": private_redis.port},
        key_prefix=key_prefix,
        breaker_interval=INTERVAL,
    )
    manager = CacheManager(config)
    counter = count_backend_calls(manager, Item, Person)
    work = Workload(engine, manager)
    threads = [
        threading.Thread(target=work.read_loop, args=(n,), daemon=True) for n in range(READERS)
    ]
    threads.append(threading.Thread(target=work.write_loop, daemon=True))
    caplog.set_level(logging.WARNING, logger="declcache")
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        healthy_reads = work.reads
        assert manager.breaker_stats().state == "closed"

        if fault == "stop":
            private_redis.stop()
        else:
            pause_redis(private_redis, OUTAGE)
        time.sleep(0.1)  # the calls already on their way when it failed are not counted
        calls_before, reads_before = counter.calls, work.reads
        time.sleep(OUTAGE - 0.4)  # measured inside the outage, not as it ends
        outage_calls = counter.calls - calls_before
        outage_reads = work.reads - reads_before
        time.sleep(0.3)
        assert manager.breaker_stats().state in {"open", "half-open"}
        assert manager.pending_invalidations > 0

        private_redis.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            manager.breaker_stats().state != "closed" or manager.pending_invalidations
        ):
            time.sleep(0.05)
        assert manager.breaker_stats().state == "closed"
        reads_after = work.reads
        time.sleep(1.0)  # keep reading and writing against the recovered server
        work.writing.clear()
        time.sleep(0.3)
    finally:
        work.stop.set()
        for thread in threads:
            thread.join(10)
    assert not any(thread.is_alive() for thread in threads)

    assert work.failures == []
    assert work.stale == []
    assert min(healthy_reads, outage_reads, work.reads - reads_after, work.writes) > 10
    # One probe per interval, not one per request.
    bound = int((OUTAGE - 0.4) / INTERVAL) + 2
    assert outage_calls <= bound, (outage_calls, outage_reads, manager.breaker_stats())
    check_counted(manager)
    breaker = manager.breaker_stats()
    check_logged_once_per_change(caplog, breaker.opened)
    check_recovered(work)
    print(  # the figures of the report
        f"\n{fault}: outage {OUTAGE}s, interval {INTERVAL}s: {outage_calls} backend calls for "
        f"{outage_reads} reads; breaker opened {breaker.opened}x, refused {breaker.refused}; "
        f"{counter.replay_calls} calls of the background replay"
    )
