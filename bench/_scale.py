"""``python -m bench scale``: how the cost grows with entries, processes and rows per commit.

Three curves, on private servers this command starts and stops (a ``redis-server``, a
``memcached`` with room for a million entries, a 3-master Redis Cluster), so that nothing
shared is filled or flushed:

* **Entries**: one process fills a backend with 10³, then 10⁵, then 10⁶ rows of the
  benchmark's model (loaded from SQLite, stored with ``CacheManager.set_many``) and after each
  size times ``repo.get`` hits of random ids among them, in a fresh session each, and the
  backend's own client reading one entry's bytes; with the memory each entry takes (Redis
  ``used_memory``, Memcached ``bytes``, ``tracemalloc`` for the memory backend, whose bound
  ``memory_max_entries`` is raised to the largest size).
* **Processes**: 1, 2, 4 and 8 processes read random cached ids (``repo.get`` in a fresh
  session) for ``--duration`` seconds against one Redis, then against the Cluster, the same
  ``--keys`` entries on each; total reads per second, and the CPU the servers used.
* **Rows per commit**: a PostgreSQL transaction updates 1, 10, 100, 1,000 rows and commits,
  with the listeners on Redis and without a cache manager; the commit's time and the backend
  round trips it made.

Prints the figures, writes them as JSON in ``--results`` and as PNG plots in ``--plots``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import decimal
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, select
from sqlalchemy.orm import sessionmaker

from bench import _cases, _env
from bench._env import Account, Base
from bench.suite import RESULTS, machine
from declcache import CacheConfig, CacheManager, setup_cache_listeners
from tests._servers import MemcachedProcess, RedisProcess, _free_port

ROOT = Path(__file__).resolve().parents[1]
PLOTS = ROOT / "docs" / "img"
HASH_SLOTS = 16384
#: Keys the memory backend's bound leaves beside the entries (generation and list tokens): at
#: exactly the entry count, a fill evicts what the hits need.
HEADROOM = 1_000


def _numbers(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench scale", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--sizes", default="1e3,1e5,1e6", help="entries held (1e3,1e5,1e6)")
    parser.add_argument("--backends", default="memory,redis,memcached", help="comma-separated")
    parser.add_argument("--reads", type=int, default=5000, help="timed hits per size")
    parser.add_argument("--processes", default="1,2,4,8", help="reader processes")
    parser.add_argument("--keys", type=int, default=100_000, help="entries the readers read")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of reading")
    parser.add_argument("--no-cluster", action="store_true", help="one Redis only")
    parser.add_argument(
        "--rate-rounds", type=int, default=3, help="rounds of the throughput measurements"
    )
    parser.add_argument("--changes", default="1,10,100,1000", help="rows a commit updates")
    parser.add_argument("--commits", type=int, default=20, help="commits per size and kind")
    parser.add_argument(
        "--parts", default="entries,processes,commits", help="which curves (comma-separated)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--plots", type=Path, default=PLOTS, help="where the PNGs go")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNGs")
    parser.add_argument(
        "--replot", type=Path, help="only draw the PNGs of a results JSON this command wrote"
    )
    options = parser.parse_args(argv)
    options.sizes = sorted(_numbers(options.sizes))
    options.processes = _numbers(options.processes)
    options.changes = _numbers(options.changes)
    options.backends = [name for name in options.backends.split(",") if name]
    options.parts = {name for name in options.parts.split(",") if name}
    return options


# -- servers --------------------------------------------------------------------------------------


class RoomyMemcached(MemcachedProcess):
    """A private ``memcached`` with 4 GiB for items (the tests' servers have 64 MiB)."""

    def _command(self, binary: str) -> list[str]:
        command = super()._command(binary)
        command[command.index("-m") + 1] = "4096"
        return command


class ClusterNode(RedisProcess):
    """A private ``redis-server`` in cluster mode, its state and bus port its own."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.bus_port = _free_port()

    def _command(self, binary: str) -> list[str]:
        return [
            *super()._command(binary),
            "--cluster-enabled", "yes",
            "--cluster-port", str(self.bus_port),
            "--cluster-config-file", str(self.folder / f"nodes-{self.port}.conf"),
            "--cluster-node-timeout", "5000",
            "--dir", str(self.folder),
        ]  # fmt: skip


def _client(address: tuple[str, int]) -> Any:
    import redis

    return redis.Redis(*address, socket_timeout=5)


def start_cluster(masters: int = 3, timeout: float = 30.0) -> list[ClusterNode]:
    """``masters`` nodes, each with an even share of the slots, met and ``cluster_state:ok``."""
    folder = Path(tempfile.mkdtemp(prefix="declcache-bench-cluster-"))
    nodes = [ClusterNode(folder) for _ in range(masters)]
    try:
        for node in nodes:
            problem = node._launch(10.0)
            if problem is not None:
                raise RuntimeError(problem)
        share = HASH_SLOTS // masters
        for index, node in enumerate(nodes):
            last = HASH_SLOTS - 1 if index == masters - 1 else (index + 1) * share - 1
            client = _client(node.address)
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", index * share, last)
            client.close()
        first = _client(nodes[0].address)
        for node in nodes[1:]:
            first.execute_command("CLUSTER", "MEET", node.host, node.port, node.bus_port)
        first.close()
        deadline = time.monotonic() + timeout
        while not all(_cluster_ok(node, masters) for node in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not come up")
            time.sleep(0.1)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def _cluster_ok(node: ClusterNode, masters: int) -> bool:
    client = _client(node.address)
    try:
        info = client.execute_command("CLUSTER", "INFO")
    finally:
        client.close()
    text = info.decode() if isinstance(info, bytes) else str(info)
    fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
    return fields.get("cluster_state") == "ok" and int(fields.get("cluster_known_nodes", 0)) == (
        masters
    )


def _cpu_seconds(addresses: list[tuple[str, int]]) -> float:
    total = 0.0
    for address in addresses:
        client = _client(address)
        try:
            cpu = client.info("cpu")
        finally:
            client.close()
        total += float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return total


# -- the database ---------------------------------------------------------------------------------


def create_rows(url: str, count: int) -> None:
    """``count`` rows of the benchmark's model, in bulk (a million take seconds)."""
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    rng = random.Random(8)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    with engine.begin() as connection:
        for first in range(1, count + 1, 50_000):
            connection.execute(
                insert(Account),
                [
                    {
                        "id": i,
                        "email": f"user{i}@example.com",
                        "name": f"User Number {i}",
                        "visits": rng.randint(0, 10_000),
                        "created_at": start + dt.timedelta(seconds=rng.randint(0, 10**8)),
                        "balance": decimal.Decimal(rng.randint(0, 10**9)) / 100,
                        "active": rng.random() < 0.8,
                    }
                    for i in range(first, min(count, first + 49_999) + 1)
                ],
            )
    engine.dispose()


def _worker(kind: str, options: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench._scale_worker", kind, json.dumps(options)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def _answer(worker: subprocess.Popen[str], timeout: float) -> Any:
    out, _ = worker.communicate(timeout=timeout)
    if worker.returncode != 0:
        raise RuntimeError(f"a scale worker failed ({worker.returncode}); see stderr above")
    return json.loads(out.strip().splitlines()[-1])


# -- (1) entries ----------------------------------------------------------------------------------


def entries(options: argparse.Namespace, url: str, notes: list[str]) -> dict[str, Any]:
    """Every backend in one worker process, filled size by size, timed interleaved."""
    servers: list[RedisProcess | MemcachedProcess] = []
    targets: list[dict[str, Any]] = []
    for backend in options.backends:
        spec: dict[str, Any] = {"kind": backend, "prefix": f"scale{secrets.token_hex(3)}:"}
        if backend == "memory":
            spec |= {
                "backend": "dogpile.cache.memory",
                "arguments": {},
                "memory_max_entries": max(options.sizes) + HEADROOM,
            }
        else:
            server = RedisProcess() if backend == "redis" else RoomyMemcached()
            problem = server._launch(10.0)
            if problem is not None:
                notes.append(f"entries, {backend} skipped: {problem.splitlines()[0]}")
                continue
            servers.append(server)
            host, port = server.address
            spec["address"] = [host, port]
            spec["url"] = (
                f"redis://{host}:{port}/0" if backend == "redis" else f"memcached://{host}:{port}"
            )
        targets.append(spec)
    worker_options = {
        "db": url,
        "sizes": options.sizes,
        "reads": options.reads,
        "rounds": 5,
        "targets": targets,
    }
    try:
        found: dict[str, Any] = _answer(_worker("hits", worker_options), timeout=3600)
    finally:
        for server in servers:
            server.stop(kill=False)
    return found


# -- (2) processes --------------------------------------------------------------------------------


def fill(url: str, prefix: str, db: str, keys: int) -> None:
    """The ``keys`` first rows into a cache, through ``set_many``, from this process."""
    manager = CacheManager(CacheConfig(url=url, key_prefix=prefix, expiration_time=3600))
    engine = create_engine(db)
    loading = sessionmaker(bind=engine)
    for first in range(1, keys + 1, 10_000):
        with loading() as session:
            batch = session.scalars(
                select(Account).where(Account.id.between(first, min(keys, first + 9_999)))
            ).all()
            manager.set_many(Account, batch)
    manager.close()
    engine.dispose()


def read_rate(
    url: str, addresses: list[tuple[str, int]], count: int, *, prefix: str, options: Any, db: str
) -> dict[str, Any]:
    """``count`` processes reading for ``options.duration`` s: reads/s, server CPU, SELECTs."""
    folder = Path(tempfile.mkdtemp(prefix="declcache-bench-rate-"))
    go = folder / "go"
    workers = [
        _worker(
            "reads",
            {
                "url": url,
                "prefix": prefix,
                "db": db,
                "keys": options.keys,
                "seed": index,
                "ready": str(folder / f"ready-{index}"),
                "go": str(go),
            },
        )
        for index in range(count)
    ]
    deadline = time.monotonic() + 120
    while not all((folder / f"ready-{i}").exists() for i in range(count)):
        if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
            break
        time.sleep(0.01)
    start = time.time() + 0.5
    end = start + options.duration
    (folder / "go.tmp").write_text(json.dumps({"start": start, "end": end}))
    os.replace(folder / "go.tmp", go)
    time.sleep(max(0.0, start - time.time()))
    cpu = _cpu_seconds(addresses)
    time.sleep(max(0.0, end - time.time()))
    cpu = _cpu_seconds(addresses) - cpu
    answers = [_answer(worker, timeout=120 + options.duration) for worker in workers]
    return {
        "reads_per_s": sum(answer["reads"] for answer in answers) / options.duration,
        "server_cpu": cpu / options.duration,
        "selects": sum(answer["selects"] for answer in answers),
    }


def processes(options: argparse.Namespace, db: str, notes: list[str]) -> dict[str, Any]:
    """One Redis and a 3-master Cluster, both up and filled; every (servers, processes) pair
    measured once per round, in a shuffled order, ``--rate-rounds`` rounds; medians."""
    single = RedisProcess()
    problem = single._launch(10.0)
    if problem is not None:
        notes.append(f"processes skipped: {problem.splitlines()[0]}")
        return {}
    nodes: list[ClusterNode] = []
    try:
        host, port = single.address
        targets = {"one Redis": (f"redis://{host}:{port}/0", [single.address])}
        if not options.no_cluster:
            try:
                nodes = start_cluster()
            except RuntimeError as error:
                notes.append(f"Redis Cluster skipped: {str(error).splitlines()[0]}")
            else:
                url = "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in nodes)
                targets["3-master Redis Cluster"] = (url, [node.address for node in nodes])
        prefix = f"rate{secrets.token_hex(3)}:"
        for url, _ in targets.values():
            fill(url, prefix, db, options.keys)
        samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
        pairs = [(name, count) for name in targets for count in options.processes]
        rng = random.Random(4)
        for round_ in range(options.rate_rounds):
            for name, count in rng.sample(pairs, len(pairs)):
                url, addresses = targets[name]
                found = read_rate(url, addresses, count, prefix=prefix, options=options, db=db)
                samples.setdefault((name, count), []).append(found)
            print(f"  processes: round {round_ + 1} done", file=sys.stderr)
    finally:
        single.stop(kill=False)
        for node in nodes:
            node.stop(kill=False)
    results: dict[str, Any] = {}
    for (name, count), found in samples.items():
        results.setdefault(name, []).append(
            {
                "processes": count,
                "reads_per_s": statistics.median(f["reads_per_s"] for f in found),
                "per_round": [round(f["reads_per_s"]) for f in found],
                "server_cpu": statistics.median(f["server_cpu"] for f in found),
                "selects": sum(f["selects"] for f in found),
            }
        )
    for rows in results.values():
        rows.sort(key=lambda row: row["processes"])
    return results


# -- (3) rows per commit --------------------------------------------------------------------------


def commits(options: argparse.Namespace, notes: list[str]) -> dict[str, Any]:
    databases = _env.Databases.create(["postgresql"])
    notes.extend(databases.notes)
    db = "postgresql"
    if db not in databases.urls:
        databases = _env.Databases.create(["sqlite"])
        db = "sqlite"
        notes.append("rows per commit measured on SQLite: PostgreSQL is not available")
    server = RedisProcess()
    problem = server._launch(10.0)
    if problem is not None:
        databases.close()
        notes.append(f"rows per commit skipped: {problem.splitlines()[0]}")
        return {}
    setup_cache_listeners()
    host, port = server.address
    manager = CacheManager(
        CacheConfig(url=f"redis://{host}:{port}/0", key_prefix="commits:", expiration_time=3600)
    )
    engine = create_engine(databases.urls[db][0])
    cached = sessionmaker(bind=engine, info={"cache_manager": manager}, **_cases.SESSION_OPTIONS)
    plain = sessionmaker(bind=engine, **_cases.SESSION_OPTIONS)
    cache = manager._cache(Account)
    assert cache is not None
    calls = cache.store.inner = _cases._CallCounter(cache.store.inner)
    rng = random.Random(3)
    results: dict[str, Any] = {"database": db}

    def commit(sessions: sessionmaker[Any], rows: int) -> tuple[int, int, int]:
        first = rng.randint(1, _env.ROWS - rows + 1)
        clock = time.perf_counter_ns
        with sessions() as session:
            begun = clock()
            accounts = session.scalars(
                select(Account).where(Account.id.between(first, first + rows - 1))
            ).all()
            for account in accounts:
                account.visits += 1
            before, committing = calls.count, clock()
            session.commit()
            done = clock()
        return done - committing, done - begun, calls.count - before

    try:
        for rows in options.changes:
            measured: dict[str, list[tuple[int, int, int]]] = {"uncached": [], "redis": []}
            for _ in range(2):  # connections, statement caches
                commit(plain, rows)
                commit(cached, rows)
            for _ in range(options.commits):
                measured["uncached"].append(commit(plain, rows))
                measured["redis"].append(commit(cached, rows))
            results[str(rows)] = {
                kind: {
                    "commit_us": statistics.median(m[0] for m in samples) / 1000,
                    "transaction_us": statistics.median(m[1] for m in samples) / 1000,
                    "round_trips": statistics.median(m[2] for m in samples),
                }
                for kind, samples in measured.items()
            }
            print(f"  commits of {rows} rows done", file=sys.stderr)
    finally:
        manager.close()
        engine.dispose()
        server.stop(kill=False)
        databases.close()
    return results


# -- report ---------------------------------------------------------------------------------------


def _size(value: int) -> str:
    exponent = len(str(value)) - 1
    return f"10^{exponent}" if value == 10**exponent else f"{value:,}"


def print_entries(found: dict[str, Any]) -> None:
    if not found:
        return
    print("\nHits as the cache holds more entries (one process, random ids among them):\n")
    print(
        "| backend | entries | repo.get hit µs (p90) | raw GET µs (p90) | bytes per entry |"
        " SELECT/read | fill s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for backend, rows in found.items():
        for row in rows:
            raw = row["raw_get"]
            raw_cell = "-" if raw is None else f"{raw['median_us']:.1f} ({raw['p90_us']:.1f})"
            print(
                f"| {backend} | {_size(row['entries'])} | {row['hit']['median_us']:.1f}"
                f" ({row['hit']['p90_us']:.1f}) | {raw_cell} | {row['bytes_per_entry']:.0f} |"
                f" {row['selects_per_read']:.2f} | {row['fill_seconds']:.1f} |"
            )


def print_processes(found: dict[str, Any], options: argparse.Namespace) -> None:
    if not found:
        return
    print(
        f"\nRead throughput: processes reading {options.keys:,} cached ids for "
        f"{options.duration:g} s (repo.get, a fresh session each):\n"
    )
    print(
        "| servers | processes | reads/s (median) | per process | reads/s per round |"
        " server CPU (cores) | SELECTs |"
    )
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for name, rows in found.items():
        for row in rows:
            print(
                f"| {name} | {row['processes']} | {row['reads_per_s']:,.0f} |"
                f" {row['reads_per_s'] / row['processes']:,.0f} |"
                f" {', '.join(f'{value:,}' for value in row['per_round'])} |"
                f" {row['server_cpu']:.2f} | {row['selects']} |"
            )


def print_commits(found: dict[str, Any]) -> None:
    if not found:
        return
    print(
        f"\nCommit cost as a transaction changes more rows ({found['database']}, listeners on "
        "Redis vs no cache manager; medians):\n"
    )
    print(
        "| rows changed | commit µs uncached | commit µs Redis | transaction overhead |"
        " transaction µs uncached | transaction µs Redis | Redis round trips |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rows, row in found.items():
        if rows == "database":
            continue
        plain, redis = row["uncached"], row["redis"]
        overhead = redis["transaction_us"] / plain["transaction_us"] - 1
        print(
            f"| {rows} | {plain['commit_us']:.0f} | {redis['commit_us']:.0f} |"
            f" {overhead * 100:+.1f} % | {plain['transaction_us']:.0f} |"
            f" {redis['transaction_us']:.0f} | {redis['round_trips']:g} |"
        )


def plot(results: dict[str, Any], folder: Path, about: str) -> list[Path]:
    """The PNGs of each curve measured: ``scale-entries``, ``-processes``, ``-commits``."""
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if results.get("entries"):
        written.append(_plot_entries(results["entries"], folder / "scale-entries.png", about))
    if results.get("processes"):
        written.append(_plot_processes(results["processes"], folder / "scale-processes.png", about))
    if len(results.get("commits") or {}) > 1:
        written.append(_plot_commits(results["commits"], folder / "scale-commits.png", about))
    return written


def _plot_entries(found: dict[str, Any], path: Path, about: str) -> Path:
    import matplotlib.pyplot as plt

    figure, (latency, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for backend, rows in found.items():
        sizes = [row["entries"] for row in rows]
        hits = [row["hit"]["median_us"] for row in rows]
        line = latency.plot(sizes, hits, marker="o", label=backend)[0]
        if rows[0]["raw_get"] is not None:
            latency.plot(
                sizes,
                [row["raw_get"]["median_us"] for row in rows],
                marker="x",
                linestyle="--",
                color=line.get_color(),
                label=f"{backend}, raw GET",
            )
        memory.plot(sizes, [row["bytes_per_entry"] for row in rows], marker="o", label=backend)
    for axes in (latency, memory):
        axes.set_xscale("log")
    _label(latency, "entries in the cache", "median µs per read", "repo.get hit and raw GET")
    _label(memory, "entries in the cache", "bytes per entry", "memory held per entry")
    return _save(figure, path, about)


def _plot_processes(found: dict[str, Any], path: Path, about: str) -> Path:
    import matplotlib.pyplot as plt

    figure, (rate, cpu) = plt.subplots(1, 2, figsize=(10, 4))
    counts: list[int] = []
    for name, rows in found.items():
        counts = [row["processes"] for row in rows]
        rate.plot(counts, [row["reads_per_s"] for row in rows], marker="o", label=name)
        cpu.plot(counts, [row["server_cpu"] for row in rows], marker="o", label=name)
    for axes in (rate, cpu):
        axes.set_xscale("log", base=2)
        axes.set_xticks(counts, [str(count) for count in counts])
    _label(rate, "reader processes", "reads per second, all processes", "repo.get hits")
    _label(cpu, "reader processes", "CPU cores used by the Redis servers", "server CPU")
    return _save(figure, path, about)


def _plot_commits(found: dict[str, Any], path: Path, about: str) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    figure, axes = plt.subplots(figsize=(6, 4))
    sizes = [key for key in found if key != "database"]
    for kind, label in (("uncached", "no cache manager"), ("redis", "listeners on Redis")):
        axes.plot(
            [int(size) for size in sizes],
            [found[size][kind]["transaction_us"] / 1000 for size in sizes],
            marker="o",
            label=label,
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(ticker.ScalarFormatter())
    axes.yaxis.set_minor_formatter(ticker.NullFormatter())
    axes.set_xlabel("rows the transaction updates")
    axes.set_ylabel("ms per transaction (select, update, commit)")
    axes.set_title(f"commit cost, {found['database']}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path, about)


def _label(axes: Any, x: str, y: str, title: str) -> None:
    """Labels, title, a grid and the legend; the y axis from 0."""
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    axes.set_title(title, fontsize=9)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def _save(figure: Any, path: Path, about: str) -> Path:
    import matplotlib.pyplot as plt

    figure.suptitle(about, fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    options = parse(argv)
    if options.replot is not None:
        saved = json.loads(options.replot.read_text())
        for written in plot(saved, options.plots, f"declcache — {saved['machine']}"):
            print(f"  plot: {written}")
        return 0
    started = time.perf_counter()
    notes: list[str] = []
    results: dict[str, Any] = {}
    folder = Path(tempfile.mkdtemp(prefix="declcache-bench-scale-"))
    db = f"sqlite:///{folder / 'scale.db'}"
    rows = max([_env.ROWS, *(options.sizes if "entries" in options.parts else [])])
    if "processes" in options.parts:
        rows = max(rows, options.keys)
    if options.parts & {"entries", "processes"}:
        create_rows(db, rows)
        print(f"  {rows:,} rows in {db}", file=sys.stderr)
    try:
        if "entries" in options.parts:
            results["entries"] = entries(options, db, notes)
        if "processes" in options.parts:
            results["processes"] = processes(options, db, notes)
        if "commits" in options.parts:
            results["commits"] = commits(options, notes)
    finally:
        (folder / "scale.db").unlink(missing_ok=True)
    about = machine()
    print(f"\ndeclcache scale benchmark — {about}")
    print_entries(results.get("entries") or {})
    print_processes(results.get("processes") or {}, options)
    print_commits(results.get("commits") or {})
    for note in notes:
        print(f"\n  note: {note}")
    print(f"\n  run took {time.perf_counter() - started:.0f} s")
    options.results.mkdir(parents=True, exist_ok=True)
    path = options.results / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": about, **results, "notes": notes}, indent=2))
    print(f"  results: {path}")
    if not options.no_plot:
        for written in plot(results, options.plots, f"declcache — {about}"):
            print(f"  plot: {written}")
    return 0
