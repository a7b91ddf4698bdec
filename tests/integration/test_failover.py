"""Failover (issue 16): a Sentinel group and a Redis Cluster lose a master under load.

Real processes only: a private Sentinel group (a master, a replica started with
``--replicaof``, three Sentinels, quorum 2, ``down-after-milliseconds 500``) and a private
Redis Cluster (three masters with a replica each, ``cluster-node-timeout 1000``), both from
``tests/_servers.py``. A writer thread and reader threads share one :class:`CacheManager` in
the test process; reader processes (``spawn``) each have their own manager on the same cache
URL and the same SQLite file (WAL). Then a master is killed (``SIGKILL``) or frozen
(``SIGSTOP``) and Sentinel, or the cluster, promotes its replica. Every manager runs with the
default settings (0.5 s timeouts, a 1 s circuit breaker).

Every read and write goes through declcache, and each workload test checks that:

- no request failed, in any process: the cache degrades to the database, it never raises;
- no read returned an older version of a row than the last one whose commit had returned
  before the read started (the writer logs ``(monotonic time, version)`` per commit; every
  reader logs when it started and what it got; ``time.monotonic`` is one clock for every
  process of the machine);
- every process is served from the cache again after the failover (a hit on each model by a
  read that started after the fault), and the test process reads every row as last committed.

The figures are printed (``pytest -s``): failed requests, stale reads, and per process the
seconds from the fault to the promotion, to its first hit, and to its last miss on a row
nobody writes (from then on every read is a hit again). Nothing is timed in an assertion; the
waits for the failover and the recovery are liveness deadlines only.

Two faults are reproduced deterministically at the end (both were bugs, fixed in issue 16):

- **A model first used while a cluster master is down.** dogpile's cluster backend connects
  when its region is made: the read goes to the database and the commit's invalidation is
  queued (``CacheManager._cache`` raises ``BackendUnavailable``; ``is_cached`` is decided by
  the settings alone).
- **Another process reads through the masters that live.** An invalidation's keys live on
  several masters; each master gets its own pipeline, so the lost one does not keep the
  others from their tombstones (``ClusterStore.write_many``), and the rest is replayed.

Every workload test asserts that no process reads a row older than a commit once
:data:`WINDOW` (250 ms, issue 16's target) has passed after the takeover.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import create_engine, event

from declcache import CacheConfig, CacheManager, setup_cache_listeners
from tests import _servers
from tests.integration._invalidation_models import (
    Base,
    Item,
    Person,
    Reader,
    reset_rows,
    writing,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from multiprocessing.synchronize import Event as EventType
    from pathlib import Path

    from sqlalchemy.engine import Engine

IDENTS = (1, 2, 3)
#: The models every reader reads, in the order of the per-model hit times.
MODELS = (Item, Person)
#: Reader threads in the test process (they share the writer's manager).
READER_THREADS = 2
#: Reader processes, each with a manager of its own.
READER_PROCESSES = 2
#: Liveness deadline of every wait (warm-up, failover, recovery): never reached when green.
DEADLINE = 30.0
#: How long the workload goes on once every process is served from the cache again.
AFTERWARDS = 1.0

#: One read: (model name, ident, monotonic start, monotonic end, version read, was a hit).
ReadRecord = tuple[str, int, float, float, int, bool]

#: Seconds after the takeover from which no process may read a row older than a commit.
WINDOW = 0.25


# --- the workload -----------------------------------------------------------------------------


def open_engine(path: Path) -> Engine:
    """The SQLite file every process shares, in WAL mode so readers never wait for the writer."""
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _wal(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA journal_mode=WAL")

    return engine


def version_of(row: dict[str, Any] | None) -> int:
    """The version an item's name carries: ``item-N`` is 0, ``vK`` is K."""
    assert row is not None
    name = str(row["name"])
    return 0 if name.startswith("item-") else int(name.removeprefix("v"))


def read_loop(
    *,
    engine: Engine,
    manager: CacheManager,
    stop: threading.Event | EventType,
    offset: int,
    reads: list[ReadRecord],
    failures: list[str],
    on_hit: Callable[[int, float], None],
) -> None:
    """Read items and people until ``stop``, one fresh session per read; log every read.

    Any exception is a failed request (declcache must answer from the database instead).
    ``on_hit(model index, start)`` is told of every hit.
    """
    reader = Reader(engine, manager)
    n = offset
    while not stop.is_set():
        n += 1
        for index, (model, ident) in enumerate(
            ((Item, IDENTS[n % len(IDENTS)]), (Person, 1 + n % 2))
        ):
            loads = reader.loads
            started = time.monotonic()
            try:
                got = reader.get(model, ident)
            except Exception:
                failures.append(
                    f"at {time.monotonic():.3f} read {model.__name__} {ident}:\n"
                    f"{traceback.format_exc()}"
                )
                continue
            ended = time.monotonic()
            hit = reader.loads == loads
            if model is Person:  # never written: it must always read as it was made
                expected = "Ann" if ident == 1 else "Bob"
                if got is None or got["name"] != expected:
                    failures.append(f"at {ended:.3f} read Person {ident}: got {got!r}")
                version = 0
            else:
                version = version_of(got)
            reads.append((model.__name__, ident, started, ended, version, hit))
            if hit:
                on_hit(index, started)
        time.sleep(0.002)


def reader_process(
    *,
    url: str,
    key_prefix: str,
    db_path: str,
    offset: int,
    go: EventType,
    stop: EventType,
    last_hits: Any,
    results: Any,
) -> None:
    """A reader in a process of its own (``spawn``): its own engine and manager.

    Sends ``(reads, failures, stats, breaker stats)`` on ``results`` when ``stop`` is set.
    ``last_hits`` (shared doubles, one per model) holds when the latest hit read started.
    """
    from pathlib import Path

    setup_cache_listeners()
    engine = open_engine(Path(db_path))
    reads: list[ReadRecord] = []
    failures: list[str] = []
    stats: dict[str, dict[str, int]] = {}
    breaker: tuple[str, int, int] = ("", 0, 0)
    go.wait(DEADLINE * 2)

    def on_hit(index: int, started: float) -> None:
        last_hits[index] = max(last_hits[index], started)

    try:
        manager = CacheManager(CacheConfig(url=url, key_prefix=key_prefix))
        try:
            read_loop(
                engine=engine,
                manager=manager,
                stop=stop,
                offset=offset,
                reads=reads,
                failures=failures,
                on_hit=on_hit,
            )
        finally:
            stats = {name: value.as_dict() for name, value in manager.stats().items()}
            found = manager.breaker_stats()
            breaker = (found.state, found.opened, found.refused)
            manager.close()
    except Exception:
        failures.append(f"reader process {offset}:\n{traceback.format_exc()}")
    finally:
        engine.dispose()
        results.put((reads, failures, stats, breaker))


@dataclass
class ProcessResult:
    """What one process of the workload saw."""

    name: str
    reads: list[ReadRecord] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    breaker: tuple[str, int, int] = ("", 0, 0)

    def first_hit_after(self, moment: float) -> float | None:
        """When the first read that started after ``moment`` and hit the cache returned."""
        ends = [end for _, _, start, end, _, hit in self.reads if hit and start > moment]
        return min(ends, default=None)

    def last_person_miss_after(self, moment: float) -> float:
        """When the last read of a person that missed the cache returned (or ``moment``).

        People are never written: once they are cached, a miss means the cache did not
        answer. After the last one, every read of them is a hit again.
        """
        ends = [
            end
            for model, _, start, end, _, hit in self.reads
            if model == "Person" and not hit and start > moment
        ]
        return max(ends, default=moment)


class Workload:
    """A writer and reader threads on one manager here, and reader processes with their own.

    A context manager: on entry the reader processes are spawned (they import and open the
    database, then wait); :meth:`go` starts everyone once the cache servers are up. On exit
    everything is stopped and joined, and each process's log gathered in :attr:`results`.
    """

    def __init__(self, engine: Engine, db_path: Path, url: str, key_prefix: str) -> None:
        self.engine = engine
        self.url = url
        self.key_prefix = key_prefix
        self.manager: CacheManager | None = None
        self.stop = threading.Event()
        self.writing = threading.Event()
        self.failures: list[str] = []
        self.writes = 0
        #: Per item: (monotonic time its commit returned, version written).
        self.committed: dict[int, list[tuple[float, int]]] = {i: [(0.0, 0)] for i in IDENTS}
        self.results: list[ProcessResult] = []
        self._last_hits = [0.0] * len(MODELS)  # per model, when this process's latest hit began
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._thread_reads: list[list[ReadRecord]] = []
        context = multiprocessing.get_context("spawn")
        self._go = context.Event()
        self._process_stop = context.Event()
        self._queue = context.Queue()
        self._process_hits = [context.Array("d", len(MODELS)) for _ in range(READER_PROCESSES)]
        self._processes = [
            context.Process(
                target=reader_process,
                kwargs={
                    "url": url,
                    "key_prefix": key_prefix,
                    "db_path": str(db_path),
                    "offset": n,
                    "go": self._go,
                    "stop": self._process_stop,
                    "last_hits": self._process_hits[n],
                    "results": self._queue,
                },
                name=f"failover-reader-{n}",
                daemon=True,
            )
            for n in range(READER_PROCESSES)
        ]

    def __enter__(self) -> Workload:
        for process in self._processes:
            process.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.finish()
            return
        try:  # stop everything; what went wrong first is the failure to report
            self.finish()
        except Exception as error:
            print(f"while stopping the workload after a failure: {error!r}")

    def go(self) -> None:
        """Start the writer and every reader (the cache servers must be up)."""
        self.manager = CacheManager(CacheConfig(url=self.url, key_prefix=self.key_prefix))
        self._go.set()
        self.writing.set()
        for n in range(READER_THREADS):
            reads: list[ReadRecord] = []
            self._thread_reads.append(reads)
            self._threads.append(
                threading.Thread(
                    target=read_loop,
                    kwargs={
                        "engine": self.engine,
                        "manager": self.manager,
                        "stop": self.stop,
                        "offset": 100 + n,
                        "reads": reads,
                        "failures": self.failures,
                        "on_hit": self._on_hit,
                    },
                    daemon=True,
                )
            )
        self._threads.append(threading.Thread(target=self._write_loop, daemon=True))
        for thread in self._threads:
            thread.start()

    def _on_hit(self, index: int, started: float) -> None:
        with self._lock:
            self._last_hits[index] = max(self._last_hits[index], started)

    def _write_loop(self) -> None:
        assert self.manager is not None
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
            except Exception:
                self.failures.append(
                    f"at {time.monotonic():.3f} write item {ident} v{version}:\n"
                    f"{traceback.format_exc()}"
                )
                continue
            with self._lock:
                self.committed[ident].append((time.monotonic(), version))
                self.writes += 1
            time.sleep(0.01)

    def earliest_last_hit(self) -> float:
        """The oldest of every process's latest hit on each model (0 before any)."""
        with self._lock:
            mine = min(self._last_hits)
        return min([mine, *(min(hits[:]) for hits in self._process_hits)])

    def wait_for_hits(self, after: float, what: str) -> None:
        """Wait until every process hit each model with a read that started after ``after``.

        Before the fault this also makes sure every process built each model's cache.
        """
        deadline = time.monotonic() + DEADLINE
        while self.earliest_last_hit() <= after:
            assert not self.failures, self.failures[0]
            dead = [p.name for p in self._processes if not p.is_alive()]
            assert not dead, f"reader processes exited early: {dead}"
            assert time.monotonic() < deadline, (
                f"not every process hit every model {what} within {DEADLINE}s "
                f"(the oldest last hit began at {self.earliest_last_hit():.3f}, after {after:.3f})"
            )
            time.sleep(0.02)

    def version_before(self, ident: int, started: float) -> int:
        """The last version of ``ident`` whose commit returned before ``started``."""
        with self._lock:
            return max(v for t, v in self.committed[ident] if t <= started)

    def finish(self) -> None:
        """Stop every thread and process; gather what each one logged (once)."""
        if self.results:
            return
        self.stop.set()
        self._process_stop.set()
        self._go.set()  # a process still waiting to start leaves at once
        for thread in self._threads:
            thread.join(DEADLINE)
        alive_threads = [t.name for t in self._threads if t.is_alive()]
        mine = ProcessResult("test process", failures=list(self.failures))
        for reads in self._thread_reads:
            mine.reads += reads
        if self.manager is not None:
            mine.stats = {name: value.as_dict() for name, value in self.manager.stats().items()}
            found = self.manager.breaker_stats()
            mine.breaker = (found.state, found.opened, found.refused)
        self.results.append(mine)
        started = [p for p in self._processes if p.pid is not None]
        for n in range(len(started)):
            try:
                reads, failures, stats, breaker = self._queue.get(timeout=DEADLINE)
            except Exception:  # a process that died sends nothing: reported below
                break
            self.results.append(
                ProcessResult(f"reader process {n}", reads, failures, stats, breaker)
            )
        for process in started:
            process.join(DEADLINE)
            if process.is_alive():
                process.kill()
                process.join()
        assert not alive_threads, f"threads still running: {alive_threads}"
        failed = [p.name for p in started if p.exitcode != 0]
        assert not failed, f"reader processes failed: {failed}"
        assert len(self.results) == 1 + len(started), "a reader process sent no results"

    def stale_reads(self, result: ProcessResult, after: float = float("-inf")) -> list[str]:
        """The item reads of ``result`` that began at ``after`` or later and returned an older
        version than the last commit returned before they began."""
        stale = []
        for model, ident, started, ended, version, hit in result.reads:
            if model != "Item" or started < after:
                continue
            expected = self.version_before(ident, started)
            if version < expected:
                stale.append(
                    f"{result.name}: item {ident} read v{version} "
                    f"({'hit' if hit else 'database'}) from {started:.3f} to {ended:.3f}, "
                    f"v{expected} was committed"
                )
        return stale


# --- the report and the checks ----------------------------------------------------------------


@dataclass
class Figures:
    """What a failover cost, as printed and asserted."""

    fault: str
    failed: int
    stale_here: list[str]
    stale_elsewhere: list[str]
    #: Stale reads of other processes that began over :data:`WINDOW` after the takeover.
    late_elsewhere: list[str]
    promoted_after: float
    #: Per process: seconds from the fault to its first hit, None if it had none.
    first_hit_after: dict[str, float | None]
    #: Per process: seconds from the fault until every read of a person hit again.
    all_hits_after: dict[str, float]
    reads: int
    writes: int

    def line(self) -> str:
        recovered = "; ".join(
            f"{name} {'never' if first is None else f'{first:.2f}s'} / "
            f"{self.all_hits_after[name]:.2f}s"
            for name, first in self.first_hit_after.items()
        )
        return (
            f"{self.fault}: {self.failed} failed requests, {len(self.stale_here)} stale reads "
            f"in the test process, {len(self.stale_elsewhere)} in the reader processes "
            f"({self.reads} reads, {self.writes} writes); replica promoted after "
            f"{self.promoted_after:.2f}s; after the fault, first hit / every read a hit again: "
            f"{recovered}"
        )


def run_failover(
    work: Workload,
    fault: Callable[[], str],
    takeover: Callable[[], object],
    after_takeover: Callable[[], None] | None = None,
) -> Figures:
    """Warm up, ``fault()``, wait for ``takeover()`` and for hits everywhere, go on, stop.

    Asserts everything but the stale reads of the reader processes, which the caller hands
    to :func:`expect_no_stale_reads_elsewhere` once its own checks are done.
    """
    work.go()
    work.wait_for_hits(after=0.0, what="before the fault")

    description = fault()
    fault_at = time.monotonic()  # after the signal: every read that starts later meets it
    takeover()
    promoted_at = time.monotonic()
    if after_takeover is not None:
        after_takeover()
    work.wait_for_hits(after=promoted_at, what="after the failover")
    time.sleep(AFTERWARDS)  # reading and writing against the new master
    work.writing.clear()
    time.sleep(0.2)
    work.finish()

    failures = [f"{r.name} {failure}" for r in work.results for failure in r.failures]
    recovered: dict[str, float | None] = {}
    steady: dict[str, float] = {}
    for result in work.results:
        first = result.first_hit_after(fault_at)
        recovered[result.name] = None if first is None else first - fault_at
        steady[result.name] = result.last_person_miss_after(fault_at) - fault_at
    figures = Figures(
        fault=description,
        failed=len(failures),
        stale_here=work.stale_reads(work.results[0]),
        stale_elsewhere=[s for r in work.results[1:] for s in work.stale_reads(r)],
        late_elsewhere=[
            s for r in work.results[1:] for s in work.stale_reads(r, after=promoted_at + WINDOW)
        ],
        promoted_after=promoted_at - fault_at,
        first_hit_after=recovered,
        all_hits_after=steady,
        reads=sum(len(result.reads) for result in work.results),
        writes=work.writes,
    )
    print(f"\n{figures.line()}")
    for result in work.results:
        print(f"  {result.name}: breaker {result.breaker}, {_brief(result.stats)}")
    for stale in figures.stale_here + figures.stale_elsewhere:
        print(f"  stale: {stale} (fault at {fault_at:.3f}, promoted at {promoted_at:.3f})")

    assert failures == [], "\n".join(failures[:3])
    assert figures.stale_here == [], "\n".join(figures.stale_here[:10])
    assert all(seconds is not None for seconds in recovered.values()), recovered
    # The fault was seen: the test process's breaker opened and its readers met errors.
    assert work.results[0].breaker[1] >= 1, work.results[0]
    assert sum(stats["errors"] for stats in work.results[0].stats.values()) > 0
    assert work.writes > 10
    return figures


def _brief(stats: dict[str, dict[str, int]]) -> str:
    keys = ("hits", "misses", "errors", "short_circuited", "invalidations_queued")
    return "; ".join(
        f"{model} " + " ".join(f"{key}={values[key]}" for key in keys)
        for model, values in sorted(stats.items())
    )


def check_served_from_the_cache(work: Workload) -> None:
    """Once replayed, every item reads as last committed, and a second read is a hit."""
    manager = work.manager
    assert manager is not None
    deadline = time.monotonic() + DEADLINE
    while manager.pending_invalidations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.pending_invalidations == 0
    reader = Reader(work.engine, manager)
    for ident in IDENTS:
        expected = work.version_before(ident, time.monotonic())
        assert version_of(reader.get(Item, ident)) == expected
        assert reader.loads_during(lambda i=ident: reader.get(Item, i)) == 0
        assert version_of(reader.seen[-1]) == expected


def expect_no_stale_reads_elsewhere(figures: Figures) -> None:
    """Other processes read no stale row that began over :data:`WINDOW` after the takeover.

    Before that, the committing process's queue may still hold the invalidation of a key the
    promoted replica holds old (issue 16's target: 250 ms).
    """
    assert figures.late_elsewhere == [], "\n".join(figures.late_elsewhere[:10])


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db.sqlite"


@pytest.fixture
def engine(db_path: Path) -> Iterator[Engine]:
    setup_cache_listeners()
    engine = open_engine(db_path)
    Base.metadata.create_all(engine)
    reset_rows(engine)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _redis_server_installed() -> None:
    if _servers.RedisProcess.executable() is None:
        _servers.unavailable("redis-server is not installed: cannot start a replicated group")


def new_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


# --- Sentinel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_sentinel_promotes_the_replica_under_load(
    engine: Engine, db_path: Path, tmp_path: Path, key_prefix: str, fault: str
) -> None:
    """``kill``: SIGKILL, the master is gone; ``freeze``: SIGSTOP, then SIGCONT once replaced.

    A frozen master keeps its sockets open and answers nothing: clients time out instead of
    being refused. Thawed after the promotion, it still holds the old data (and believes it
    is the master) until Sentinel turns it into a replica: nobody may read from it.
    """
    group = _servers.RedisSentinelGroup(new_dir(tmp_path, "sentinel"))
    with Workload(engine, db_path, group.url, key_prefix) as work, group:
        old = group.master

        def strike() -> str:
            if fault == "kill":
                old.stop()
                return "Sentinel, master SIGKILLed"
            old.freeze()
            return "Sentinel, master SIGSTOPped"

        figures = run_failover(
            work,
            strike,
            lambda: group.wait_for_new_master(old.address, timeout=DEADLINE),
            old.thaw if fault == "freeze" else None,
        )
        assert group.master_address() == group.replica.address
        check_served_from_the_cache(work)
    expect_no_stale_reads_elsewhere(figures)


# --- Cluster ----------------------------------------------------------------------------------


def busiest_master(cluster: _servers.RedisClusterGroup, key_prefix: str) -> Any:
    """The master holding most of this test's keys (so that losing it matters)."""
    counts = []
    for node in cluster.masters:
        client = _servers.redis_client(node.address)
        try:
            escaped = key_prefix.replace("*", "\\*")
            counts.append(sum(1 for _ in client.scan_iter(match=f"{escaped}*", count=1000)))
        finally:
            client.close()
    best = max(range(len(counts)), key=counts.__getitem__)
    assert counts[best] > 0, counts
    return cluster.masters[best]


def test_a_cluster_replica_takes_over_a_killed_master_under_load(
    engine: Engine, db_path: Path, tmp_path: Path, key_prefix: str
) -> None:
    """Three masters with a replica each; the master with most of the test's keys is killed."""
    cluster = _servers.RedisClusterGroup(new_dir(tmp_path, "cluster"))
    with Workload(engine, db_path, cluster.url, key_prefix) as work, cluster:
        lost: list[Any] = []

        def strike() -> str:
            victim = busiest_master(cluster, key_prefix)
            victim.stop()
            lost.append(victim)
            return "Cluster, a master SIGKILLed"

        figures = run_failover(
            work, strike, lambda: cluster.wait_for_takeover(lost[0], timeout=DEADLINE)
        )
        check_served_from_the_cache(work)
    expect_no_stale_reads_elsewhere(figures)


# --- what a lost master must not do --------------------------------------------------


def test_a_model_first_read_while_a_cluster_master_is_down_comes_from_the_database(
    engine: Engine, tmp_path: Path, key_prefix: str
) -> None:
    """A manager whose first read of a model comes while a master is down answers it anyway.

    The master of slot 0 is the node redis-py sends ``COMMAND`` to while it builds a cluster
    client, which dogpile does when the model's region is made (it used to raise).
    """
    with _servers.RedisClusterGroup(new_dir(tmp_path, "cluster")) as cluster:
        cluster.masters[0].stop()
        manager = CacheManager(CacheConfig(url=cluster.url, key_prefix=key_prefix))
        try:
            got = Reader(engine, manager).get(Item, 1)
        except Exception as error:  # was: redis.exceptions.ConnectionError
            raise AssertionError(f"the read raised {error!r}") from error
        assert got == {"id": 1, "name": "item-1"}


def test_a_commit_that_first_uses_a_model_while_a_cluster_master_is_down_is_invalidated(
    engine: Engine, tmp_path: Path, key_prefix: str
) -> None:
    """The write is still invalidated (now or by replay), so nobody reads the old row later.

    It used not to be recorded at all (the listener could not build the model's cache), so
    the entry another process cached before stayed, in both processes, after the takeover.
    """
    with _servers.RedisClusterGroup(new_dir(tmp_path, "cluster")) as cluster:
        config = CacheConfig(url=cluster.url, key_prefix=key_prefix)
        other = Reader(engine, CacheManager(config))  # another process, which cached the row
        other.get(Item, 1)
        assert other.loads_during(lambda: other.get(Item, 1)) == 0
        lost = cluster.masters[0]
        lost.stop()
        committing = CacheManager(config)  # its first use of Item is this commit
        with writing(engine, committing) as session:
            session.get(Item, 1).name = "changed"
            session.commit()
        cluster.wait_for_takeover(lost, timeout=DEADLINE)
        mine = Reader(engine, committing)
        deadline = time.monotonic() + DEADLINE
        while mine.loads_during(lambda: mine.get(Item, 1)) and time.monotonic() < deadline:
            time.sleep(0.1)  # until the committing process is served from the cache again
        assert mine.seen[-1] == {"id": 1, "name": "changed"}


def cluster_layout(
    cluster: _servers.RedisClusterGroup, key_prefix: str
) -> tuple[str, _servers.RedisClusterNodeProcess]:
    """A key prefix under which one master holds Item's list version but not item 1's key
    nor Item's generation token; and that master.

    Every commit of an item rewrites the list version, so while that master is down no
    invalidation of item 1 can be written whole; a read of item 1 only needs the other two
    keys, which live on the other masters.
    """
    from sqlalchemy import inspect

    from declcache._keys import KeyBuilder

    for n in range(100):
        prefix = f"{key_prefix}{n}:"
        keys = KeyBuilder(prefix, inspect(Item))
        victim = cluster.master_of(keys.list_version_key)
        needed = (keys.generation_key, keys.of_ident(1)[1])
        if all(cluster.master_of(key) is not victim for key in needed):
            return prefix, victim
    raise AssertionError("no key prefix gives the layout")  # (5/9)**100: never


def test_another_process_reads_no_row_older_than_a_commit_made_while_a_master_is_lost(
    engine: Engine, tmp_path: Path, key_prefix: str
) -> None:
    """A cluster master dies; a commit in one process; another process reads the row.

    The dead master holds the model's list version, so the commit's invalidation cannot be
    written and waits in the committing process's queue until a replica takes over; the
    other process reads the row through keys on the masters that live. Default settings; it
    all happens before the cluster declares the master failed (``cluster-node-timeout`` 1 s).
    """
    with _servers.RedisClusterGroup(new_dir(tmp_path, "cluster")) as cluster:
        prefix, victim = cluster_layout(cluster, key_prefix)
        config = CacheConfig(url=cluster.url, key_prefix=prefix)
        committing, other = CacheManager(config), CacheManager(config)
        Reader(engine, committing).get(Item, 1)  # each builds its cache of Item while all is well
        theirs = Reader(engine, other)
        theirs.get(Item, 1)
        assert theirs.loads_during(lambda: theirs.get(Item, 1)) == 0

        victim.stop()
        with writing(engine, committing) as session:
            session.get(Item, 1).name = "changed"
            session.commit()
        assert committing.pending_invalidations > 0
        errors = other.stats()["Item"].errors
        got = theirs.get(Item, 1)
        if other.stats()["Item"].errors != errors:  # pragma: no cover - a very slow machine
            pytest.skip("the cluster was already down for the other process: no race to show")
        assert got == {"id": 1, "name": "changed"}
