"""Measure what one Redis outage costs a multi-process declcache deployment (issue 16).

Writer processes update the rows of one PostgreSQL table (a ``version`` counter per row)
through ORM sessions whose commits invalidate the cache (``setup_cache_listeners``); reader
processes read single rows through ``CacheManager.load`` and, every ``--list-every``-th read,
the whole table through ``CacheManager.load_list``, each read in a fresh session. The models,
the table and the clean-up come from ``scripts/stress_invalidation.py``. Every process has its
own manager (its own circuit breaker, replay queue and, with ``--near-cache``, near cache) on
one Redis server that this run may fault: a private ``redis-server`` the harness starts on a
free port, or the one ``--redis`` names together with its ``--redis-pid``.

After ``--warmup`` healthy seconds one fault is injected for ``--outage`` seconds:

* ``kill``: SIGKILL, then the same command line restarted (empty: no persistence) on the
  same port; *recovery* is the first moment the new server answers ``PING``;
* ``stop``: SIGSTOP, then SIGCONT; recovery is the moment SIGCONT is sent;
* ``pause``: ``CLIENT PAUSE <ms> ALL``; recovery is when the pause ends (the time just
  before the command was sent, plus the pause: the earliest moment it can end).

The load goes on for ``--after`` seconds after recovery. Every time is ``time.monotonic()``,
which is ``CLOCK_MONOTONIC`` on Linux: one clock for every process of the host.

**Stale reads.** After ``commit()`` returns, a writer raises ``committed[row]`` (shared
memory) to the version it wrote and logs ``(row, version, commit began, commit returned)``.
Before a read starts, the reader copies ``committed`` (the floor); a read that returns a
version below its floor returned a row older than a commit that had returned before the read
started: it is stale. Stale reads are bucketed by when the read *started* relative to
recovery: before the fault, during the outage, 0 to 250 ms, 250 ms to 1 s and over 1 s after
recovery (issue 16's target: none later than 250 ms), with the largest lateness by start and
by end of the read, and whether the commit the read missed had itself returned after recovery.

**Other figures.** Failed requests (any exception out of a read or a write transaction) by
role and type; commit latency (``session.commit()`` alone) p50/p99/max overall, before the
fault, during the outage and in the 5 s after recovery; read latency per phase; hit ratio
per phase and per reader after recovery (the cache is used again); per process the breaker's
state changes (opened, closed again, closed while the server was still down) and when the
replay queue drained; with ``--near-cache``, the reads served by the near cache during the
outage. Each process observes its breaker, queue and near cache after every operation, so a
change is seen when the operation that made it returns (a writer's replay, when the commit
that ran it does).

Where recovery falls in each process's breaker and replay cycle (1 s each by default) decides
much of what follows it, so one run samples one phase: repeat runs, or vary ``--outage`` by
fractions of a second (4.25, 4.5, 4.75…), to see the spread.

``--blind-writers`` is a negative control: the writers' sessions name no cache manager, so
their commits invalidate nothing and the run must report stale reads in every phase.

Usage::

    python scripts/outages.py --fault pause --outage 4 \\
        --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test [--near-cache]

One JSON object goes to stdout (and to ``--json PATH``), a text summary to stderr. Exit
status: 0 when every target of issue 16 this measures is met (no failed request, no stale
read started later than 250 ms after recovery, every breaker closed, every reader hits the
cache again), 1 when one is missed, 2 when the harness itself failed (a worker died).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
import os
import queue
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from declcache import CacheConfig, CacheManager, setup_cache_listeners

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType


def _stress_module() -> ModuleType:
    """``scripts/stress_invalidation.py``: its models, table set-up and clean-up."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("stress_invalidation")


stress = _stress_module()

#: Seconds the parent waits for every worker to be ready, and to report at the end.
GRACE = 60.0
#: Stale-read buckets by read start relative to recovery (seconds): label, lower bound.
AFTER_BUCKETS = (("0-250ms", 0.0), ("250ms-1s", 0.25), (">1s", 1.0))
#: The issue's target: no stale read started later than this after recovery.
STALE_WINDOW = 0.25
#: The window after recovery whose commit latencies issue 16 quotes.
AFTER_WINDOW = 5.0
#: A breaker that closed more than this before recovery closed while the server was down.
#: (Redis answers every client held by a pause in one pass: some a few ms before ours.)
DOWN_MARGIN = 0.05
SAMPLES = 10
#: Read flags (one byte per read).
HIT, NEAR, STALE, LISTING = 1, 2, 4, 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", choices=["kill", "stop", "pause"], required=True)
    parser.add_argument("--outage", type=float, default=4.0, help="seconds the server is down")
    parser.add_argument("--postgres", default=stress.DEFAULT_POSTGRES, help="SQLAlchemy URL")
    parser.add_argument(
        "--redis",
        help="host:port of a Redis server this run may kill, stop or pause (with --redis-pid); "
        "default: a private redis-server on a free port",
    )
    parser.add_argument("--redis-pid", type=int, help="the process id of the --redis server")
    parser.add_argument(
        "--redis-server", default=None, help="binary of the private server (default: on PATH)"
    )
    parser.add_argument("--near-cache", action="store_true", help="every manager: near_cache=True")
    parser.add_argument(
        "--breaker-interval", type=float, default=None, help="default: declcache's own"
    )
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=2.0, help="healthy seconds before")
    parser.add_argument("--after", type=float, default=6.0, help="seconds of load after recovery")
    parser.add_argument(
        "--write-interval",
        type=float,
        default=0.005,
        help="mean seconds a writer pauses between two commits",
    )
    parser.add_argument(
        "--read-interval", type=float, default=0.002, help="seconds a reader pauses between reads"
    )
    parser.add_argument("--list-every", type=int, default=10, help="every Nth read is a list")
    parser.add_argument(
        "--blind-writers",
        action="store_true",
        help="negative control: the writers' commits invalidate nothing; must find stale reads",
    )
    parser.add_argument("--key-prefix", default=f"dcoutage{secrets.token_hex(4)}:")
    parser.add_argument("--table", default="declcache_outage_rows")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", dest="json_path", help="also write the JSON summary here")
    args = parser.parse_args(argv)
    if min(args.writers, args.readers, args.rows) < 1:
        parser.error("--writers, --readers and --rows must be positive")
    if args.outage <= 0 or args.warmup < 0 or args.after < 1:
        parser.error("--outage must be positive, --warmup not negative, --after at least 1")
    if min(args.write_interval, args.read_interval) < 0:
        parser.error("intervals cannot be negative")
    if (args.redis is None) != (args.redis_pid is None):
        parser.error(
            "--redis and --redis-pid go together: the harness faults only a server it can "
            "signal (never a shared one it merely reaches)"
        )
    # what stress_invalidation's table and key helpers read
    args.scenario, args.backend = "updates", "redis"
    return args


# --- the Redis server under test ----------------------------------------------------------------


def ask(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether the server answers ``PING`` within ``timeout``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """The server the run faults: its address, its process, and how to start it again.

    ``private`` starts one on a free port; ``attach`` takes a running one by pid and records
    its command line and working directory (``/proc``) so that ``kill`` can restart it. What
    this class started (the private server, or an attached server's replacement) is stopped by
    :meth:`close`; an attached server that was never killed is left running.
    """

    def __init__(self, host: str, port: int, pid: int, command: list[str], cwd: str) -> None:
        self.host, self.port, self.pid = host, port, pid
        self.command, self.cwd = command, cwd
        self.process: subprocess.Popen[bytes] | None = None  # what we started, if anything
        self.stopped = False  # SIGSTOPped and not yet continued
        self.killed = False  # SIGKILLed and not yet restarted

    @classmethod
    def private(cls, binary: str | None) -> RedisServer:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise SystemExit("redis-server is not installed (or pass --redis-server PATH)")
        host, port = "127.0.0.1", free_port()
        command = [found, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no"]
        server = cls(host, port, 0, command, tempfile.gettempdir())
        server.start()
        return server

    @classmethod
    def attach(cls, address: str, pid: int) -> RedisServer:
        """The server at ``address`` run by process ``pid``; ``kill`` restarts it empty.

        Redis rewrites its process title, so the restart command is not its argv: the same
        binary (``/proc/<pid>/exe``), port and ``bind``, without persistence.
        """
        host, _, port = address.rpartition(":")
        proc = Path(f"/proc/{pid}")
        try:
            executable = os.readlink(proc / "exe")
            name = (proc / "comm").read_text().strip()
        except OSError as error:
            raise SystemExit(f"--redis-pid {pid}: cannot read /proc ({error})") from None
        if "redis" not in name and "valkey" not in name:
            raise SystemExit(f"--redis-pid {pid} is {name!r}, not a Redis server")
        # by its name: Debian's redis-server is a link to redis-check-rdb, which reads argv[0]
        beside = os.path.join(os.path.dirname(executable), name)
        binary = shutil.which(name) or (beside if os.path.exists(beside) else executable)
        if not ask(host, int(port), timeout=2):
            raise SystemExit(f"nothing answers PING on {address}")
        server = cls(host, int(port), pid, [], tempfile.gettempdir())
        found = server.admin("CONFIG", "GET", "bind")  # redis-py answers a dict
        bind = next(iter(found.values())) if isinstance(found, dict) else found[1]
        server.command = [
            *(binary, "--port", port, "--bind", *bind.decode().split()),
            *("--save", "", "--appendonly", "no", "--dir", server.cwd),
        ]
        return server

    def start(self, timeout: float = 10.0) -> float:
        """Start the command on the port; the monotonic time it first answered ``PING``."""
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.pid, self.killed = self.process.pid, False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ask(self.host, self.port, timeout=0.05):
                return time.monotonic()
            if self.process.poll() is not None:
                break
            time.sleep(0.002)
        raise RuntimeError(f"{self.command[0]} on port {self.port} did not answer in {timeout}s")

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.killed = True
        if self.process is not None and self.process.pid == self.pid:
            self.process.wait(timeout=5)
        deadline = time.monotonic() + 5  # someone else's child: wait until the port is free
        while ask(self.host, self.port, timeout=0.05) and time.monotonic() < deadline:
            time.sleep(0.01)

    def signal_stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True

    def signal_continue(self) -> float:
        os.kill(self.pid, signal.SIGCONT)
        self.stopped = False
        return time.monotonic()

    def admin(self, *command: Any) -> Any:
        import redis  # noqa: PLC0415 - the harness needs it only to pause

        client: Any = redis.Redis(host=self.host, port=self.port, socket_timeout=5)
        try:
            return client.execute_command(*command)
        finally:
            client.close()

    def answered_after(self, since: float, timeout: float = 10.0) -> float | None:
        """When the server first answers ``PING``, polled from ``since``; None if it never does."""
        deadline = since + timeout
        while time.monotonic() < deadline:
            if ask(self.host, self.port, timeout=0.5):
                return time.monotonic()
            time.sleep(0.002)
        return None

    def restore(self) -> None:
        """Undo a fault left half-done by an error: continue, unpause, restart."""
        if self.stopped:
            self.signal_continue()
        if self.killed:
            self.start()
        try:
            self.admin("CLIENT", "UNPAUSE")
        except Exception as error:  # best effort: a pause ends by itself
            print(f"outages: CLIENT UNPAUSE failed: {error!r}", file=sys.stderr)

    def close(self) -> None:
        """Stop what this run started (and continue it first if it is stopped)."""
        if self.stopped:
            self.signal_continue()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def waiting_ping(host: str, port: int) -> socket.socket | None:
    """A connection with a ``PING`` sent on it, for :func:`answered` to wait on."""
    try:
        sock = socket.create_connection((host, port), timeout=1.0)
        sock.sendall(b"PING\r\n")
    except OSError:
        return None
    return sock


def answered(sock: socket.socket | None, timeout: float = 10.0) -> float | None:
    """The monotonic time the ``PING`` on ``sock`` was answered; ``None`` if it was not."""
    if sock is None:
        return None
    try:
        sock.settimeout(timeout)
        reply = sock.recv(64)
    except OSError:
        return None
    finally:
        sock.close()
    return time.monotonic() if reply.startswith(b"+PONG") else None


def inject(server: RedisServer, fault: str, outage: float) -> dict[str, float | None]:
    """Run the fault; when it began, recovery, and when the server first answered again.

    ``kill``: recovery is the restarted server's first ``PONG``. ``stop``: the moment SIGCONT
    is sent (a ``PING`` sent before it times the first answer). ``pause``: the moment a
    ``PING`` sent 50 ms before the pause's nominal end is answered: Redis lifts a pause on
    its next cron tick (``hz`` 10: up to 100 ms late, more on a busy host), not on time.
    """
    began = time.monotonic()
    if fault == "kill":
        server.kill()
        time.sleep(max(0.0, began + outage - time.monotonic()))
        recovered = server.start()  # restart done: its first PONG
        return {"fault_at": began, "recovered_at": recovered, "answered_at": recovered}
    if fault == "stop":
        server.signal_stop()
        time.sleep(max(0.0, began + outage - 0.05 - time.monotonic()))
        ping = waiting_ping(server.host, server.port)  # the kernel accepts it, queued
        time.sleep(max(0.0, began + outage - time.monotonic()))
        recovered = server.signal_continue()
        return {"fault_at": began, "recovered_at": recovered, "answered_at": answered(ping)}
    # pause: the pause starts a little after ``began``, so it cannot end before this
    server.admin("CLIENT", "PAUSE", int(outage * 1000), "ALL")
    nominal_end = began + outage
    time.sleep(max(0.0, nominal_end - 0.05 - time.monotonic()))
    ping = waiting_ping(server.host, server.port)  # held by the pause until it ends
    unpaused = answered(ping) or server.answered_after(nominal_end)
    if unpaused is None:
        raise RuntimeError("the paused server never answered again")
    return {
        "fault_at": began,
        "recovered_at": unpaused,
        "answered_at": unpaused,
        "nominal_end": nominal_end,
    }


# --- workers ------------------------------------------------------------------------------------


@dataclass
class Shared:
    """What the parent shares with every worker process."""

    committed: Any  # Array: per row, the highest version whose commit returned
    ready: Any  # Queue: one message per worker once it is set up
    start: Any  # Event: go
    stop: Any  # Event: stop and report
    results: Any  # Queue: one report per worker


@dataclass
class Worker:
    """One worker process's world."""

    args: argparse.Namespace
    shared: Shared
    model: Any
    engine: Any
    manager: CacheManager
    rng: random.Random
    observer: Observer
    report: dict[str, Any]


class Observer:
    """A process's breaker, replay queue and near cache, recorded when they change."""

    def __init__(self, manager: CacheManager) -> None:
        self.manager = manager
        self.changes: list[tuple[float, str, bool, bool | None]] = []
        self._last: tuple[str, bool, bool | None] | None = None

    def near_hits(self) -> int:
        stats = self.manager.near_cache_stats()
        return 0 if stats is None else stats.hits

    def __call__(self) -> None:
        near = self.manager.near_cache_stats()
        now = (
            self.manager.breaker_stats().state,
            self.manager.pending_invalidations > 0,
            None if near is None else near.tracking,
        )
        if now != self._last:
            self._last = now
            self.changes.append((time.monotonic(), *now))


def worker(role: str, index: int, args: argparse.Namespace, shared: Shared) -> None:
    """One writer or reader; always reports, even on failure."""
    report: dict[str, Any] = {"role": role, "index": index, "pid": os.getpid(), "error": None}
    try:
        models = stress.make_models(args.table)
        setup_cache_listeners()
        engine = create_engine(args.postgres, pool_size=2, max_overflow=0)
        manager = CacheManager(cache_config(args))
        rng = random.Random(None if args.seed is None else f"{args.seed}-{role}-{index}")
        with Session(engine) as session:  # connect before the clock starts
            session.execute(select(models.row.id).limit(1))
        shared.ready.put(f"{role}-{index}")
        if not shared.start.wait(GRACE):
            raise TimeoutError("never told to start")
        observer = Observer(manager)
        loop = write_loop if role == "writer" else read_loop
        loop(Worker(args, shared, models.row, engine, manager, rng, observer, report))
        observer()
        report["changes"] = observer.changes
        report["cache"] = stress.summed(s.as_dict() for s in manager.stats().values())
        breaker = manager.breaker_stats()
        report["breaker"] = {
            "state": breaker.state,
            "opened": breaker.opened,
            "refused": breaker.refused,
        }
        report["pending_at_end"] = manager.pending_invalidations
        near = manager.near_cache_stats()
        report["near"] = None if near is None else {**near.__dict__, "hit_ratio": near.hit_ratio}
        engine.dispose()
    except BaseException:
        report["error"] = traceback.format_exc()
    finally:
        shared.results.put(report)


def cache_config(args: argparse.Namespace) -> CacheConfig:
    host, _, port = args.cache.rpartition(":")
    options: dict[str, Any] = {"near_cache": args.near_cache}
    if args.breaker_interval is not None:
        options["breaker_interval"] = args.breaker_interval
    return CacheConfig(
        backend="dogpile.cache.redis",
        arguments={"host": host, "port": int(port)},
        key_prefix=args.key_prefix,
        **options,
    )


def failed(report: dict[str, Any], error: BaseException) -> None:
    """Count a request that raised: by role and type, with a few examples."""
    kind = f"{report['role']}:{type(error).__name__}"
    report.setdefault("failures", {})
    report["failures"][kind] = report["failures"].get(kind, 0) + 1
    examples = report.setdefault("failure_samples", [])
    if len(examples) < SAMPLES:
        examples.append({"at": time.monotonic(), "kind": kind, "error": repr(error)[:500]})
    time.sleep(0.01)  # no busy loop on a persistent failure


def write_loop(ctx: Worker) -> None:
    """Update one row per transaction; log each commit that returned."""
    args, shared, model, rng, observer, report = (
        ctx.args, ctx.shared, ctx.model, ctx.rng, ctx.observer, ctx.report
    )  # fmt: skip
    commits = {name: array("d") for name in ("began", "returned")}
    rows, versions = array("q"), array("q")
    info = {} if args.blind_writers else {"cache_manager": ctx.manager}
    while not shared.stop.is_set():
        row_id = rng.randrange(args.rows)
        try:
            with Session(ctx.engine, info=info) as session:
                row = session.get(model, row_id, with_for_update=True)
                if row is None:
                    raise LookupError(f"row {row_id} is gone")
                version = int(row.version) + 1
                row.version, row.note = version, f"w{report['index']}-{len(rows)}"
                session.flush()
                began = time.monotonic()
                session.commit()
                returned = time.monotonic()
        except Exception as error:
            failed(report, error)
            observer()
            continue
        # commit() returned: no read that starts from now on may see an older version
        with shared.committed.get_lock():
            shared.committed[row_id] = max(shared.committed[row_id], version)
        commits["began"].append(began)
        commits["returned"].append(returned)
        rows.append(row_id)
        versions.append(version)
        observer()
        if args.write_interval > 0:
            time.sleep(rng.uniform(0, 2 * args.write_interval))
    report["commits"] = {**commits, "row": rows, "version": versions}


def read_loop(ctx: Worker) -> None:
    """Read rows (every ``--list-every``-th read: all of them); check each against the floor."""
    args, shared, model, manager, observer, report = (
        ctx.args, ctx.shared, ctx.model, ctx.manager, ctx.observer, ctx.report
    )  # fmt: skip
    starts, ends, flags = array("d"), array("d"), array("B")
    stale: list[dict[str, Any]] = []
    count = 0
    while not shared.stop.is_set():
        count += 1
        listing = args.list_every > 0 and count % args.list_every == 0
        loaded: list[bool] = []
        near_before = observer.near_hits()
        row_id = ctx.rng.randrange(args.rows)
        with Session(ctx.engine, info={"cache_manager": manager}) as session:

            def load_all(session: Session = session, loaded: list[bool] = loaded) -> list[Any]:
                loaded.append(True)
                return list(session.scalars(select(model).order_by(model.id)))

            def load_one(
                session: Session = session, row_id: int = row_id, loaded: list[bool] = loaded
            ) -> Any:
                loaded.append(True)
                return session.get(model, row_id)

            floors = shared.committed[:]  # copied before the read starts
            started = time.monotonic()
            try:
                if listing:
                    seen = [(r.id, r.version) for r in manager.load_list(model, "all", load_all)]
                else:
                    found = manager.load(model, row_id, load_one)
                    seen = [(found.id, found.version)]
            except Exception as error:
                failed(report, error)
                observer()
                continue
            ended = time.monotonic()
        flag = (0 if loaded else HIT) | (LISTING if listing else 0)
        if observer.near_hits() > near_before:
            flag |= NEAR
        behind = [(row, version) for row, version in seen if version < floors[row]]
        if behind:
            flag |= STALE
            row, version = behind[0]
            stale.append(
                {
                    "row": row,
                    "seen": version,
                    "floor": floors[row],
                    "start": started,
                    "end": ended,
                    "read": "list" if listing else "entity",
                    "hit": not loaded,
                    "near": bool(flag & NEAR),
                }
            )
        starts.append(started)
        ends.append(ended)
        flags.append(flag)
        observer()
        if args.read_interval > 0:
            time.sleep(args.read_interval)
    report["reads"] = {"start": starts, "end": ends, "flags": flags}
    report["stale"] = stale


# --- analysis -----------------------------------------------------------------------------------


def percentiles(values: Sequence[float]) -> dict[str, Any]:
    """Count, p50, p99 and max in milliseconds (nearest rank); ``None`` without values."""
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float | None:
        return round(ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] * 1000, 2) if n else None

    return {"count": n, "p50_ms": rank(0.5), "p99_ms": rank(0.99), "max_ms": rank(1.0)}


def phase_of(t: float, times: dict[str, Any]) -> str:
    if t < times["fault_at"]:
        return "before_fault"
    return "during_outage" if t < times["recovered_at"] else "after_recovery"


def relative(t: float | None, origin: float) -> float | None:
    return None if t is None else round(t - origin, 4)


def analyze(
    args: argparse.Namespace, reports: list[dict[str, Any]], times: dict[str, Any], expected: int
) -> dict[str, Any]:
    recovered = times["recovered_at"]
    ok = [r for r in reports if r["error"] is None]
    writers = [r for r in ok if r["role"] == "writer"]
    readers = [r for r in ok if r["role"] == "reader"]

    returned_at, commits = commit_summary(writers, times)
    reads, per_reader = read_summary(args, readers, times)
    stale = stale_summary([s for r in readers for s in r["stale"]], returned_at, times)

    failures: dict[str, int] = {}
    for report in ok:
        for kind, count in report.get("failures", {}).items():
            failures[kind] = failures.get(kind, 0) + count
    failure_samples = [
        {**sample, "at_s": relative(sample.pop("at"), recovered)}
        for report in ok
        for sample in report.get("failure_samples", [])
    ][:SAMPLES]

    processes = [process_summary(report, times) for report in ok]
    worker_errors = [f"{r['role']}-{r['index']}: {r['error']}" for r in reports if r["error"]]
    if len(reports) < expected:
        worker_errors.append(f"{expected - len(reports)} workers never reported")
    reads_total = sum(len(r["reads"]["start"]) for r in readers)
    summary: dict[str, Any] = {
        "fault": args.fault,
        "outage_s": args.outage,
        "near_cache": args.near_cache,
        "blind_writers": args.blind_writers,
        "writers": args.writers,
        "readers": args.readers,
        "rows": args.rows,
        "redis": args.cache,
        "timeline_s": {
            "load_began": relative(times["started_at"], times["fault_at"]),
            "fault": 0.0,
            "recovery": relative(recovered, times["fault_at"]),
            "first_pong_after_recovery": relative(times["answered_at"], recovered),
            "pause_nominal_end_before_recovery": relative(
                recovered, times.get("nominal_end", recovered)
            ),
            "load_stopped_after_recovery": relative(times["stopped_at"], recovered),
        },
        "commits": sum(len(r["commits"]["row"]) for r in writers),
        "reads": reads_total,
        "failed_requests": failures,
        "failed_request_samples": failure_samples,
        "stale_reads": stale,
        **commits,
        **reads,
        "readers_after_recovery": per_reader,
        "processes": processes,
        "every_breaker_closed": all(p["state_at_end"] == "closed" for p in processes),
        "breaker_closed_while_down": [p["process"] for p in processes if p["closed_while_down"]],
        "cache_stats": {
            role: stress.summed(r.get("cache", {}) for r in ok if r["role"] == role)
            for role in ("writer", "reader")
        },
        "worker_errors": worker_errors,
    }
    summary["targets"] = {
        "no_failed_request": not failures,
        "no_stale_read_after_250ms": stale["later_than_250ms"] == 0,
        "every_breaker_closed": bool(processes) and summary["every_breaker_closed"],
        "cache_used_again": bool(per_reader)
        and all((r["hit_ratio_after_recovery"] or 0) > 0 for r in per_reader),
    }
    return summary


def commit_summary(
    writers: list[dict[str, Any]], times: dict[str, Any]
) -> tuple[dict[tuple[int, int], float], dict[str, Any]]:
    """When each ``(row, version)``'s commit returned; commit latency per phase."""
    recovered = times["recovered_at"]
    returned_at: dict[tuple[int, int], float] = {}
    windows: dict[str, list[float]] = {
        "overall": [],
        "before_fault": [],
        "during_outage": [],
        "after_recovery_5s": [],
        "after_recovery_rest": [],
    }
    slowest = (0.0, 0.0)
    for report in writers:
        log = report["commits"]
        for row, version, began, done in zip(
            log["row"], log["version"], log["began"], log["returned"], strict=True
        ):
            returned_at[row, version] = done
            took = done - began
            windows["overall"].append(took)
            phase = phase_of(began, times)
            if phase == "after_recovery":
                early = began < recovered + AFTER_WINDOW
                phase = "after_recovery_5s" if early else "after_recovery_rest"
            windows[phase].append(took)
            slowest = max(slowest, (took, began))
    return returned_at, {
        "commit_latency": {name: percentiles(values) for name, values in windows.items()},
        "slowest_commit_began_after_recovery_s": relative(slowest[1], recovered),
    }


def read_summary(
    args: argparse.Namespace, readers: list[dict[str, Any]], times: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read latency and hit ratio per phase; per reader, its use of the cache after recovery."""
    recovered = times["recovered_at"]
    windows: dict[str, list[float]] = {
        "before_fault": [],
        "during_outage": [],
        "after_recovery_5s": [],
    }
    hits = {
        name: [0, 0]
        for name in ("before_fault", "during_outage", "after_0-1s", "after_1s+", "last_1s")
    }
    near_during_outage = 0
    per_reader = []
    for report in readers:
        reads = report["reads"]
        hits_after, reads_after, first_hit = 0, 0, None
        for start, end, flag in zip(reads["start"], reads["end"], reads["flags"], strict=True):
            hit = bool(flag & HIT)
            phase = phase_of(start, times)
            window = phase
            if phase != "after_recovery":
                windows[phase].append(end - start)
                near_during_outage += phase == "during_outage" and bool(flag & NEAR)
            else:
                if start < recovered + AFTER_WINDOW:
                    windows["after_recovery_5s"].append(end - start)
                window = "after_0-1s" if start < recovered + 1 else "after_1s+"
                reads_after += 1
                hits_after += hit
                first_hit = start if hit and first_hit is None else first_hit
            for name in (window, "last_1s") if start >= times["stopped_at"] - 1 else (window,):
                hits[name][0] += hit
                hits[name][1] += 1
        per_reader.append(
            {
                "reader": report["index"],
                "reads_after_recovery": reads_after,
                "hit_ratio_after_recovery": (
                    round(hits_after / reads_after, 3) if reads_after else None
                ),
                "first_hit_after_recovery_s": relative(first_hit, recovered),
            }
        )
    summary = {
        "read_latency": {name: percentiles(values) for name, values in windows.items()},
        "hit_ratio": {name: round(h / n, 3) if n else None for name, (h, n) in hits.items()},
        "near_cache_reads_during_outage": near_during_outage if args.near_cache else None,
    }
    return summary, per_reader


def stale_summary(
    stale: list[dict[str, Any]], returned_at: dict[tuple[int, int], float], times: dict[str, Any]
) -> dict[str, Any]:
    """Stale reads bucketed by start relative to recovery, with their lateness."""
    fault_at, recovered = times["fault_at"], times["recovered_at"]
    buckets = dict.fromkeys(("before_fault", "during_outage", *(b for b, _ in AFTER_BUCKETS)), 0)
    timeline: dict[str, int] = {}  # 100 ms bins after the fault
    missed_after_recovery = from_cache = from_near = straddling = 0
    late_start = late_end = None
    oldest_miss = 0.0
    samples: list[dict[str, Any]] = []
    for each in sorted(stale, key=lambda s: s["start"]):
        since = each["start"] - recovered
        if each["start"] < fault_at:
            bucket = "before_fault"
        elif since < 0:
            bucket = "during_outage"
            straddling += each["end"] >= recovered
        else:
            bucket = next(b for b, low in reversed(AFTER_BUCKETS) if since >= low)
            late_start = since if late_start is None else max(late_start, since)
            ended = each["end"] - recovered
            late_end = ended if late_end is None else max(late_end, ended)
        buckets[bucket] += 1
        if each["start"] >= fault_at:
            slot = f"{math.floor((each['start'] - fault_at) * 10) / 10:.1f}"
            timeline[slot] = timeline.get(slot, 0) + 1
        missed = returned_at.get((each["row"], each["seen"] + 1))
        if missed is not None:
            oldest_miss = max(oldest_miss, each["start"] - missed)
            missed_after_recovery += missed >= recovered
        from_cache += each["hit"]
        from_near += each["near"]
        if len(samples) < SAMPLES or (since >= STALE_WINDOW and len(samples) < 2 * SAMPLES):
            samples.append(
                {
                    "row": each["row"],
                    "read": each["read"],
                    "seen": each["seen"],
                    "committed_before_read": each["floor"],
                    "started_after_recovery_s": round(since, 4),
                    "missed_commit_returned_after_recovery_s": relative(missed, recovered),
                    "from_cache": each["hit"],
                    "near_cache_hit": each["near"],
                }
            )
    later = sum(buckets[b] for b, low in AFTER_BUCKETS if low >= STALE_WINDOW)
    return {
        "total": len(stale),
        "by_start": buckets,
        "later_than_250ms": later,
        "during_outage_returned_after_recovery": straddling,
        "max_lateness_by_start_s": None if late_start is None else round(late_start, 4),
        "max_lateness_by_end_s": None if late_end is None else round(late_end, 4),
        "missed_a_commit_made_after_recovery": missed_after_recovery,
        "longest_behind_a_returned_commit_s": round(oldest_miss, 4),
        "from_cache": from_cache,
        "from_near_cache": from_near,
        "per_100ms_after_fault": timeline,
        "samples": samples,
    }


def process_summary(report: dict[str, Any], times: dict[str, Any]) -> dict[str, Any]:
    """One process's breaker, replay queue and near cache around the fault."""
    fault_at, recovered = times["fault_at"], times["recovered_at"]
    changes = report["changes"]
    opened = [t for t, state, _, _ in changes if state != "closed" and t >= fault_at]
    closings = [
        t for (t, state, _, _), prev in zip(changes[1:], changes, strict=False)
        if state == "closed" and prev[1] != "closed"
    ]  # fmt: skip
    drained = [
        t for (t, _, pending, _), prev in zip(changes[1:], changes, strict=False)
        if not pending and prev[2]
    ]  # fmt: skip
    tracking_lost = [
        t for (t, _, _, tracking), prev in zip(changes[1:], changes, strict=False)
        if tracking is False and prev[3]
    ]  # fmt: skip
    tracking_back = [
        t for (t, _, _, tracking), prev in zip(changes[1:], changes, strict=False)
        if tracking and prev[3] is False
    ]  # fmt: skip
    return {
        "process": f"{report['role']}-{report['index']}",
        "state_at_end": report["breaker"]["state"],
        "opened": report["breaker"]["opened"],
        "refused": report["breaker"]["refused"],
        "first_open_after_fault_s": relative(opened[0] if opened else None, fault_at),
        "closed_after_recovery_s": relative(
            next((t for t in closings if t >= recovered), None), recovered
        ),
        "closed_while_down": any(fault_at <= t < recovered - DOWN_MARGIN for t in closings),
        "last_closed_s": relative(closings[-1] if closings else None, recovered),
        "queue_drained_after_recovery_s": relative(
            next((t for t in drained if t >= recovered), None), recovered
        ),
        "pending_at_end": report["pending_at_end"],
        "near_tracking_lost_after_fault_s": relative(
            next((t for t in tracking_lost if t >= fault_at), None), fault_at
        ),
        "near_tracking_back_after_recovery_s": relative(
            next((t for t in tracking_back if t >= recovered), None), recovered
        ),
        "near": report["near"],
    }


# --- text report --------------------------------------------------------------------------------


def text_report(summary: dict[str, Any]) -> str:
    def ms(entry: dict[str, Any]) -> str:
        if not entry["count"]:
            return "-"
        return f"p50 {entry['p50_ms']} / p99 {entry['p99_ms']} / max {entry['max_ms']} ms (n={entry['count']})"  # noqa: E501

    stale = summary["stale_reads"]
    lines = [
        f"fault {summary['fault']} for {summary['outage_s']} s"
        f"{' (near cache)' if summary['near_cache'] else ''}"
        f"{' (BLIND WRITERS)' if summary['blind_writers'] else ''}: "
        f"{summary['writers']} writers, {summary['readers']} readers, {summary['rows']} rows; "
        f"{summary['commits']} commits, {summary['reads']} reads",
        f"  recovery at +{summary['timeline_s']['recovery']} s after the fault; first PONG "
        f"+{summary['timeline_s']['first_pong_after_recovery']} s after it",
        f"  failed requests: {summary['failed_requests'] or 'none'}",
        f"  stale reads: {stale['total']} by start {stale['by_start']}; "
        f"max lateness {stale['max_lateness_by_start_s']} s (start) / "
        f"{stale['max_lateness_by_end_s']} s (end); missed a post-recovery commit: "
        f"{stale['missed_a_commit_made_after_recovery']}; from cache {stale['from_cache']}, "
        f"near {stale['from_near_cache']}",
    ]
    lines += [f"  commit {name}: {ms(v)}" for name, v in summary["commit_latency"].items()]
    lines += [f"  read {name}: {ms(v)}" for name, v in summary["read_latency"].items()]
    lines.append(f"  hit ratio: {summary['hit_ratio']}")
    if summary["near_cache"]:
        during = summary["near_cache_reads_during_outage"]
        lines.append(f"  near-cache reads during the outage: {during}")
    for p in summary["processes"]:
        lines.append(
            f"  {p['process']}: breaker {p['state_at_end']} (opened {p['opened']}x, first "
            f"+{p['first_open_after_fault_s']} s after fault, closed "
            f"+{p['closed_after_recovery_s']} s after recovery"
            f"{', CLOSED WHILE DOWN' if p['closed_while_down'] else ''}); queue drained "
            f"+{p['queue_drained_after_recovery_s']} s, pending at end {p['pending_at_end']}"
        )
    lines.append(f"  targets: {summary['targets']}")
    if summary["worker_errors"]:
        lines.append(f"  WORKER ERRORS: {summary['worker_errors']}")
    return "\n".join(lines)


# --- parent -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server (or attach to it), the workers, the fault; return the summary."""
    server = (
        RedisServer.private(args.redis_server)
        if args.redis is None
        else RedisServer.attach(args.redis, args.redis_pid)
    )
    args.cache = f"{server.host}:{server.port}"
    context = multiprocessing.get_context("spawn")
    shared = Shared(
        committed=context.Array("q", args.rows),
        ready=context.Queue(),
        start=context.Event(),
        stop=context.Event(),
        results=context.Queue(),
    )
    processes: list[Any] = []
    reports: list[dict[str, Any]] = []
    times: dict[str, Any] = {}
    try:
        stress.prepare_table(args)
        processes = [
            context.Process(target=worker, args=(role, i, args, shared), name=f"{role}-{i}")
            for role, count in (("writer", args.writers), ("reader", args.readers))
            for i in range(count)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + GRACE
        for _ in processes:
            shared.ready.get(timeout=max(0.1, deadline - time.monotonic()))
        times["started_at"] = time.monotonic()
        shared.start.set()
        time.sleep(args.warmup)
        try:
            times.update(inject(server, args.fault, args.outage))
        except BaseException:
            server.restore()
            raise
        time.sleep(max(0.0, times["recovered_at"] + args.after - time.monotonic()))
        times["stopped_at"] = time.monotonic()
        shared.stop.set()
        deadline = time.monotonic() + GRACE
        while len(reports) < len(processes) and time.monotonic() < deadline:
            try:
                reports.append(shared.results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                break
    finally:
        shared.stop.set()
        shared.start.set()  # a worker still waiting to start ends
        for process in processes:
            process.join(timeout=10)
        for process in processes:  # only our own children, and only if they hang
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        try:
            stress.drop_table(args)
            if args.redis is not None and ask(server.host, server.port):
                stress.delete_redis_keys(args)  # a server we leave running
        finally:
            server.close()
    return analyze(args, reports, times, len(processes))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stress._terminated)  # unwinds run()'s clean-up
    summary = run(args)
    text = json.dumps(summary, indent=2)
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")
    print(text)
    print(text_report(summary), file=sys.stderr)
    if summary["worker_errors"]:
        return 2
    return 0 if all(summary["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
