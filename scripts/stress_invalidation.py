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
* ``collections``: the readers read *parents* through the stock repository (``get``, and every
  ``--list-every``-th read ``list(preload=("children",))``) and then their ``children``
  collection, which the parent model declares in ``CacheMeta.cached_relationships``: served
  from the cache as member ids, the members read through the child model's entity cache.
  The writers insert children (``--children`` per parent at the start, ids from a pool twice
  that size), delete them and move them to another parent (change the foreign key; every
  ``--bulk-every``-th write moves one by an ORM bulk ``UPDATE``). See
  :func:`change_collection` for how a collection gets a version and :func:`check_parent`
  for what is stale.

``--blind-writers`` is a negative control for every scenario: the writers' sessions name no
cache manager, so their commits invalidate nothing, and the run must report stale reads (it
shows that the checks can see one).

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
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, relationship

from declcache import CacheConfig, CacheManager, setup_cache_listeners
from declcache.repository import SQLAlchemySyncRepository

if TYPE_CHECKING:
    from collections.abc import Iterable

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
        choices=["updates", "cascades", "bulk-mappings", "fingerprints", "replicas", "collections"],
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
    parser.add_argument(
        "--blind-writers",
        action="store_true",
        help="writers commit through sessions without a cache manager: nothing is "
        "invalidated; a negative control, which must report stale reads",
    )
    parser.add_argument(
        "--children",
        type=int,
        default=4,
        help="collections: children per parent at the start (the pool of ids is twice that)",
    )
    parser.add_argument("--key-prefix", default=f"dcstress{secrets.token_hex(4)}:")
    parser.add_argument("--table", default="declcache_stress_rows")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    args.cache = args.cache or DEFAULT_CACHE[args.backend]
    if min(args.writers, args.readers, args.rows, args.children) < 1 or args.duration <= 0:
        parser.error("--writers, --readers, --rows, --children and --duration must be positive")
    if args.scenario == "collections" and args.rows < 2:
        parser.error("collections: a child moves between parents, --rows must be at least 2")
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
    """The declarative base, the cached row model and its parent.

    With ``collections``, the parent is cached too, with its ``children`` (``child``, cached)
    in ``cached_relationships``, and ``history`` is the table of the collections' versions.
    """

    base: Any
    row: Any
    parent: Any
    child: Any = None
    history: Any = None


def make_models(table: str, *, extra_column: bool = True, collections: bool = False) -> Models:
    """The models of ``table`` and its parents' table (and, with ``collections``, more).

    ``extra_column=False`` maps the row table without its ``extra`` column: another schema
    fingerprint of the same table, as the previous release of a rolling deploy would have.
    ``collections=True`` adds the ``version`` of the parent's collection, the children's table
    and the history of every collection (``<table>_history``: parent, version, member ids).
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
    parent_columns: dict[str, Any] = {
        "__tablename__": f"{table}_parents",
        "id": mapped_column(Integer, primary_key=True, autoincrement=False),
        "rows": relationship(row, passive_deletes=True),
    }
    if not collections:
        return Models(Base, row, type("StressParent", (Base,), parent_columns))
    child = type(
        "StressChild",
        (Base,),
        {
            "__tablename__": f"{table}_children",
            "id": mapped_column(Integer, primary_key=True, autoincrement=False),
            "parent_id": mapped_column(Integer, ForeignKey(f"{table}_parents.id"), index=True),
            "version": mapped_column(Integer, default=0),  # the stamp of its last write
            "CacheMeta": type("CacheMeta", (), {"ttl": 300}),
        },
    )
    parent_columns.update(
        version=mapped_column(Integer, default=0),  # the version of its collection
        children=relationship(child, order_by=child.id),
        CacheMeta=type("CacheMeta", (), {"ttl": 300, "cached_relationships": ("children",)}),
    )
    history = Table(
        f"{table}_history",
        Base.metadata,
        Column("parent_id", Integer, primary_key=True),
        Column("version", Integer, primary_key=True),
        Column("members", Text, nullable=False),
    )
    return Models(Base, row, type("StressParent", (Base,), parent_columns), child, history)


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
    members: Any  # multiprocessing Array: per child id, the highest stamp whose commit returned
    stamps: Any  # multiprocessing Value: the last stamp handed out (children's versions)
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
    members: Any = None  # scenario ``collections``: see Shared
    stamps: Any = None
    audit: Any = None  # scenario ``collections``, readers: an engine no cache is near

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
        collections = args.scenario == "collections"
        models = make_models(args.table, extra_column=not previous, collections=collections)
        setup_cache_listeners()
        seed = None if args.seed is None else f"{args.seed}-{role}-{index}"
        engine = create_engine(args.postgres, pool_size=2, max_overflow=0)
        audit = None
        if collections and role == "reader":
            audit = create_engine(args.postgres, pool_size=1, max_overflow=0)
            widen_fill_race(engine, args.loader_delay_ms / 1000, random.Random(seed))
        replica = None
        if args.replica_url is not None and role == "reader":
            options = {}
            if args.replica_lag_declared > 0:
                options["declcache_replica_lag"] = args.replica_lag_declared
            replica = create_engine(
                args.replica_url, pool_size=2, max_overflow=0, execution_options=options
            )
        manager = CacheManager(cache_config(args))
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
            members=shared.members,
            stamps=shared.stamps,
            audit=audit,
        )
        loops = (write_loop, read_loop) if not collections else (write_changes, read_parents)
        loops[role != "writer"](context)
        report["cache"] = summed(stats.as_dict() for stats in manager.stats().values())
        for used in (engine, replica, audit):
            if used is not None:
                used.dispose()
    except BaseException:
        report["error"] = traceback.format_exc()
    finally:
        shared.results.put(report)


def summed(counters: Iterable[dict[str, int]]) -> dict[str, int]:
    """Counters added up by name (over models, over workers)."""
    total: dict[str, int] = {}
    for each in counters:
        for name, value in each.items():
            total[name] = total.get(name, 0) + value
    return total


def writer_info(ctx: Context) -> dict[str, Any]:
    """A writer's ``Session.info``: its manager, unless ``--blind-writers`` hides it."""
    return {} if ctx.args.blind_writers else {"cache_manager": ctx.manager}


def write_loop(ctx: Context) -> None:
    args, report = ctx.args, ctx.report
    report.update(writes=0, bulk_writes=0)
    while ctx.running():
        row_id = ctx.rng.randrange(args.rows)
        special = args.bulk_every > 0 and report["ops"] % args.bulk_every == args.bulk_every - 1
        with Session(ctx.engine, info=writer_info(ctx)) as session:
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


# --- scenario ``collections``: cached one-to-many collections -----------------------------------


def pool_size(args: argparse.Namespace) -> int:
    """How many child ids there are: half of them exist at the start."""
    return 2 * args.rows * args.children


def spelled(ids: Iterable[int]) -> str:
    """A collection's member ids as the history stores them: ascending, comma-separated."""
    return ",".join(str(child_id) for child_id in ids)


@dataclass
class Change:
    """One committed write: the parents whose collection it changed, with their new version,
    and the child it stamped (``None`` when it deleted one)."""

    kind: str  # inserts, deletes, moves
    bulk: bool
    parents: list[tuple[int, int]]
    child: tuple[int, int] | None


def write_changes(ctx: Context) -> None:
    """Insert, delete and move children, one change per transaction; see change_collection."""
    args, report = ctx.args, ctx.report
    report.update(writes=0, bulk_writes=0, inserts=0, deletes=0, moves=0, conflicts=0)
    while ctx.running():
        special = args.bulk_every > 0 and report["ops"] % args.bulk_every == args.bulk_every - 1
        report["ops"] += 1
        try:
            with Session(ctx.engine, info=writer_info(ctx)) as session:
                change = change_collection(ctx, session, bulk=special)
                session.commit()
        except DBAPIError as error:
            if not lost_a_race(error):
                raise
            report["conflicts"] += 1  # rolled back: nothing committed, nothing to record
            continue
        # commit() returned: from now on no read that starts may see an older collection
        with ctx.committed.get_lock():
            for parent_id, version in change.parents:
                ctx.committed[parent_id] = max(ctx.committed[parent_id], version)
        if change.child is not None:
            child_id, stamp = change.child
            with ctx.members.get_lock():
                ctx.members[child_id] = max(ctx.members[child_id], stamp)
        report["bulk_writes" if change.bulk else "writes"] += 1
        report[change.kind] += 1
        if args.write_interval > 0:
            time.sleep(ctx.rng.uniform(0, 2 * args.write_interval))


def change_collection(ctx: Context, session: Session, *, bulk: bool) -> Change:
    """Insert, delete or move one child; give each parent it touches a new collection version.

    A collection's version is its parent's ``version`` column: the write raises it, in the
    transaction that changes the collection, and records the collection's member ids under it
    in the history table. Writers of one collection are serialized by its parent's row lock,
    taken before the members are read, so each version names exactly one membership, the one
    its transaction commits. Locks are taken child first, then parents in ascending order (no
    lock is awaited while a parent is held, but a new id's unique index). A child's
    ``version`` is a stamp from a counter all writers share, taken under the child's lock:
    it only grows, even across a deletion and a new insert of the same id. With ``bulk``, an
    existing child moves by an ORM bulk ``UPDATE`` instead of the unit of work.
    """
    child_model, rng, rows = ctx.models.child, ctx.rng, ctx.args.rows
    child_id = rng.randrange(pool_size(ctx.args))
    if bulk:  # a bulk write moves a child: one that exists (unless it is gone by the lock)
        present = session.scalars(select(child_model.id).order_by(child_model.id)).all()
        child_id = rng.choice(present) if present else child_id
    child = session.get(child_model, child_id, with_for_update=True)
    stamp = next_stamp(ctx)
    if child is None:
        target = rng.randrange(rows)
        lock_parents(ctx, session, [target])
        session.add(child_model(id=child_id, parent_id=target, version=stamp))
        kind, bulk, touched = "inserts", False, [target]
    elif not bulk and rng.random() < 1 / 3:
        lock_parents(ctx, session, [child.parent_id])
        session.delete(child)
        kind, touched = "deletes", [child.parent_id]
    else:
        source = child.parent_id
        target = (source + rng.randrange(1, rows)) % rows
        touched = lock_parents(ctx, session, [source, target])
        if bulk:
            session.execute(
                update(child_model)
                .where(child_model.id == child_id)
                .values(parent_id=target, version=stamp)
            )
        else:
            child.parent_id, child.version = target, stamp
        kind = "moves"
    session.flush()
    versions = [(parent_id, record_version(ctx, session, parent_id)) for parent_id in touched]
    return Change(kind, bulk, versions, None if kind == "deletes" else (child_id, stamp))


def next_stamp(ctx: Context) -> int:
    with ctx.stamps.get_lock():
        ctx.stamps.value += 1
        return int(ctx.stamps.value)


def lock_parents(ctx: Context, session: Session, parent_ids: list[int]) -> list[int]:
    """Lock the parents' rows, in ascending order; their ids, in that order."""
    ordered = sorted(set(parent_ids))
    for parent_id in ordered:
        session.get(ctx.models.parent, parent_id, with_for_update=True)
    return ordered


def record_version(ctx: Context, session: Session, parent_id: int) -> int:
    """Raise the (locked) parent's collection version; record its members under it."""
    parent, child = ctx.models.parent, ctx.models.child
    found = session.get(parent, parent_id)
    found.version += 1
    members = session.scalars(
        select(child.id).where(child.parent_id == parent_id).order_by(child.id)
    )
    session.execute(
        insert(ctx.models.history).values(
            parent_id=parent_id, version=found.version, members=spelled(members)
        )
    )
    return int(found.version)


def lost_a_race(error: DBAPIError) -> bool:
    """A write that lost to another writer: the same new id inserted twice, or a deadlock."""
    return isinstance(error, IntegrityError) or "deadlock detected" in str(error.orig)


@dataclass
class Seen:
    """A parent as a reader saw it: its collection version and its children, in order."""

    id: int
    version: int
    children: list[tuple[int, int]]  # (id, version)


def read_parents(ctx: Context) -> None:
    """Read a parent (every ``--list-every``-th read: all of them) and its children."""
    args, parent, report = ctx.args, ctx.models.parent, ctx.report
    report.update(reads=0, list_reads=0, rows_checked=0, collections_checked=0, stale=0)
    report["samples"] = []
    repository = type("StressParents", (SQLAlchemySyncRepository,), {"model_type": parent})
    while ctx.running():
        listing = args.list_every > 0 and report["ops"] % args.list_every == args.list_every - 1
        with Session(ctx.engine, info={"cache_manager": ctx.manager}) as session:
            parents = repository(session=session)
            floors, member_floors = ctx.committed[:], ctx.members[:]  # before the read starts
            if listing:
                found = parents.list(order_by=parent.id, preload=("children",))
            else:
                found = [parents.get(ctx.rng.randrange(args.rows))]
            seen = [
                Seen(p.id, p.version, [(child.id, child.version) for child in p.children])
                for p in found
            ]
        for each in seen:
            check_parent(ctx, each, floors[each.id], member_floors, "list" if listing else "get")
        report["list_reads" if listing else "reads"] += 1
        report["ops"] += 1


def check_parent(ctx: Context, seen: Seen, floor: int, member_floors: list[int], kind: str) -> None:
    """Stale: anything older than what had committed before the read began.

    That is: the parent's row below its collection version ``floor``; member ids that are
    not the membership of any version from ``floor`` on (the history says which, read after
    the read from a database connection no cache is near); or a member whose stamp is below
    the last stamp of that child whose commit had returned.
    """
    report = ctx.report
    report["collections_checked"] += 1
    report["rows_checked"] += 1 + len(seen.children)
    problems = []
    if seen.version < floor:
        problems.append("parent row")
    history = ctx.models.history
    with ctx.audit.connect() as connection:
        fresh = set(
            connection.scalars(
                select(history.c.members).where(
                    history.c.parent_id == seen.id, history.c.version >= floor
                )
            )
        )
    members = spelled(child_id for child_id, _ in seen.children)
    if members not in fresh:
        problems.append("collection")
    problems += [
        f"member {child_id}"
        for child_id, version in seen.children
        if version < member_floors[child_id]
    ]
    if not problems:
        return
    report["stale"] += 1
    if len(report["samples"]) < SAMPLES:
        report["samples"].append(
            {
                "parent": seen.id,
                "read": kind,
                "problems": problems,
                "committed_before_read": floor,
                "seen_version": seen.version,
                "seen_children": seen.children,
                "memberships_since": sorted(fresh)[:5],
            }
        )


def widen_fill_race(engine: Any, delay: float, rng: random.Random) -> None:
    """Sleep up to ``delay`` seconds after each statement a reader's engine runs.

    Between a ``SELECT`` and the cache fill it leads to, as ``--loader-delay-ms`` does in
    the loaders of the other scenarios: a commit landing in that window is the race the
    stale-fill guard must win.
    """
    if delay <= 0:
        return

    def pause(*_args: Any) -> None:
        time.sleep(rng.uniform(0, delay))

    event.listen(engine, "after_cursor_execute", pause)


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
    models = make_models(args.table, collections=args.scenario == "collections")
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
            if models.child is not None:
                add_children(args, models, session)
            session.commit()
    finally:
        engine.dispose()


def add_children(args: argparse.Namespace, models: Models, session: Session) -> None:
    """Children ``0 .. rows x children - 1``, child ``i`` in parent ``i % rows``: version 0
    of every collection, in the history too."""
    present = range(args.rows * args.children)
    session.add_all(models.child(id=i, parent_id=i % args.rows, version=0) for i in present)
    session.execute(
        insert(models.history),
        [
            {"parent_id": p, "version": 0, "members": spelled(present[p :: args.rows])}
            for p in range(args.rows)
        ],
    )


def drop_table(args: argparse.Namespace) -> None:
    models = make_models(args.table, collections=args.scenario == "collections")
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
        members=context.Array("q", pool_size(args) if args.scenario == "collections" else 0),
        stamps=context.Value("q", 0),
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

    cache = summed(report.get("cache", {}) for report in reports)
    errors = [f"{r['role']}-{r['index']}: {r['error']}" for r in reports if r["error"]]
    if len(reports) < expected:
        errors.append(f"{expected - len(reports)} workers never reported")
    stale_samples = [sample for r in reports for sample in r.get("samples", [])][:SAMPLES]
    writes, bulk = total("writer", "writes"), total("writer", "bulk_writes")
    reads, lists = total("reader", "reads"), total("reader", "list_reads")
    scenario: dict[str, Any] = {}
    if args.scenario == "collections":
        scenario = {
            "children_pool": pool_size(args),
            **{name: total("writer", name) for name in ("inserts", "deletes", "moves")},
            "write_conflicts": total("writer", "conflicts"),
            "collections_checked": total("reader", "collections_checked"),
        }
    if args.scenario == "replicas":
        scenario = {
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
        "operations": writes + bulk + reads + lists + total("writer", "conflicts"),
        "writes": writes,
        "bulk_writes": bulk,
        "reads": reads,
        "list_reads": lists,
        "rows_checked": total("reader", "rows_checked"),
        "stale_reads": total("reader", "stale"),
        "stale_samples": stale_samples,
        **scenario,
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
