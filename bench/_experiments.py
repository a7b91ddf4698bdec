"""The targets of issue 17 that are counts, not timings (``python -m bench lockstep`` runs them).

* **Natural-key reads after a commit**: a model with ``key_fields = ("email",)``; a row is
  read by email until it is a hit, updated and committed, then read by email three times: the
  SELECTs of each read (target: 1, then 0). New rows inserted and read leave no refused fill.
* **Overlapping ``get_many`` calls**: callers asking for overlapping windows of cold ids at
  once, as threads, as tasks, and as threads of two processes with ``distributed_lock``: ids
  sent to the database per distinct missing id (target: 1). Each SELECT of the threads' engine
  sleeps ``delay`` so that their misses overlap (the tasks overlap while ``aiosqlite`` works).
* **Event-loop lag** under 2,000 concurrent cached async reads on Redis (a private server when
  ``redis-server`` is installed: 2,000 concurrent reads open as many connections): p99 of how
  late a 1 ms ticker wakes (target < 5 ms), with the default collector and after
  ``gc.collect(); gc.freeze()``.
* **Round trips per commit**: backend calls (each one round trip) made by a commit that
  updates 1, 10 or 100 rows, on Redis and Memcached (target ≤ 1).

``python -m bench._experiments getmany OPTIONS_JSON`` is one process of the two-process
``get_many`` experiment.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Integer, String, create_engine, event, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from bench import _cases, _env
from bench._cases import SESSION_OPTIONS, AccountRepository, AsyncAccountRepository, Stack
from bench._dlock import ready_then_wait
from bench._env import Account
from declcache import CacheConfig, CacheManager, setup_cache_listeners
from declcache.repository import SQLAlchemySyncRepository

if TYPE_CHECKING:
    import argparse

    from bench._issue17 import Row

ROOT = Path(__file__).resolve().parents[1]


class NaturalBase(DeclarativeBase):
    pass


class Member(NaturalBase):
    """Cached by primary key and by ``email``, a ``key_fields`` set."""

    __tablename__ = "bench_members"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(120), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    visits: Mapped[int] = mapped_column(Integer)

    class CacheMeta:
        ttl = _env.TTL
        key_fields = ("email",)


class MemberRepository(SQLAlchemySyncRepository[Member]):
    model_type = Member


MEMBERS = 200


def _email(ident: int) -> str:
    return f"member{ident}@example.com"


# -- natural keys ---------------------------------------------------------------------------------


def natural_keys(
    stack: Stack, backend: str, first_new: int, trials: int = 20
) -> tuple[list[Row], dict[str, Any]]:
    """SELECTs of reads by a ``key_fields`` set after a commit; refused fills after inserts
    of ``trials`` new rows, numbered from ``first_new``."""
    manager = stack.manager(backend, f"natural-{backend}")
    sessions = stack.sessions("sqlite", manager)

    def by_email(ident: int) -> int:
        before = _cases.SELECTS[0]
        with sessions() as session:
            MemberRepository(session=session).get_one(email=_email(ident))
        return _cases.SELECTS[0] - before

    def by_id(ident: int) -> int:
        before = _cases.SELECTS[0]
        with sessions() as session:
            MemberRepository(session=session).get(ident)
        return _cases.SELECTS[0] - before

    def update(ident: int) -> None:
        with sessions() as session:
            member = session.get(Member, ident)
            assert member is not None
            member.visits += 1
            session.commit()

    after_commit: list[list[int]] = []
    by_id_after: list[list[int]] = []
    for ident in range(1, trials + 1):
        for _ in range(2):
            by_email(ident)
            by_id(ident)
        update(ident)
        after_commit.append([by_email(ident) for _ in range(3)])
        by_id_after.append([by_id(ident) for _ in range(2)])
    refused_before = manager.stats()["Member"]
    new = range(first_new, first_new + trials)
    with sessions() as session:
        session.add_all(Member(id=i, email=_email(i), name=f"New {i}", visits=0) for i in new)
        session.commit()
    first_reads = [by_email(ident) for ident in new]
    for ident in new:
        by_email(ident)
        by_id(ident)
    after = manager.stats()["Member"]
    refused = after.fills_refused - refused_before.fills_refused
    invalidations = after.invalidations - refused_before.invalidations
    per_read = [statistics.median(reads[index] for reads in after_commit) for index in range(3)]
    pk_reads = [statistics.median(reads[index] for reads in by_id_after) for index in range(2)]
    met = per_read[0] <= 1 and per_read[1] == 0 and per_read[2] == 0
    rows: list[Row] = [
        (
            f"natural-key reads after a commit, {backend}: SELECTs of reads 1, 2, 3 (1, 0, 0)",
            ", ".join(f"{value:g}" for value in per_read),
            f"{'met' if met else 'not met'} (median of {trials} rows; then by id: "
            + ", ".join(f"{value:g}" for value in pk_reads)
            + ")",
        ),
        (
            f"inserts leave no refused fill, {backend}: fills_refused after {trials} inserts (0)",
            str(refused),
            f"{'met' if refused == 0 else 'not met'} (the commit wrote {invalidations} "
            f"invalidations; first read by email: {statistics.median(first_reads):g} SELECT)",
        ),
    ]
    raw = {
        "selects_after_commit": after_commit,
        "selects_by_id_after_commit": by_id_after,
        "fills_refused_after_inserts": refused,
        "invalidations_of_inserts": invalidations,
        "first_read_selects_after_insert": first_reads,
    }
    return rows, raw


def create_members(url: str) -> None:
    engine = create_engine(url)
    NaturalBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            Member(id=i, email=_email(i), name=f"Member {i}", visits=0)
            for i in range(1, MEMBERS + 1)
        )
        session.commit()
    engine.dispose()


# -- overlapping get_many -------------------------------------------------------------------------

#: Callers of one trial; caller ``k`` asks for ``WINDOW`` ids from ``base + STRIDE * k``.
CALLERS, WINDOW, STRIDE = 8, 20, 5


def windows(base: int, callers: int = CALLERS) -> list[list[int]]:
    return [list(range(base + STRIDE * k, base + STRIDE * k + WINDOW)) for k in range(callers)]


def _distinct(asked: list[list[int]]) -> int:
    return len({ident for window in asked for ident in window})


class IdCounter:
    """Ids an engine asked the database for (the bound values of its SELECTs of accounts);
    each SELECT sleeps ``delay`` seconds first, so that concurrent misses overlap."""

    def __init__(self, engine: Any, delay: float = 0.0) -> None:
        self.ids = 0
        self.selects = 0
        self.delay = delay
        self._lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        statement, parameters = args[2], args[3]
        if statement.lstrip().upper().startswith("SELECT") and "bench_accounts" in statement:
            with self._lock:
                self.selects += 1
                self.ids += len(parameters) if isinstance(parameters, tuple | list | dict) else 1
            if self.delay:
                time.sleep(self.delay)


def overlap_threads(
    url: str, manager: CacheManager, base: int, delay: float, callers: int = CALLERS
) -> int:
    """``callers`` threads call ``get_many`` of their window at once; the ids queried."""
    engine = create_engine(url, pool_size=callers)
    counter = IdCounter(engine, delay)
    sessions = sessionmaker(bind=engine, info={"cache_manager": manager}, **SESSION_OPTIONS)
    barrier = threading.Barrier(callers)

    def call(window: list[int]) -> None:
        with sessions() as session:
            repository = AccountRepository(session=session)
            barrier.wait()
            repository.get_many(window)

    threads = [threading.Thread(target=call, args=(w,)) for w in windows(base, callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.dispose()
    return counter.ids


def overlap_tasks(async_url: str, manager: CacheManager, base: int) -> int:
    """``CALLERS`` tasks call ``get_many`` of their window at once; the ids queried."""
    engine = create_async_engine(async_url)
    counter = IdCounter(engine.sync_engine)
    sessions = async_sessionmaker(bind=engine, info={"cache_manager": manager}, **SESSION_OPTIONS)

    async def call(window: list[int]) -> None:
        async with sessions() as session:
            await AsyncAccountRepository(session=session).get_many(window)

    async def gather() -> None:
        await asyncio.gather(*(call(window) for window in windows(base)))
        await engine.dispose()

    asyncio.run(gather())
    return counter.ids


def overlap_processes(
    url: str, prefix: str, base: int, delay: float, processes: int = 2
) -> tuple[int, list[str]]:
    """``processes`` x ``CALLERS // processes`` threads, Redis with ``distributed_lock``."""
    folder = Path(tempfile.mkdtemp(prefix="declcache-bench-getmany-"))
    per_process = CALLERS // processes
    workers = []
    for index in range(processes):
        options = {
            "url": url,
            "prefix": prefix,
            "windows": windows(base)[index * per_process : (index + 1) * per_process],
            "delay": delay,
            "ready": str(folder / f"ready-{index}"),
            "go": str(folder / "go"),
        }
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench._experiments", "getmany", json.dumps(options)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + 60
    while not all((folder / f"ready-{i}").exists() for i in range(processes)):
        if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
            break
        time.sleep(0.005)
    (folder / "go").touch()
    total, errors = 0, []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        if worker.returncode != 0:
            errors.append(err[-500:])
            continue
        total += json.loads(out.strip().splitlines()[-1])["ids"]
    return total, errors


def _getmany_process(options: dict[str, Any]) -> dict[str, int]:
    setup_cache_listeners()
    name, arguments = _env.cache_backend("redis")
    manager = CacheManager(
        CacheConfig(
            backend=name,
            arguments={**arguments, "distributed_lock": True},
            key_prefix=options["prefix"],
        )
    )
    engine = create_engine(options["url"], pool_size=len(options["windows"]))
    counter = IdCounter(engine, options["delay"])
    sessions = sessionmaker(bind=engine, info={"cache_manager": manager}, **SESSION_OPTIONS)
    manager.get(Account, 0)  # connects to Redis
    with engine.connect():
        pass
    ready_then_wait(options["ready"], options["go"])
    barrier = threading.Barrier(len(options["windows"]))

    def call(window: list[int]) -> None:
        with sessions() as session:
            repository = AccountRepository(session=session)
            barrier.wait()
            repository.get_many(window)

    threads = [threading.Thread(target=call, args=(w,)) for w in options["windows"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.dispose()
    return {"ids": counter.ids}


def get_many_overlap(
    stack: Stack, backends: list[str], trials: int = 3, delay: float = 0.02
) -> tuple[list[Row], dict[str, Any]]:
    """Ids queried per distinct missing id, for threads, tasks and two processes."""
    url, async_url = stack.databases.urls["sqlite"]
    backend = "redis" if "redis" in backends else "memory"
    distinct = _distinct(windows(0))
    raw: dict[str, Any] = {"distinct_missing_ids": distinct, "backend": backend}
    rows: list[Row] = []

    def row(label: str, counts: list[int], extra: str = "") -> None:
        ratio = statistics.median(counts) / distinct
        rows.append(
            (
                f"get_many overlap, {label}: ids queried per missing id (1)",
                f"{ratio:.2f}",
                f"{'met' if ratio <= 1 else 'not met'} ({CALLERS} callers x {WINDOW} ids, "
                f"{distinct} distinct, ids queried per trial {counts}{extra})",
            )
        )

    base = 1
    threads, tasks = [], []
    for trial in range(trials):
        manager = stack.manager(backend, f"overlap-threads-{trial}")
        threads.append(overlap_threads(url, manager, base + trial * 100, delay))
        manager = stack.manager(backend, f"overlap-tasks-{trial}")
        tasks.append(overlap_tasks(async_url, manager, base + trial * 100))
    raw["threads"], raw["tasks"] = threads, tasks
    row(f"{CALLERS} threads, {backend}", threads)
    row(f"{CALLERS} asyncio tasks, {backend}", tasks)
    if backend == "redis":
        processes, problems = [], []
        for trial in range(trials):
            prefix = f"{stack.run_prefix}overlap-processes-{trial}:"
            total, errors = overlap_processes(url, prefix, base + trial * 100, delay)
            processes.append(total)
            problems += errors
        raw["processes"] = processes
        row(
            "2 processes x 4 threads, redis, distributed_lock",
            processes,
            f"; errors: {problems}" if problems else "",
        )
    return rows, raw


# -- event-loop lag -------------------------------------------------------------------------------


#: How the loop-lag reads are let in: all at once, or at most the async pool's connections.
LAG_VARIANTS = (
    ("all at once, GC default", None, False),
    ("all at once, gc.freeze()", None, True),
    ("100 in flight (the async pool's size), GC default", 100, False),
    ("100 in flight, gc.freeze()", 100, True),
)


def loop_lag(
    async_url: str, prefix: str, reads: int, rounds: int = 3
) -> tuple[list[Row], dict[str, Any]]:
    """Lag of a 1 ms ticker while ``reads`` cached async reads run at once on Redis.

    Each variant counts the reads the cache answered: a read the backend refused (the
    async Redis pool's connection limit) goes to the database, and is no cached read.
    """
    from tests._servers import RedisProcess

    server: RedisProcess | None = None
    host, port = _env.host_port(_env.REDIS)
    if RedisProcess.executable() is not None:
        server = RedisProcess()
        if server._launch(10.0) is None:
            host, port = server.address
        else:
            server = None
    manager = CacheManager(
        CacheConfig(
            backend="dogpile.cache.redis",
            arguments={"host": host, "port": port},
            key_prefix=f"{prefix}lag:",
        )
    )
    try:
        result = asyncio.run(_lag_variants(async_url, manager, reads, rounds))
    finally:
        manager.close()
        if server is not None:
            server.stop(kill=False)
        else:
            _env.delete_redis_keys(f"{prefix}lag:")
    where = "a private redis-server" if server is not None else f"Redis at {_env.REDIS}"
    rows: list[Row] = []
    for label, _, _ in LAG_VARIANTS:
        measured = result[label]
        p99 = statistics.median(m[0] for m in measured)
        met = p99 < 5 and min(m[3] for m in measured) == reads
        rows.append(
            (
                f"loop lag p99, {reads} concurrent cached reads, {label} (< 5 ms)",
                f"{p99:.1f} ms",
                f"{'met' if met else 'not met'} (per round p99 "
                f"{[round(m[0], 1) for m in measured]} ms, max "
                f"{[round(m[1], 1) for m in measured]} ms, "
                f"{statistics.median(m[2] for m in measured):.0f} reads/s, cache hits per round "
                f"{[m[3] for m in measured]} of {reads}; {where}; "
                f"gc.get_threshold() {gc.get_threshold()})",
            )
        )
    return rows, result


async def _lag_variants(
    async_url: str, manager: CacheManager, reads: int, rounds: int
) -> dict[str, list[tuple[float, float, float, int]]]:
    """Each of :data:`LAG_VARIANTS`, ``rounds`` times: ``(p99 ms, max ms, reads/s, hits)``."""
    from bench.loop_lag import LagMonitor

    engine = create_async_engine(async_url)
    sessions = async_sessionmaker(bind=engine, info={"cache_manager": manager}, **SESSION_OPTIONS)

    async def one(index: int) -> None:
        async with sessions() as session:
            await AsyncAccountRepository(session=session).get(index % _env.ROWS + 1)

    async def burst(limit: int | None) -> None:
        gate = asyncio.Semaphore(limit or reads)

        async def gated(index: int) -> None:
            async with gate:
                await one(index)

        await asyncio.gather(*(gated(i) for i in range(reads)))

    async def measure(limit: int | None) -> list[tuple[float, float, float, int]]:
        measured = []
        for _ in range(rounds):
            await asyncio.sleep(1.1)  # a breaker opened by the round before closes again
            hits = manager.stats()["Account"].hits
            with LagMonitor() as monitor:
                started = time.perf_counter()
                await burst(limit)
                elapsed = time.perf_counter() - started
            ordered = sorted(monitor.lags)
            p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)]
            cached = manager.stats()["Account"].hits - hits
            measured.append((p99 * 1000, ordered[-1] * 1000, reads / elapsed, cached))
        return measured

    await burst(10)  # fill every row, a few database connections at a time
    await burst(100)  # the pool's connections
    result = {}
    for label, limit, freeze in LAG_VARIANTS:
        if freeze:
            gc.collect()
            gc.freeze()
        try:
            result[label] = await measure(limit)
        finally:
            gc.unfreeze()
    await engine.dispose()
    return result


# -- round trips per commit -----------------------------------------------------------------------


def commit_round_trips(
    stack: Stack, backends: list[str], db: str, sizes: tuple[int, ...] = (1, 10, 100)
) -> tuple[list[Row], dict[str, Any]]:
    """Backend calls of a commit updating ``n`` rows: each call is one round trip."""
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    for backend in [name for name in backends if name != "memory"]:
        manager = stack.manager(backend, f"round-trips-{backend}-{db}")
        sessions = stack.sessions(db, manager)
        cache = manager._cache(Account)
        assert cache is not None
        calls = cache.store.inner = _cases._CallCounter(cache.store.inner)
        counts = {}
        for size in sizes:
            with sessions() as session:
                accounts = session.scalars(select(Account).where(Account.id <= size)).all()
                for account in accounts:
                    account.visits += 1
                before = calls.count
                session.commit()
                counts[size] = calls.count - before
        raw[backend] = counts
        worst = max(counts.values())
        rows.append(
            (
                f"round trips per commit, {backend} on {db} (≤ 1)",
                str(worst),
                f"{'met' if worst <= 1 else 'not met'} (rows changed: round trips "
                + ", ".join(f"{size}: {count}" for size, count in counts.items())
                + ")",
            )
        )
    return rows, raw


# -- all of them ----------------------------------------------------------------------------------


def run_all(
    databases: _env.Databases, prefix: str, options: argparse.Namespace, notes: list[str]
) -> list[Row]:
    """Every experiment the configuration allows; their rows (raw results go to stderr)."""
    _cases.setup_listeners()
    create_members(databases.urls["sqlite"][0])
    stack = Stack(run_prefix=f"{prefix}x:", databases=databases)
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    try:
        for index, backend in enumerate(("memory", "redis")):
            if backend not in options.backends:
                continue
            first_new = MEMBERS + 1 + 100 * index
            found, raw[f"natural keys {backend}"] = natural_keys(stack, backend, first_new)
            rows += found
        found, raw["get_many overlap"] = get_many_overlap(stack, options.backends)
        rows += found
        if "redis" in options.backends:
            found, raw["loop lag"] = loop_lag(
                databases.urls["sqlite"][1], prefix, options.loop_reads
            )
            rows += found
        else:
            notes.append("loop lag skipped: it reads from Redis")
        write_db = "postgresql" if "postgresql" in databases.urls else "sqlite"
        found, raw["round trips"] = commit_round_trips(stack, options.backends, write_db)
        rows += found
    finally:
        for manager in stack.managers:
            manager.close()
        for engine in stack.engines.values():
            engine.dispose()
    print(json.dumps(raw, default=str), file=sys.stderr)
    return rows


if __name__ == "__main__":
    if sys.argv[1] != "getmany":
        raise SystemExit(f"unknown experiment {sys.argv[1]!r}")
    print(json.dumps(_getmany_process(json.loads(sys.argv[2]))))
