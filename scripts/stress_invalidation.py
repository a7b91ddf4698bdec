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
  two schema fingerprints in flight); a commit by either must reach the other's readers.

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
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, create_engine, select, update
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
        choices=["updates", "cascades", "bulk-mappings", "fingerprints"],
        default="updates",
        help="what the writers do besides ORM updates (see the module doc)",
    )
    parser.add_argument("--key-prefix", default=f"dcstress{secrets.token_hex(4)}:")
    parser.add_argument("--table", default="declcache_stress_rows")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    args.cache = args.cache or DEFAULT_CACHE[args.backend]
    if args.writers < 1 or args.readers < 1 or args.rows < 1 or args.duration <= 0:
        parser.error("--writers, --readers, --rows and --duration must be positive")
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
    start: Any  # multiprocessing Event: go
    results: Any  # multiprocessing Queue: one report per worker


@dataclass
class Context:
    """One worker's world."""

    args: argparse.Namespace
    committed: Any
    deleted: Any
    models: Models
    engine: Any
    manager: CacheManager
    rng: random.Random
    deadline: float
    report: dict[str, Any] = field(default_factory=dict)

    def running(self) -> bool:
        return time.monotonic() < self.deadline and self.report["ops"] < MAX_OPERATIONS


def worker(role: str, index: int, args: argparse.Namespace, shared: Shared) -> None:
    """One writer or reader process; always reports one result dict, even on failure."""
    report: dict[str, Any] = {"role": role, "index": index, "ops": 0, "error": None}
    try:
        # a rolling deploy: odd workers run the previous release, without the extra column
        previous = args.scenario == "fingerprints" and index % 2 == 1
        models = make_models(args.table, extra_column=not previous)
        model = models.row
        setup_cache_listeners()
        engine = create_engine(args.postgres, pool_size=2, max_overflow=0)
        manager = CacheManager(cache_config(args))
        seed = None if args.seed is None else f"{args.seed}-{role}-{index}"
        if not shared.start.wait(GRACE):
            raise TimeoutError("never told to start")
        context = Context(
            args=args,
            committed=shared.committed,
            deleted=shared.deleted,
            models=models,
            engine=engine,
            manager=manager,
            rng=random.Random(seed),
            deadline=time.monotonic() + args.duration,
            report=report,
        )
        (write_loop if role == "writer" else read_loop)(context)
        stats = manager.stats().get(model.__name__)
        report["cache"] = stats.as_dict() if stats is not None else {}
        engine.dispose()
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


def _write(ctx: Context, session: Session, row_id: int, *, special: bool) -> int | None:
    """One write of the scenario; the version it wrote, ``None`` for a deletion, 0 for none."""
    model, scenario = ctx.models.row, ctx.args.scenario
    if special and scenario == "cascades":  # the database deletes the row with its parent
        parent = session.get(ctx.models.parent, row_id, with_for_update=True)
        if parent is None:
            return 0
        session.delete(parent)
        return None
    if special and scenario in {"updates", "fingerprints"}:  # ORM bulk UPDATE: whole model
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

    def check(row_id: int, floor: tuple[int, int], seen: Any, kind: str) -> None:
        """Stale: a version below the floor, or a row whose deletion had committed."""
        report["rows_checked"] += 1
        version, gone = floor
        if seen is None or (not gone and seen.version >= version):
            return
        report["stale"] += 1
        if len(report["samples"]) < SAMPLES:
            report["samples"].append(
                {
                    "row": row_id,
                    "committed_before_read": version,
                    "deleted_before_read": bool(gone),
                    "seen": seen.version,
                    "read": kind,
                }
            )

    while ctx.running():
        listing = args.list_every > 0 and report["ops"] % args.list_every == args.list_every - 1
        with Session(ctx.engine, info={"cache_manager": manager}) as session:
            if listing:
                # locked copies, taken before the read starts
                floors = list(zip(ctx.committed[:], ctx.deleted[:], strict=True))

                def load_all(session: Session = session) -> list[Any]:
                    rows = list(session.scalars(select(model).order_by(model.id)))
                    pause()
                    return rows

                for row in manager.load_list(model, "all", load_all):
                    check(row.id, floors[row.id], row, "list")
                report["list_reads"] += 1
            else:
                row_id = ctx.rng.randrange(args.rows)
                floor = (ctx.committed[row_id], ctx.deleted[row_id])  # before the read starts

                def load_one(session: Session = session, row_id: int = row_id) -> Any:
                    row = session.get(model, row_id)
                    pause()
                    return row

                check(row_id, floor, manager.load(model, row_id, load_one), "entity")
                report["reads"] += 1
        report["ops"] += 1


# --- parent -------------------------------------------------------------------------------------


def prepare_table(args: argparse.Namespace) -> None:
    models = make_models(args.table)
    engine = create_engine(args.postgres)
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
        start=context.Event(),
        results=context.Queue(),
    )
    processes = [
        context.Process(target=worker, args=(role, index, args, shared), name=f"{role}-{index}")
        for role, count in (("writer", args.writers), ("reader", args.readers))
        for index in range(count)
    ]
    prepare_table(args)
    reports: list[dict[str, Any]] = []
    try:
        for process in processes:
            process.start()
        shared.start.set()
        began = time.monotonic()
        deadline = began + args.duration + GRACE
        while len(reports) < len(processes) and time.monotonic() < deadline:
            try:
                reports.append(shared.results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                break
        elapsed = time.monotonic() - began
    finally:
        for process in processes:
            process.join(timeout=10)
        for process in processes:  # only our own children, and only if they hang
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        drop_table(args)
        delete_redis_keys(args)
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
        "cache_stats": cache,
        "worker_errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run(args)
    print(json.dumps(summary, indent=2))
    return 1 if summary["stale_reads"] or summary["worker_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
