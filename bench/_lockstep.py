"""``python -m bench lockstep`` (or ``cold``): declcache and advanced-alchemy side by side.

Each library runs in a worker process of its own (:mod:`bench._lockstep_worker`), and this
process drives both, one read at a time: a step sends one read of a random id to every case
of the round, in an order shuffled each round, and waits for each answer before sending the
next. Between two reads of a case, both processes run the other cases' reads, so neither
keeps a case's code and data hot: the noise of the machine and the state of its CPU caches
fall on both alike, as an application doing other work between two reads would see. Each
read is timed alone inside its worker (the pipe is not timed).

The same workers then run each read case back to back (``--ops`` reads in a row, the cases in
a shuffled order), as ``python -m bench`` does, so that the targets that must hold "in both
modes" get both figures from one run. Every run starts a fresh pair of workers; the figures
are the medians of all samples of ``--runs`` x ``--rounds`` x ``--ops`` reads, and the ratios
to advanced-alchemy are also given per run.

After the runs, the targets of issue 17 that are not timings are measured here: SELECTs of
natural-key reads after a commit, queries per missing id of overlapping ``get_many`` calls,
event-loop lag under 2,000 concurrent cached reads, backend round trips per commit.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench import _env, _experiments, _issue17
from bench._lockstep_worker import BACK_TO_BACK, LOCKSTEP
from bench.suite import RESULTS, machine

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("memory", "redis", "memcached")
MODES = (LOCKSTEP, BACK_TO_BACK)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench lockstep", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="2 runs x 2 rounds x 100 reads")
    parser.add_argument(
        "--runs", type=int, help="fresh worker pairs (default 6, quick 2; 0: experiments only)"
    )
    parser.add_argument("--rounds", type=int, help="rounds per run (default 6, quick 2)")
    parser.add_argument("--ops", type=int, help="reads per case per round (400, quick 100)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    parser.add_argument("--no-peer", action="store_true", help="skip advanced-alchemy")
    parser.add_argument("--no-writes", action="store_true", help="skip the PostgreSQL writes")
    parser.add_argument("--no-back-to-back", action="store_true", help="skip the back-to-back pass")
    parser.add_argument(
        "--no-experiments", action="store_true", help="skip the untimed targets after the runs"
    )
    parser.add_argument(
        "--loop-reads", type=int, default=2000, help="concurrent reads of the loop-lag target"
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const=_issue17.MEMORY_HIT,
        help="cProfile one case in both modes (default: the memory hit); its times inflate",
    )
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    options = parser.parse_args(argv)
    if options.runs is None:
        options.runs = 2 if options.quick else 6
    options.rounds = options.rounds or (2 if options.quick else 6)
    options.ops = options.ops or (100 if options.quick else 400)
    options.backends = [name for name in options.backends.split(",") if name]
    options.stamp = time.strftime("%Y%m%d-%H%M%S")
    return options


# -- the workers ----------------------------------------------------------------------------------


class WorkerProcess:
    """A :mod:`bench._lockstep_worker` process and the pipe protocol to it."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.role = options["role"]
        self._errors: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench._lockstep_worker", json.dumps(options)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._errors,
        )
        self.names: list[str] = []

    def _failure(self, what: str) -> RuntimeError:
        self._errors.seek(0)
        tail = self._errors.read().decode(errors="replace")[-3000:]
        return RuntimeError(f"{self.role} worker: {what}\n{tail}")

    def ready(self) -> list[str]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith(b"ready "):
            raise self._failure(f"did not start ({line[:200]!r})")
        self.names = json.loads(line[6:])
        return self.names

    def ask(self, command: bytes) -> None:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(command)
        stdin.flush()
        if stdout.readline() != b".\n":
            raise self._failure(f"failed on {command!r}")

    def dump(self, profile_to: Path | None = None) -> dict[str, Any]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(b"dump\n" if profile_to is None else f"dump {profile_to}\n".encode())
        stdin.flush()
        line = stdout.readline()
        if not line.strip():
            raise self._failure("no samples")
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._errors.close()


@dataclass(frozen=True)
class Slot:
    """One case of one worker: what a step sends a read to."""

    worker: WorkerProcess
    index: int
    name: str


@dataclass
class Results:
    """Samples of every case per mode, pooled over the runs, and the medians of each run."""

    samples: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    queries: dict[str, dict[str, int]] = field(default_factory=dict)
    per_run: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    def add(self, dumped: dict[str, Any]) -> None:
        for mode in MODES:
            for name, samples in dumped["samples"][mode].items():
                if not samples:
                    continue
                if name not in self.order:
                    self.order.append(name)
                self.samples.setdefault(mode, {}).setdefault(name, []).extend(samples)
                self.per_run.setdefault(mode, {}).setdefault(name, []).append(
                    statistics.median(samples) / 1000
                )
                counts = self.queries.setdefault(mode, {})
                counts[name] = counts.get(name, 0) + dumped["queries"][mode][name]

    def medians(self, mode: str) -> dict[str, float]:
        return {
            name: statistics.median(samples) / 1000
            for name, samples in self.samples.get(mode, {}).items()
        }

    def p90(self, mode: str, name: str) -> float:
        ordered = sorted(self.samples[mode][name])
        return ordered[int(len(ordered) * 0.9)] / 1000


def _start(options: argparse.Namespace, urls: dict[str, Any], prefix: str) -> list[WorkerProcess]:
    common = {
        "urls": urls,
        "backends": options.backends,
        "prefix": prefix,
        "profile": options.profile,
    }
    write_db = None if options.no_writes or "postgresql" not in urls else "postgresql"
    workers = [WorkerProcess({**common, "role": "declcache", "write_db": write_db})]
    if not options.no_peer:
        workers.append(WorkerProcess({**common, "role": "peer", "write_db": None}))
    try:
        for worker in workers:
            worker.ready()
    except BaseException:
        for worker in workers:
            worker.close()
        raise
    return workers


def one_run(
    run: int, options: argparse.Namespace, urls: dict[str, Any], prefix: str, results: Results
) -> None:
    rng = random.Random(options.seed * 1000 + run)
    workers = _start(options, urls, f"{prefix}r{run}:")
    try:
        slots = [
            Slot(worker, index, name)
            for worker in workers
            for index, name in enumerate(worker.names)
        ]
        reads = [slot for slot in slots if not slot.name.startswith("update+commit")]
        for _ in range(max(1, options.ops // 4)):  # warm-up, thrown away
            for slot in slots:
                slot.worker.ask(b"r %d %d 0\n" % (slot.index, rng.randint(1, _env.ROWS)))
        for round_ in range(options.rounds):
            for worker in workers:
                worker.ask(b"gc\n")
            order = rng.sample(slots, len(slots))
            for _ in range(options.ops):
                ident = rng.randint(1, _env.ROWS)
                for slot in order:
                    slot.worker.ask(b"r %d %d 1\n" % (slot.index, ident))
            if not options.no_back_to_back:
                for slot in rng.sample(reads, len(reads)):
                    slot.worker.ask(b"gc\n")
                    slot.worker.ask(
                        b"c %d %d %d\n" % (slot.index, options.ops, rng.randrange(2**31))
                    )
            print(
                f"  run {run + 1}/{options.runs} round {round_ + 1}/{options.rounds} done",
                file=sys.stderr,
            )
        for worker in workers:
            profile_to = None
            if options.profile:
                name = f"lockstep-profile-{options.stamp}-{worker.role}-run{run}"
                profile_to = options.results / name
            results.add(worker.dump(profile_to))
    finally:
        for worker in workers:
            worker.close()


# -- report ---------------------------------------------------------------------------------------


def table(results: Results) -> str:
    lock, b2b = results.medians(LOCKSTEP), results.medians(BACK_TO_BACK)
    width = max(len(name) for name in results.order)
    lines = [
        f"| {'case':<{width}} | lock-step µs |  p90 µs |     n | SELECT/op |"
        " back to back µs |  p90 µs |",
        f"|{'-' * (width + 2)}|-------------:|--------:|------:|----------:|"
        "----------------:|--------:|",
    ]
    for name in results.order:
        if name not in lock:
            continue
        count = len(results.samples[LOCKSTEP][name])
        selects = results.queries[LOCKSTEP][name] / count
        row = (
            f"| {name:<{width}} | {lock[name]:>12.1f} | {results.p90(LOCKSTEP, name):>7.1f} |"
            f" {count:>5} | {selects:>9.2f} |"
        )
        if name in b2b:
            row += f" {b2b[name]:>15.1f} | {results.p90(BACK_TO_BACK, name):>7.1f} |"
        else:
            row += f" {'-':>15} | {'-':>7} |"
        lines.append(row)
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f} to {max(values):.2f}x, median {statistics.median(values):.2f}x"


def issue_table(results: Results, mode: str) -> str:
    """The issue's table: each hit beside its floors and advanced-alchemy's hit."""
    by_name, per_run = results.medians(mode), results.per_run.get(mode, {})
    lines = [
        "| read | declcache µs | floor in a fresh session µs (ratio) | raw floor µs |"
        " advanced-alchemy µs (its time / ours; per run) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]

    def cell(name: str) -> str:
        return f"{by_name[name]:.1f}" if name in by_name else "-"

    def row(label: str, ours: str, floor: str | None, raw: str | None, peer: str | None) -> None:
        if ours not in by_name:
            return
        floor_cell = "-"
        if floor is not None and floor in by_name:
            floor_cell = f"{by_name[floor]:.1f} ({by_name[ours] / by_name[floor]:.2f}x)"
        peer_cell = "-"
        if peer is not None and peer in by_name:
            runs = [
                theirs / mine for theirs, mine in zip(per_run[peer], per_run[ours], strict=False)
            ]
            peer_cell = (
                f"{by_name[peer]:.1f} ({by_name[peer] / by_name[ours]:.2f}x; {_spread(runs)})"
            )
        raw_cell = "-" if raw is None else cell(raw)
        lines.append(f"| {label} | {by_name[ours]:.1f} | {floor_cell} | {raw_cell} | {peer_cell} |")

    row(
        "memory hit",
        _issue17.MEMORY_HIT,
        _issue17.session_floor("memory"),
        _issue17.MEMORY_FLOOR,
        _issue17.PEER_MEMORY_HIT,
    )
    row(
        "memory hit, async",
        _issue17.ASYNC_MEMORY_HIT,
        _issue17.ASYNC_FLOOR,
        _issue17.MEMORY_FLOOR,
        f"advanced-alchemy get memory {_issue17.DB} async",
    )
    for backend, label in (("redis", "Redis hit"), ("memcached", "Memcached hit")):
        row(
            label,
            _issue17.hit(backend),
            _issue17.session_floor(backend),
            f"dogpile region.get {backend}",
            _issue17.peer_hit(backend),
        )
    for label, name in (
        ("Redis + near cache hit (floor: our memory hit)", _issue17.NEAR_HIT),
        ("Redis + near cache, first read after a fill", _issue17.NEAR_FIRST_READ),
    ):
        row(label, name, _issue17.MEMORY_HIT, None, None)
    return "\n".join(lines)


def print_profiles(options: argparse.Namespace, results: Results) -> None:
    """The profiled case's functions by own time, per read, in each mode (all runs)."""
    import pstats

    for mode in MODES:
        files = sorted(
            str(path)
            for path in options.results.glob(
                f"lockstep-profile-{options.stamp}-*-{mode.replace(' ', '-')}.pstats"
            )
        )
        reads = len(results.samples.get(mode, {}).get(options.profile, []))
        if not files or not reads:
            continue
        stats = pstats.Stats(*files)
        total = sum(entry[2] for entry in stats.stats.values())
        print(
            f"\ncProfile of {options.profile!r}, {mode}: {total / reads * 1e6:.1f} µs of own time"
            f" per read (profiler overhead included), {reads} reads; by own time:\n"
        )
        rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])
        for (filename, line, function), (_, calls, own, cumulative, _) in rows[:15]:
            where = f"{Path(filename).name}:{line}({function})"
            print(
                f"  {own / reads * 1e6:7.2f} µs own  {cumulative / reads * 1e6:7.2f} µs cum"
                f"  {calls / reads:5.1f} calls/read  {where}"
            )


def report(
    results: Results,
    experiments: list[_issue17.Row],
    options: argparse.Namespace,
    notes: list[str],
    elapsed: float,
) -> None:
    about = machine()
    print(f"\ndeclcache lock-step benchmark — {about}")
    print(
        f"{_env.ROWS} rows, random ids, every read in a fresh session, SQLite (writes: "
        f"PostgreSQL); medians of {options.runs} runs x {options.rounds} rounds x "
        f"{options.ops} reads, in µs\n"
    )
    if results.order:
        print(table(results))
    for mode in MODES:
        if results.medians(mode):
            print(f"\nThe reads of issue 17, {mode}:\n")
            print(issue_table(results, mode))
    rows = _issue17.read_targets(results.medians(LOCKSTEP), LOCKSTEP)
    if results.medians(BACK_TO_BACK):
        rows += [
            row
            for row in _issue17.read_targets(results.medians(BACK_TO_BACK), BACK_TO_BACK)
            if not row[0].startswith("write overhead")
        ]
    rows += experiments
    _issue17.print_rows("Targets of issue 17:", rows)
    if options.profile:
        print_profiles(options, results)
    for note in notes:
        print(f"\n  note: {note}")
    print(f"\n  run took {elapsed:.0f} s")
    options.results.mkdir(parents=True, exist_ok=True)
    path = options.results / f"lockstep-{options.stamp}.json"
    payload = {
        "machine": about,
        "runs": options.runs,
        "rounds": options.rounds,
        "ops": options.ops,
        "medians_us": {mode: results.medians(mode) for mode in MODES},
        "per_run_medians_us": results.per_run,
        "targets": rows,
        "notes": notes,
    }
    path.write_text(json.dumps(payload, indent=2))
    print(f"  results: {path}")


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    options = parse(argv)
    options.results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    notes: list[str] = []
    available = []
    for backend in options.backends:
        if _env.backend_available(backend):
            available.append(backend)
        else:
            notes.append(f"{backend} skipped: server unreachable")
    options.backends = available
    if not options.no_peer:
        try:
            import advanced_alchemy.cache  # noqa: F401
        except ImportError as error:
            notes.append(f"advanced-alchemy skipped: {error} (pip install -e '.[bench]')")
            options.no_peer = True
    wanted = ["sqlite"] if options.no_writes else ["sqlite", "postgresql"]
    databases = _env.Databases.create(wanted)
    notes.extend(databases.notes)
    prefix = f"declbench{secrets.token_hex(4)}:"
    results = Results()
    experiments: list[_issue17.Row] = []
    try:
        for run in range(options.runs):
            one_run(run, options, databases.urls, prefix, results)
        if not options.no_experiments:
            experiments = _experiments.run_all(databases, prefix, options, notes)
    finally:
        if "redis" in options.backends:
            _env.delete_redis_keys(prefix)
        databases.close()
    report(results, experiments, options, notes, time.perf_counter() - started)
    return 0
