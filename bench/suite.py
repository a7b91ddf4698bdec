"""Run every case side by side, print the table and the targets, write the plot.

Cases are timed one operation at a time (``perf_counter_ns``) in interleaved rounds, in a
shuffled order each round, so that the machine's noise falls on every case alike; each
figure is the median of all the samples of a case, after a warm-up that is thrown away.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import _cases, _env, _issue17, _profile, _relationships
from bench._cases import Case, Stack

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("memory", "redis", "memcached")
DATABASES = ("sqlite", "postgresql")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (about a minute)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    parser.add_argument("--databases", default=",".join(DATABASES), help="comma-separated")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 2)")
    parser.add_argument("--ops", type=int, help="operations per case per round (400, quick 100)")
    parser.add_argument("--no-peer", action="store_true", help="skip advanced-alchemy")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where the JSON and PNG go (bench/results)"
    )
    parser.add_argument("--no-extras", action="store_true", help="skip stampede and loop lag")
    parser.add_argument(
        "--profile", action="store_true", help="profile the memory-backend hit and exit"
    )
    options = parser.parse_args(argv)
    options.rounds = options.rounds or (2 if options.quick else 5)
    options.ops = options.ops or (100 if options.quick else 400)
    options.backends = [name for name in options.backends.split(",") if name]
    options.databases = [name for name in options.databases.split(",") if name]
    return options


# -- timing ---------------------------------------------------------------------------------------


def _time_sync(case: Case, ids: list[int], keep: bool) -> None:
    clock, run, before = time.perf_counter_ns, case.run, case.before
    assert run is not None
    for ident in ids:
        if before is not None:
            before(ident)
        started = clock()
        run(ident)
        elapsed = clock() - started
        if keep:
            case.samples.append(elapsed)


async def _time_async(case: Case, ids: list[int], keep: bool) -> None:
    clock, arun, before = time.perf_counter_ns, case.arun, case.before
    assert arun is not None
    for ident in ids:
        if before is not None:
            before(ident)
        started = clock()
        await arun(ident)
        elapsed = clock() - started
        if keep:
            case.samples.append(elapsed)


def measure(
    cases: list[Case], options: argparse.Namespace, loop: asyncio.AbstractEventLoop
) -> None:
    rng = random.Random(1)

    def chunk(case: Case, size: int, keep: bool) -> None:
        ids = [rng.randint(1, _env.ROWS) for _ in range(size)]
        before = _cases.SELECTS[0]
        if case.run is not None:
            _time_sync(case, ids, keep)
        else:
            loop.run_until_complete(_time_async(case, ids, keep))
        if keep:
            case.queries += _cases.SELECTS[0] - before

    order = list(cases)
    for case in order:
        chunk(case, max(20, options.ops // 4), keep=False)
    for round_ in range(options.rounds):
        rng.shuffle(order)
        for case in order:
            gc.collect()
            chunk(case, max(1, options.ops // case.ops_divisor), keep=True)
        print(f"  round {round_ + 1}/{options.rounds} done", file=sys.stderr)


def median_us(case: Case) -> float:
    return statistics.median(case.samples) / 1000


def p90_us(case: Case) -> float:
    ordered = sorted(case.samples)
    return ordered[int(len(ordered) * 0.9)] / 1000


# -- the untimed experiments ----------------------------------------------------------------------


def stampede(
    stack: Stack, backend: str, db: str, loop: asyncio.AbstractEventLoop
) -> dict[str, Any]:
    """50 concurrent reads of one cold key: SELECTs issued, with threads and with asyncio."""
    manager = stack.manager(backend, f"stampede-{backend}-{db}")
    sessions = stack.sessions(db, manager)
    async_sessions = stack.async_sessions(db, manager)
    counter = _cases.QueryCounter(stack.engine(db))
    async_counter = _cases.QueryCounter(stack.async_engine(db).sync_engine)
    results: dict[str, Any] = {"threads": [], "async": []}
    for trial in range(3):
        ident = 100 + trial
        manager.invalidate(_env.Account, ident)
        barrier = threading.Barrier(50)

        def read(ident: int = ident, barrier: threading.Barrier = barrier) -> None:
            with sessions() as session:
                repository = _cases.AccountRepository(session=session)
                barrier.wait()
                repository.get(ident)

        counter.count = 0
        threads = [threading.Thread(target=read) for _ in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results["threads"].append(counter.count)

        ident = 200 + trial
        manager.invalidate(_env.Account, ident)

        async def one(ident: int = ident) -> None:
            async with async_sessions() as session:
                await _cases.AsyncAccountRepository(session=session).get(ident)

        async def gather() -> None:
            await asyncio.gather(*(one() for _ in range(50)))

        async_counter.count = 0
        loop.run_until_complete(gather())
        results["async"].append(async_counter.count)
    return results


def two_process_stampede(stack: Stack, db: str) -> dict[str, list[int]]:
    """Two processes x 25 threads read one cold key on Redis: SELECTs, without and with lock."""
    import subprocess
    import tempfile

    stack.redis_used = True
    results: dict[str, list[int]] = {}
    root = Path(__file__).resolve().parents[1]
    for lock in (False, True):
        label = "distributed_lock" if lock else "no distributed_lock"
        results[label] = []
        for trial in range(3):
            folder = Path(tempfile.mkdtemp(prefix="declcache-bench-dlock-"))
            options = {
                "url": stack.databases.urls[db][0],
                "prefix": f"{stack.run_prefix}dlock-{int(lock)}-{trial}:",
                "lock": lock,
                "ident": 300 + trial,
                "delay": 0.05,
                "go": str(folder / "go"),
            }
            workers = []
            for index in range(2):
                ready = folder / f"ready{index}"
                argument = json.dumps({**options, "ready": str(ready)})
                workers.append(
                    (
                        ready,
                        subprocess.Popen(
                            [sys.executable, "-m", "bench._dlock", argument],
                            cwd=root,
                            stdout=subprocess.PIPE,
                            text=True,
                        ),
                    )
                )
            deadline = time.monotonic() + 60
            while not all(ready.exists() for ready, _ in workers):
                if time.monotonic() > deadline or any(w.poll() is not None for _, w in workers):
                    break
                time.sleep(0.005)
            (folder / "go").touch()
            total = 0
            for _, worker in workers:
                out, _ = worker.communicate(timeout=120)
                total += json.loads(out.strip().splitlines()[-1])["selects"]
            results[label].append(total)
    return results


def loop_lag(stack: Stack, db: str, loop: asyncio.AbstractEventLoop, reads: int) -> dict[str, Any]:
    """Maximum event-loop lag while ``reads`` cached async reads run against Redis."""
    from bench.loop_lag import LagMonitor

    manager = stack.manager("redis", f"lag-{db}")
    _cases.warm(stack.sessions(db, manager))
    async_sessions = stack.async_sessions(db, manager)
    semaphore = asyncio.Semaphore(50)

    async def one(index: int) -> None:
        async with semaphore, async_sessions() as session:
            await _cases.AsyncAccountRepository(session=session).get(index % _env.ROWS + 1)

    async def rounds() -> list[tuple[float, float, float]]:
        measured = []
        for _ in range(3):
            with LagMonitor() as monitor:
                started = time.perf_counter()
                await asyncio.gather(*(one(i) for i in range(reads)))
                elapsed = time.perf_counter() - started
            ordered = sorted(monitor.lags)
            p99 = ordered[int(len(ordered) * 0.99) - 1]
            measured.append((ordered[-1] * 1000, p99 * 1000, reads / elapsed))
        return measured

    async def run() -> dict[str, Any]:
        await asyncio.gather(*(one(i) for i in range(reads // 4)))  # threads, connections
        result: dict[str, Any] = {"reads": reads}
        result["default"] = await rounds()
        gc.collect()
        gc.freeze()  # what a long-lived heap costs: the collector's pauses, left out
        try:
            result["gc.freeze()"] = await rounds()
        finally:
            gc.unfreeze()
        return result

    return loop.run_until_complete(run())


# -- report ---------------------------------------------------------------------------------------


def machine() -> str:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load}"
    )


def table(cases: list[Case]) -> str:
    lines = [
        f"| {'section':<15} | {'case':<48} | {'median µs':>10} | {'p90 µs':>9} | {'n':>5} |"
        f" {'SELECT/op':>9} |",
        f"|{'-' * 17}|{'-' * 50}|{'-' * 11}:|{'-' * 10}:|{'-' * 6}:|{'-' * 10}:|",
    ]
    for case in cases:
        if case.samples:
            lines.append(
                f"| {case.section:<15} | {case.name:<48} | {median_us(case):>10.1f} |"
                f" {p90_us(case):>9.1f} | {len(case.samples):>5} |"
                f" {case.queries / len(case.samples):>9.2f} |"
            )
    return "\n".join(lines)


def targets(
    by_name: dict[str, float], options: argparse.Namespace, cases: list[Case]
) -> list[tuple[str, str, str]]:
    """``(ratio, measured, verdict)`` for each target of issue 8 the run can compute."""
    rows: list[tuple[str, str, str]] = []

    def ratio(label: str, num: str, den: str, limit: float, *, at_least: bool = False) -> None:
        if num in by_name and den in by_name:
            value = by_name[num] / by_name[den]
            met = value >= limit if at_least else value <= limit
            sign = "≥" if at_least else "≤"
            rows.append(
                (f"{label} ({sign} {limit:g})", f"{value:.2f}x", "met" if met else "MISSED")
            )

    for db in options.databases:
        for mode in ("sync", "async"):
            ratio(
                f"memory hit / memory floor, {db} {mode}",
                f"repo.get memory {db} {mode}",
                "dogpile region.get memory",
                1.5,
            )
            ratio(
                f"memory hit / (memory floor + fresh session), {db} {mode}",
                f"repo.get memory {db} {mode}",
                "dogpile region.get memory + fresh session",
                1.5,
            )
            ratio(
                f"peer memory hit / declcache memory hit, {db} {mode}",
                f"advanced-alchemy get memory {db} {mode}",
                f"repo.get memory {db} {mode}",
                1.5,
                at_least=True,
            )
            for backend in ("redis", "memcached"):
                ratio(
                    f"{backend} hit / {backend} floor, {db} {mode}",
                    f"repo.get {backend} {db} {mode}",
                    f"dogpile region.get {backend}",
                    1.2,
                )
                ratio(
                    f"{backend} hit / ({backend} floor + fresh session), {db} {mode}",
                    f"repo.get {backend} {db} {mode}",
                    f"dogpile region.get {backend} + fresh session",
                    1.2,
                )
            ratio(
                f"redis+near hit / memory hit (memory speed), {db} {mode}",
                f"repo.get {_env.NEAR} {db} {mode}",
                f"repo.get memory {db} {mode}",
                1.2,
            )
            ratio(
                f"redis hit / redis+near hit, {db} {mode}",
                f"repo.get redis {db} {mode}",
                f"repo.get {_env.NEAR} {db} {mode}",
                1.0,
                at_least=True,
            )
            ratio(
                f"uncached / memory hit, {db} {mode}",
                f"session.get {db} {mode}",
                f"repo.get memory {db} {mode}",
                1.0,
                at_least=True,
            )
        ratio(
            f"100 x get / get_many(100), redis {db}",
            f"100 x get hit redis {db}",
            f"get_many(100) hit redis {db}",
            10,
            at_least=True,
        )
        ratio(
            f"list(100) uncached / hit, redis {db}",
            f"list(100) uncached {db}",
            f"list(100) hit redis {db}",
            1.0,
            at_least=True,
        )
        for backend in ("memory", "redis"):
            ratio(
                f"write with / without listeners, {backend} {db}",
                f"update+commit {db} listeners, {backend}",
                f"update+commit {db} no listeners",
                1.1,
            )
        miss = next((case for case in cases if case.name == f"repo.get miss redis {db} sync"), None)
        if miss is not None and miss.backend_calls:
            trips = statistics.median(miss.backend_calls)
            extra = by_name[miss.name] - by_name.get(f"session.get {db} sync", 0.0)
            rows.append(
                (
                    f"redis miss: backend round trips per miss, {db} (≤ 2)",
                    f"{trips:.2f}",
                    ("met" if trips <= 2 else "MISSED") + f" (+{extra:.0f} µs over uncached)",
                )
            )
    return rows


def strict_costs(by_name: dict[str, float], databases: list[str]) -> list[tuple[str, str, str]]:
    """Issue 16: a commit's cost with ``DECLCACHE_CONSISTENCY=strict`` beside the default's."""
    rows = []
    for db in databases:
        strict = by_name.get(f"update+commit {db} listeners, redis strict")
        default = by_name.get(f"update+commit {db} listeners, redis")
        plain = by_name.get(f"update+commit {db} no listeners")
        if strict is None or default is None:
            continue
        medians = f"strict {strict:.0f} µs, default {default:.0f} µs"
        medians += "" if plain is None else f", no listeners {plain:.0f} µs"
        rows.append(
            (
                f"update+commit strict / default, redis {db}",
                f"{strict / default:.2f}x",
                medians + f"; +{strict - default:.0f} µs per commit",
            )
        )
    return rows


def print_strict_costs(rows: list[tuple[str, str, str]]) -> None:
    if rows:
        print("\nIssue 16: commit cost, strict against default consistency (ratios of medians):\n")
        width = max(len(row[0]) for row in rows)
        for label, value, medians in rows:
            print(f"  {label:<{width}}  {value:>8}  ({medians})")


def plot(cases: list[Case], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [case for case in cases if case.samples]
    colors = {
        "uncached": "#999999",
        "floor": "#2ca02c",
        "declcache hit": "#1f77b4",
        "declcache miss": "#aec7e8",
        "peer hit": "#ff7f0e",
        "100 rows": "#9467bd",
        "write": "#8c564b",
        "layers": "#17becf",
        "collections": "#bcbd22",
        "20 parents": "#e377c2",
    }
    figure, axes = plt.subplots(figsize=(10, 0.28 * len(shown) + 1.5))
    names = [case.name for case in shown]
    axes.barh(
        names,
        [median_us(case) for case in shown],
        color=[colors.get(case.section, "#333333") for case in shown],
    )
    axes.set_xscale("log")
    axes.invert_yaxis()
    axes.set_xlabel("median µs per operation (log scale)")
    axes.set_title(title, fontsize=9)
    axes.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    _cases.setup_listeners()
    backends = []
    notes: list[str] = []
    for backend in options.backends:
        if _env.backend_available(backend):
            backends.append(backend)
        else:
            notes.append(f"{backend} skipped: server unreachable")
    databases = _env.Databases.create(options.databases)
    notes.extend(databases.notes)
    options.databases = list(databases.urls)
    stack = Stack(run_prefix=f"declbench{secrets.token_hex(4)}:", databases=databases)
    stack.first_db = next(iter(databases.urls), "sqlite")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        if options.profile:
            _profile.profile(stack)
            return 0
        return run(stack, backends, options, loop, notes)
    finally:
        stack.dispose(loop)
        if stack.redis_used:
            _env.delete_redis_keys(stack.run_prefix)
        databases.close()


def _peer_available() -> str | None:
    try:
        import advanced_alchemy.cache  # noqa: F401
        import dogpile.cache  # noqa: F401
    except ImportError as error:
        return f"advanced-alchemy skipped: {error} (pip install -e '.[bench]')"
    return None


def run(
    stack: Stack,
    backends: list[str],
    options: argparse.Namespace,
    loop: asyncio.AbstractEventLoop,
    notes: list[str],
) -> int:
    started = time.perf_counter()
    first_db = options.databases[0]
    cases = build_cases(stack, backends, options, notes)
    print(f"{len(cases)} cases, {options.rounds} rounds x {options.ops} ops", file=sys.stderr)
    measure(cases, options, loop)
    extras: dict[str, Any] = {}
    if not options.no_extras:
        stampede_db = "postgresql" if "postgresql" in options.databases else first_db
        for backend in [name for name in ("memory", "redis") if name in backends]:
            extras[f"stampede {backend} {stampede_db}"] = stampede(
                stack, backend, stampede_db, loop
            )
        if "redis" in backends:
            extras[f"near cache under writes {first_db}"] = _cases.mixed_workload(stack, first_db)
            extras[f"stampede two processes {stampede_db}"] = two_process_stampede(
                stack, stampede_db
            )
            extras["loop lag"] = loop_lag(stack, first_db, loop, 2000)
    elapsed = time.perf_counter() - started
    report(cases, extras, options, notes, elapsed)
    return 0


def build_cases(
    stack: Stack, backends: list[str], options: argparse.Namespace, notes: list[str]
) -> list[Case]:
    first_db = options.databases[0]
    cases: list[Case] = []
    for db in options.databases:
        cases += _cases.uncached_cases(stack, db)
        cases += _cases.bypass_cases(stack, db)
        cases += _relationships.uncached_cases(stack, db)
    rows = _profile._rows(stack, first_db)
    floors = [_cases.floor_case(stack, backend, rows) for backend in backends]
    cases += floors
    cases += [_cases.floor_in_session_case(stack, floor) for floor in floors]
    for backend in [*backends, *([_env.NEAR] if "redis" in backends else [])]:
        for db in options.databases:
            cases += _cases.hit_cases(stack, backend, db)
    cases += _issue17.suite_cases(stack, backends, floors, options.databases)
    for backend in backends:
        for db in options.databases:
            cases += _relationships.cached_cases(stack, backend, db)
    peer_problem = None if not options.no_peer else "advanced-alchemy skipped: --no-peer"
    peer_problem = peer_problem or _peer_available()
    if peer_problem is None:
        for backend in backends:
            for db in options.databases:
                cases += _cases.peer_cases(stack, backend, db)
    else:
        notes.append(peer_problem)
    batch_backend = "redis" if "redis" in backends else backends[0]
    for db in options.databases:
        if batch_backend == "redis":
            cases.append(_cases.miss_case(stack, "redis", db))
        cases += _cases.batch_cases(stack, batch_backend, db)
        cases += _cases.write_cases(stack, "memory", db)
        if "redis" in backends:
            cases += _cases.write_cases(stack, "redis", db)[1:]
            cases.append(_cases.strict_write_case(stack, "redis", db))
    return _dedupe(cases)


def _dedupe(cases: list[Case]) -> list[Case]:
    seen: dict[str, Case] = {}
    for case in cases:
        seen.setdefault(case.name, case)
    return list(seen.values())


def report(
    cases: list[Case],
    extras: dict[str, Any],
    options: argparse.Namespace,
    notes: list[str],
    elapsed: float,
) -> None:
    by_name = {case.name: median_us(case) for case in cases if case.samples}
    about = machine()
    print(f"\ndeclcache benchmark — {about}")
    print(f"{_env.ROWS} rows, random ids, every read in a fresh session; medians in µs\n")
    print(table(cases))
    print("\nTargets of issue 8 (ratios of medians measured above):\n")
    rows = targets(by_name, options, cases)
    width = max((len(row[0]) for row in rows), default=10)
    for label, value, verdict in rows:
        print(f"  {label:<{width}}  {value:>8}  {verdict}")
    compared = _relationships.comparisons(by_name, options.databases, options.backends)
    if compared:
        print("\nIssue 15: cached reads against the same reads uncached (ratios of medians):\n")
        width = max(len(row[0]) for row in compared)
        for label, value, medians in compared:
            print(f"  {label:<{width}}  {value:>8}  ({medians})")
    strict = strict_costs(by_name, options.databases)
    print_strict_costs(strict)
    issue17 = _issue17.read_targets(by_name, "back to back")
    _issue17.print_rows(
        "Targets of issue 17, back to back (python -m bench lockstep: both modes):", issue17
    )
    for name, value in extras.items():
        if name.startswith("near cache"):
            print(f"\n  {name}: reads of random ids, 1 committed update by another manager")
            for backend, result in value.items():
                near = result["near_hit_ratio"]
                print(
                    f"    {backend:<11} median read {result['median_us']:6.1f} µs, cache hit "
                    f"ratio {result['hit_ratio']:.3f}"
                    + ("" if near is None else f", near-cache hit ratio {near:.3f}")
                    + f", stale reads {result['stale']} of {result['reads']}"
                    f" ({result['writes']} writes)"
                )
        elif name.startswith("stampede two processes"):
            print(
                f"\n  {name} (Redis, 2 x 25 threads, one cold key) -> SELECTs per trial: "
                + ", ".join(f"{label} {counts}" for label, counts in value.items())
                + " (target with distributed_lock: 1)"
            )
        elif name.startswith("stampede"):
            print(
                f"\n  {name}: 50 concurrent reads of one cold key -> SELECTs per trial: "
                f"threads {value['threads']}, asyncio {value['async']} (target: 1)"
            )
        else:
            print(f"\n  loop lag, {value['reads']} cached async reads on Redis, concurrency 50:")
            for variant in ("default", "gc.freeze()"):
                measured = value[variant]
                verdict = "met" if max(m[0] for m in measured) < 5 else "MISSED"
                print(
                    f"    {variant:<12} max lag {[round(m[0], 1) for m in measured]} ms, "
                    f"p99 {[round(m[1], 1) for m in measured]} ms, "
                    f"{statistics.median(m[2] for m in measured):.0f} reads/s "
                    f"(target: max < 5 ms) {verdict}"
                )
    for note in notes:
        print(f"\n  note: {note}")
    print(f"\n  run took {elapsed:.0f} s")
    results: Path = options.results
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {
        "machine": about,
        "medians_us": by_name,
        "targets": rows,
        "issue 15": compared,
        "issue 16": strict,
        "issue 17": issue17,
        "extras": extras,
        "notes": notes,
    }
    (results / f"bench-{stamp}.json").write_text(json.dumps(payload, indent=2))
    if not options.no_plot:
        path = results / f"bench-{stamp}.png"
        plot(cases, path, f"declcache benchmark\n{about}")
        print(f"  plot: {path}")
