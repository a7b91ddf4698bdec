"""Stress the promise of issue 4: no read that starts after a commit returned sees an older row.

Writer processes update the rows of one table (a ``version`` counter per row) through plain
ORM sessions whose commits invalidate the cache (every ``--bulk-every``-th write is an ORM bulk
``UPDATE``, which invalidates the whole model). Reader processes read single rows through
``CacheManager.load``, each read in a fresh session, and every ``--list-every``-th read the
whole table through ``CacheManager.load_list``. All processes share one PostgreSQL database and
one cache server (Redis or Memcached); they are separate processes started with ``spawn``.

The commit log is a shared array, not a clock: after ``commit()`` returns, a writer raises
``committed[row]`` to the version it wrote. Before a reader starts a read it copies
``committed[row]`` (the floor); a read that returns a version below its floor returned a row
older than a commit that had returned before the read began: a stale read.

Scenarios (``--scenario``) add the deployments that can race:

* ``updates`` (default): ORM updates and ORM bulk ``UPDATE`` statements, as above;
* ``cascades``: every ``--bulk-every``-th write deletes a parent row whose child (the row the
  readers read) the *database* deletes (``ON DELETE CASCADE``, ``passive_deletes``); after that
  commit returned, a read that still returns the child is stale;
* ``bulk-mappings``: every ``--bulk-every``-th write is a legacy ``Session.bulk_update_mappings``;
* ``fingerprints``: half the workers map the table with one column more (a rolling deploy:
  two schema fingerprints in flight); a commit by either must reach the other's readers;
* ``replicas``: the readers read a replica, a second database created next to ``--postgres``
  (``<database>_replica_<random>``, dropped at the end) that a replicator process brings up to
  date with the primary every ``--replica-delay`` seconds; their engine declares the lag
  (``declcache_replica_lag``, ``--replica-delay`` + ``--replica-margin``). The replicator keeps
  ``applied[row]``, the highest version it committed to the replica. The replica may lag, so
  here a read is stale when it returns a version below ``min(committed[row], applied[row])``,
  both copied before the read began: once the replica has caught up with a commit, no read
  through the cache returns an older row. Writers pause about ``--write-interval`` seconds
  between writes (0.15 here), so that rows stay unwritten longer than the declared lag and
  replica reads fill the cache at all. ``--replica-lag-declared`` overrides the declared lag:
  a value below the real delay (0, say) is a negative control that must find stale reads.
  The summary gives the replica's largest real lag (``replica_max_lag_s``, measured by the
  replicator); a real lag above the declared one voids the guarantee.

Usage::

    python scripts/stress_invalidation.py --backend redis --cache 127.0.0.1:6379 \\
        --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test --duration 60

The table (``--table``) is created, filled and dropped again; keys live under a fresh random
prefix, deleted from Redis at the end (Memcached entries expire). One JSON object goes to
stdout: operations run, stale reads found, the cache counters summed over all workers. The exit
status is 1 if any read was stale or any worker failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import random
import secrets
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    ForeignKey,
    Integer,
    String,
    bindparam,
    create_engine,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, relationship

from declcache import CacheConfig, CacheManager, setup_cache_listeners

DEFAULT_POSTGRES = os.environ.get(
    "DECLCACHE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
DEFAULT_CACHE = {
    "redis": os.environ.get("DECLCACHE_TEST_REDIS", "127.0.0.1:6379"),
    "memcached": os.environ.get("DECLCACHE_TEST_MEMCACHED", "127.0.0.1:11211"),
}
#: Upper bound on any worker's operations, whatever the duration: every loop ends.
MAX_OPERATIONS = 1_000_000
#: Seconds the parent waits beyond the duration for workers to start and report.
GRACE = 60.0
SAMPLES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["redis", "memcached"], default="redis")
    parser.add_argument("--cache", help="host:port of the cache server (default per backend)")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="SQLAlchemy URL")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--readers", type=int, default=6)
    parser.add_argument("--rows", type=int, default=8, help="few rows: many collisions")
    parser.add_argument("--list-every", type=int, default=10, help="every Nth read is a list")
    parser.add_argument("--bulk-every", type=int, default=10, help="every Nth write is bulk")
    parser.add_argument(
        "--loader-delay-ms",
        type=float,
        default=2.0,
        help="a reader sleeps up to this long between its SELECT and its cache fill, "
        "widening the stale-fill race the guard must win",
    )
    parser.add_argument(
        "--scenario",
        choices=["updates", "cascades", "bulk-mappings", "fingerprints", "replicas"],
        default="updates",
        help="what the writers do besides ORM updates (see the module doc)",
    )
    parser.add_argument(
        "--write-interval",
        type=float,
        default=None,
        help="mean seconds a writer pauses between writes (default 0.15 with replicas, else 0)",
    )
    parser.add_argument(
        "--replica-delay",
        type=float,
        default=0.2,
        help="replicas: seconds the replicator waits between two copies primary -> replica",
    )
    parser.add_argument(
        "--replica-margin",
        type=float,
        default=0.3,
        help="replicas: declared lag = --replica-delay + this (covers the copy itself)",
    )
    parser.add_argument(
        "--replica-lag-declared",
        type=float,
        default=None,
        help="replicas: declare this lag instead; below the real delay it is a negative "
        "control, which must report stale reads",
    )
    parser.add_argument("--key-prefix", default=f"dcstress{secrets.token_hex(4)}:")
    parser.add_argument("--table", default="declcache_stress_rows")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    args.cache = args.cache or DEFAULT_CACHE[args.backend]
    if args.writers < 1 or args.readers < 1 or args.rows < 1 or args.duration <= 0:
        parser.error("--writers, --readers, --rows and --duration must be positive")
    if args.write_interval is None:
        args.write_interval = 0.15 if args.scenario == "replicas" else 0.0
    if args.replica_lag_declared is None:
        args.replica_lag_declared = args.replica_delay + args.replica_margin
    if min(args.write_interval, args.replica_delay, args.replica_lag_declared) < 0:
        parser.error("intervals, delays and lags cannot be negative")
    args.replica_url = None  # set by run() once the replica database exists
    return args


# --- shared by parent and workers ---------------------------------------------------------------


@dataclass
class Models:
    """The declarative base, the cached row model and its (uncached) parent."""

    base: Any
    row: Any
    parent: Any


def make_models(table: str, *, extra_column: bool = True) -> Models:
    """The models of ``table`` and its parents' table.

    ``extra_column=False`` maps the row table without its ``extra`` column: another schema
    fingerprint of the same table, as the previous release of a rolling deploy would have.
    """

    class Base(DeclarativeBase):
        pass

    columns: dict[str, Any] = {
        "__tablename__": table,
        "id": mapped_column(Integer, primary_key=True, autoincrement=False),
        "parent_id": mapped_column(
            Integer, ForeignKey(f"{table}_parents.id", ondelete="CASCADE"), nullable=True
        ),
        "version": mapped_column(Integer, default=0),
        "note": mapped_column(String(40), default=""),
        "CacheMeta": type("CacheMeta", (), {"ttl": 300}),
    }
    if extra_column:
        columns["extra"] = mapped_column(String(40), nullable=True)
    row = type("StressRow", (Base,), columns)
    parent = type(
        "StressParent",
        (Base,),
        {
            "__tablename__": f"{table}_parents",
            "id": mapped_column(Integer, primary_key=True, autoincrement=False),
            "rows": relationship(row, passive_deletes=True),
        },
    )
    return Models(Base, row, parent)


def cache_config(args: argparse.Namespace) -> CacheConfig:
    host, _, port = args.cache.rpartition(":")
    if args.backend == "redis":
        return CacheConfig(
            backend="dogpile.cache.redis",
            arguments={"host": host, "port": int(port)},
            key_prefix=args.key_prefix,
        )
    return CacheConfig(
        backend="dogpile.cache.pymemcache",
        arguments={"url": [f"{host}:{port}"]},
        key_prefix=args.key_prefix,
    )


# --- workers ------------------------------------------------------------------------------------


@dataclass
class Shared:
    """What the parent shares with every worker process."""

    committed: Any  # multiprocessing Array: per row, the highest version whose commit returned
    deleted: Any  # multiprocessing Array: per row, 1 once the commit deleting it returned
    applied: Any  # multiprocessing Array: per row, the highest version the replica committed
    start: Any  # multiprocessing Event: go
    replicating: Any  # multiprocessing Event: the replicator's first copy committed
    stop: Any  # multiprocessing Event: every writer and reader is done (ends the replicator)
    results: Any  # multiprocessing Queue: one report per worker


@dataclass
class Context:
    """One worker's world."""

    args: argparse.Namespace
    committed: Any
    deleted: Any
    applied: Any
    models: Models
    engine: Any
    manager: CacheManager
    rng: random.Random
    deadline: float
    report: dict[str, Any] = field(default_factory=dict)
    replica: Any = None  # the replica's engine (scenario ``replicas``), else None

    def running(self) -> bool:
        return time.monotonic() < self.deadline and self.report["ops"] < MAX_OPERATIONS


class Routed(Session):
    """Writes (flushes) to the primary, reads to the replica: a ``get_bind`` router."""

    def __init__(self, primary: Any, replica: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.primary, self.replica = primary, replica

    def get_bind(self, mapper: Any = None, clause: Any = None, **kwargs: Any) -> Any:
        del mapper, clause, kwargs
        return self.primary if self._flushing else self.replica


def worker(role: str, index: int, args: argparse.Namespace, shared: Shared) -> None:
    """One writer, reader or replicator process; always reports one result, even on failure."""
    report: dict[str, Any] = {"role": role, "index": index, "ops": 0, "error": None}
    try:
        if role == "replicator":
            replicate_loop(args, shared, report)
            return
        # a rolling deploy: odd workers run the previous release, without the extra column
        previous = args.scenario == "fingerprints" and index % 2 == 1
        models = make_models(args.table, extra_column=not previous)
        model = models.row
        setup_cache_listeners()
        engine = create_engine(args.postgres, pool_size=2, max_overflow=0)
        replica = None
        if args.replica_url is not None and role == "reader":
            options = {}
            if args.replica_lag_declared > 0:
                options["declcache_replica_lag"] = args.replica_lag_declared
            replica = create_engine(
                args.replica_url, pool_size=2, max_overflow=0, execution_options=options
            )
        manager = CacheManager(cache_config(args))
        seed = None if args.seed is None else f"{args.seed}-{role}-{index}"
        if not shared.start.wait(GRACE):
            raise TimeoutError("never told to start")
        context = Context(
            args=args,
            committed=shared.committed,
            deleted=shared.deleted,
            applied=shared.applied,
            models=models,
            engine=engine,
            manager=manager,
            rng=random.Random(seed),
            deadline=time.monotonic() + args.duration,
            report=report,
            replica=replica,
        )
        (write_loop if role == "writer" else read_loop)(context)
        stats = manager.stats().get(model.__name__)
        report["cache"] = stats.as_dict() if stats is not None else {}
        engine.dispose()
        if replica is not None:
            replica.dispose()
    except BaseException:
        report["error"] = traceback.format_exc()
    finally:
        shared.results.put(report)


def write_loop(ctx: Context) -> None:
    args, report = ctx.args, ctx.report
    report.update(writes=0, bulk_writes=0)
    while ctx.running():
        row_id = ctx.rng.randrange(args.rows)
        special = args.bulk_every > 0 and report["ops"] % args.bulk_every == args.bulk_every - 1
        with Session(ctx.engine, info={"cache_manager": ctx.manager}) as session:
            version = _write(ctx, session, row_id, special=special)
            session.commit()
        # commit() returned: from now on no read that starts may see an older version.
        if version is None:  # the parent, and with it the row, is gone
            ctx.deleted[row_id] = 1
        elif version > 0:
            with ctx.committed.get_lock():
                ctx.committed[row_id] = max(ctx.committed[row_id], version)
        report["ops"] += 1
        report["bulk_writes" if special else "writes"] += 1
        if args.write_interval > 0:
            time.sleep(ctx.rng.uniform(0, 2 * args.write_interval))


def _write(ctx: Context, session: Session, row_id: int, *, special: bool) -> int | None:
    """One write of the scenario; the version it wrote, ``None`` for a deletion, 0 for none."""
    model, scenario = ctx.models.row, ctx.args.scenario
    if special and scenario == "cascades":  # the database deletes the row with its parent
        parent = session.get(ctx.models.parent, row_id, with_for_update=True)
        if parent is None:
            return 0
        session.delete(parent)
        return None
    if special and scenario in {
        "updates",
        "fingerprints",
        "replicas",
    }:  # ORM bulk UPDATE: whole model
        statement = (
            update(model)
            .where(model.id == row_id)
            .values(version=model.version + 1)
            .returning(model.version)
        )
        return int(session.execute(statement).scalar_one_or_none() or 0)
    row = session.get(model, row_id, with_for_update=True)
    if row is None:  # deleted by a cascade
        return 0
    version = int(row.version) + 1
    note = f"w{ctx.report['index']}-{ctx.report['ops']}"
    if special and scenario == "bulk-mappings":  # legacy bulk method, no unit of work
        session.expunge(row)
        session.bulk_update_mappings(model, [{"id": row_id, "version": version, "note": note}])
    else:
        row.version, row.note = version, note
    return version


def read_loop(ctx: Context) -> None:
    args, model, manager, report = ctx.args, ctx.models.row, ctx.manager, ctx.report
    report.update(reads=0, list_reads=0, rows_checked=0, stale=0, samples=[])
    delay = args.loader_delay_ms / 1000

    def pause() -> None:
        if delay > 0:
            time.sleep(ctx.rng.uniform(0, delay))

    replicas = ctx.replica is not None

    def floor_of(committed: int, gone: int, applied: int) -> tuple[int, int, int]:
        """What a read may not go below; copied before the read starts."""
        return (committed, gone, applied)

    def check(row_id: int, floor: tuple[int, int, int], seen: Any, kind: str) -> None:
        """Stale: a version below the floor, or a row whose deletion had committed.

        On a replica the floor is ``min(committed, applied)``: what had committed and
        reached the replica before the read began.
        """
        report["rows_checked"] += 1
        committed, gone, applied = floor
        version = min(committed, applied) if replicas else committed
        if seen is None or (not gone and seen.version >= version):
            return
        report["stale"] += 1
        if len(report["samples"]) < SAMPLES:
            sample = {
                "row": row_id,
                "committed_before_read": committed,
                "deleted_before_read": bool(gone),
                "seen": seen.version,
                "read": kind,
            }
            if replicas:
                sample["applied_before_read"] = applied
            report["samples"].append(sample)

    def session_of() -> Session:
        info = {"cache_manager": manager}
        if replicas:
            return Routed(ctx.engine, ctx.replica, info=info)
        return Session(ctx.engine, info=info)

    while ctx.running():
        listing = args.list_every > 0 and report["ops"] % args.list_every == args.list_every - 1
        with session_of() as session:
            if listing:
                # locked copies, taken before the read starts
                floors = [
                    floor_of(*copied)
                    for copied in zip(ctx.committed[:], ctx.deleted[:], ctx.applied[:], strict=True)
                ]

                def load_all(session: Session = session) -> list[Any]:
                    rows = list(session.scalars(select(model).order_by(model.id)))
                    pause()
                    return rows

                for row in manager.load_list(model, "all", load_all):
                    check(row.id, floors[row.id], row, "list")
                report["list_reads"] += 1
            else:
                row_id = ctx.rng.randrange(args.rows)
                # before the read starts
                floor = floor_of(ctx.committed[row_id], ctx.deleted[row_id], ctx.applied[row_id])

                def load_one(session: Session = session, row_id: int = row_id) -> Any:
                    row = session.get(model, row_id)
                    pause()
                    return row

                check(row_id, floor, manager.load(model, row_id, load_one), "entity")
                report["reads"] += 1
        report["ops"] += 1


def replicate_loop(args: argparse.Namespace, shared: Shared, report: dict[str, Any]) -> None:
    """Copy every row primary -> replica, then wait ``--replica-delay`` seconds; repeat.

    Plain Core on connections no session began on: like a database's own replication, the
    copies invalidate nothing. After each copy commits, ``applied[row]`` is raised to the
    version copied. A commit the primary makes after one copy's ``SELECT`` began reaches the
    replica with the next copy: the largest time from one ``SELECT`` to the next copy's
    commit is the replica's real lag (``max_lag_s``). It copies before the writers start (the
    parent waits for its first copy), so that no commit waits for the replicator to come up.
    """
    report.update(copies=0, max_lag_s=0.0)
    table = make_models(args.table).row.__table__
    read = select(table.c.id, table.c.version, table.c.note)
    write = (
        update(table)
        .where(table.c.id == bindparam("row_id"))
        .values(version=bindparam("row_version"), note=bindparam("row_note"))
    )
    primary = create_engine(args.postgres, pool_size=1, max_overflow=0)
    replica = create_engine(args.replica_url, pool_size=1, max_overflow=0)
    try:
        # until every writer and reader is done: they start (after their imports) and so
        # end at different times, and the replica must keep up with all of them
        deadline = time.monotonic() + args.duration + 2 * GRACE
        previous_select: float | None = None
        while (
            not shared.stop.is_set()
            and time.monotonic() < deadline
            and report["ops"] < MAX_OPERATIONS
        ):
            selected = time.monotonic()
            with primary.connect() as source:
                rows = source.execute(read).all()
            with replica.begin() as target:
                target.execute(
                    write,
                    [{"row_id": i, "row_version": v, "row_note": n} for i, v, n in rows],
                )
            for row_id, version, _note in rows:
                with shared.applied.get_lock():
                    shared.applied[row_id] = max(shared.applied[row_id], version)
            shared.replicating.set()  # the writers may start
            lag = time.monotonic() - (selected if previous_select is None else previous_select)
            report["max_lag_s"] = max(report["max_lag_s"], lag)
            previous_select = selected
            report["ops"] += 1
            report["copies"] += 1
            time.sleep(args.replica_delay)
    finally:
        primary.dispose()
        replica.dispose()


# --- parent -------------------------------------------------------------------------------------


def prepare_table(args: argparse.Namespace, url: str | None = None) -> None:
    models = make_models(args.table)
    engine = create_engine(url or args.postgres)
    try:
        models.base.metadata.drop_all(engine)
        models.base.metadata.create_all(engine)
        with Session(engine) as session:
            session.add_all(models.parent(id=i) for i in range(args.rows))
            session.flush()
            session.add_all(
                models.row(id=i, parent_id=i, version=0, note="") for i in range(args.rows)
            )
            session.commit()
    finally:
        engine.dispose()


def drop_table(args: argparse.Namespace) -> None:
    models = make_models(args.table)
    engine = create_engine(args.postgres)
    try:
        models.base.metadata.drop_all(engine)
    finally:
        engine.dispose()


def create_replica(args: argparse.Namespace) -> str:
    """Create the replica database next to the primary's; its URL (password kept)."""
    url = make_url(args.postgres)
    name = f"{url.database}_replica_{secrets.token_hex(4)}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def drop_replica(args: argparse.Namespace) -> None:
    if args.replica_url is None:
        return
    name = make_url(args.replica_url).database
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def delete_redis_keys(args: argparse.Namespace) -> None:
    if args.backend != "redis":
        return  # memcached entries expire on their own
    import redis  # noqa: PLC0415 - only needed for the redis backend

    host, _, port = args.cache.rpartition(":")
    client = redis.Redis(host=host, port=int(port), socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{args.key_prefix}*", count=500))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the workers; return the summary."""
    context = multiprocessing.get_context("spawn")
    shared = Shared(
        committed=context.Array("q", args.rows),
        deleted=context.Array("b", args.rows),
        applied=context.Array("q", args.rows),
        start=context.Event(),
        replicating=context.Event(),
        stop=context.Event(),
        results=context.Queue(),
    )
    replicators = 1 if args.scenario == "replicas" else 0
    processes: list[Any] = []
    reports: list[dict[str, Any]] = []
    try:
        prepare_table(args)
        if replicators:
            args.replica_url = create_replica(args)  # before the workers get their copy
            prepare_table(args, args.replica_url)
        processes = [
            context.Process(target=worker, args=(role, index, args, shared), name=f"{role}-{index}")
            for role, count in (
                ("writer", args.writers),
                ("reader", args.readers),
                ("replicator", replicators),
            )
            for index in range(count)
        ]
        for process in processes:
            process.start()
        if replicators:  # no commit before the replica keeps up (a failure is reported)
            shared.replicating.wait(GRACE)
        shared.start.set()
        began = time.monotonic()
        deadline = began + args.duration + GRACE
        while len(reports) < len(processes) and time.monotonic() < deadline:
            try:
                reports.append(shared.results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                break
            if sum(r["role"] != "replicator" for r in reports) == args.writers + args.readers:
                shared.stop.set()
        elapsed = time.monotonic() - began
    finally:
        shared.stop.set()
        for process in processes:
            process.join(timeout=10)
        for process in processes:  # only our own children, and only if they hang
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        try:
            drop_table(args)
            delete_redis_keys(args)
        finally:
            drop_replica(args)
    return summarize(args, reports, len(processes), elapsed)


def summarize(
    args: argparse.Namespace, reports: list[dict[str, Any]], expected: int, elapsed: float
) -> dict[str, Any]:
    def total(role: str, name: str) -> int:
        return sum(r.get(name, 0) for r in reports if r["role"] == role)

    cache: dict[str, int] = {}
    for report in reports:
        for name, value in report.get("cache", {}).items():
            cache[name] = cache.get(name, 0) + value
    errors = [f"{r['role']}-{r['index']}: {r['error']}" for r in reports if r["error"]]
    if len(reports) < expected:
        errors.append(f"{expected - len(reports)} workers never reported")
    stale_samples = [sample for r in reports for sample in r.get("samples", [])][:SAMPLES]
    writes, bulk = total("writer", "writes"), total("writer", "bulk_writes")
    reads, lists = total("reader", "reads"), total("reader", "list_reads")
    replica: dict[str, Any] = {}
    if args.scenario == "replicas":
        replica = {
            "replica_delay_s": args.replica_delay,
            "replica_lag_declared_s": args.replica_lag_declared,
            "replica_copies": total("replicator", "copies"),
            "replica_max_lag_s": round(
                max(
                    (r.get("max_lag_s", 0.0) for r in reports if r["role"] == "replicator"),
                    default=0.0,
                ),
                3,
            ),
        }
    return {
        "scenario": args.scenario,
        "backend": args.backend,
        "cache": args.cache,
        "duration_s": round(elapsed, 2),
        "writers": args.writers,
        "readers": args.readers,
        "rows": args.rows,
        "operations": writes + bulk + reads + lists,
        "writes": writes,
        "bulk_writes": bulk,
        "reads": reads,
        "list_reads": lists,
        "rows_checked": total("reader", "rows_checked"),
        "stale_reads": total("reader", "stale"),
        "stale_samples": stale_samples,
        **replica,
        "cache_stats": cache,
        "worker_errors": errors,
    }


def _terminated(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds run()'s clean-up: tables, keys, replica


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    summary = run(args)
    print(json.dumps(summary, indent=2))
    return 1 if summary["stale_reads"] or summary["worker_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
