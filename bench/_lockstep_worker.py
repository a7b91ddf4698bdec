"""One worker of the lock-step mode: declcache's cases, or advanced-alchemy's, in a process.

Run by :mod:`bench._lockstep` as ``python -m bench._lockstep_worker OPTIONS_JSON``. It builds
and warms its cases, prints ``ready`` and the case names as JSON, then answers commands on
stdin, one a line, until ``dump``:

``r CASE IDENT KEEP``
    one read of case number ``CASE`` (its ``before`` untimed first), timed alone; kept when
    ``KEEP`` is 1. Answers ``.``.
``c CASE COUNT SEED``
    ``COUNT`` reads of random ids back to back (the back-to-back mode), kept apart. ``.``.
``gc``
    ``gc.collect()``. ``.``.
``dump [PREFIX]``
    the samples (ns) and SELECT counts of both modes, as one line of JSON; then it exits.

With ``profile`` (a case name) in its options, the kept reads of that case run under
cProfile, one profile per mode, written at ``dump PREFIX`` as ``PREFIX-<mode>.pstats`` (that
case's times then include the profiler's overhead).

Anything else it prints goes to stderr: stdout carries the protocol only.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import json
import random
import sys
import time
from typing import Any

from bench import _cases, _env, _issue17, _profile
from bench._cases import Case, Stack

LOCKSTEP, BACK_TO_BACK = "lock-step", "back to back"


def declcache_cases(stack: Stack, backends: list[str], write_db: str | None) -> list[Case]:
    """Hits and their floors (raw, in a fresh session, in a fresh AsyncSession), the near
    cache's hit and first read after a fill, and one-row writes with and without listeners."""
    rows = _profile._rows(stack, _issue17.DB)
    cases: list[Case] = []
    for backend in backends:
        floor = _cases.floor_case(stack, backend, rows)
        cases += [floor, _cases.floor_in_session_case(stack, floor)]
        hits = _cases.hit_cases(stack, backend, _issue17.DB, layers=False)
        if backend == "memory":
            cases.append(_issue17.floor_in_async_session_case(stack, floor))
            cases += hits
        else:
            cases.append(hits[0])
    if "redis" in backends:
        cases.append(_cases.hit_cases(stack, _env.NEAR, _issue17.DB, layers=False)[0])
        cases.append(_issue17.near_first_read_case(stack, _issue17.DB))
    if write_db is not None:
        cases.append(_cases.write_cases(stack, "memory", write_db)[0])
        for backend in [name for name in backends if name != "memory"]:
            cases.append(_cases.write_cases(stack, backend, write_db)[1])
    return cases


def peer_cases(stack: Stack, backends: list[str]) -> list[Case]:
    """advanced-alchemy's cached ``get``: sync on each backend, async on memory."""
    cases: list[Case] = []
    for backend in backends:
        sync, asynchronous = _cases.peer_cases(stack, backend, _issue17.DB)
        cases += [sync, asynchronous] if backend == "memory" else [sync]
    return cases


class Worker:
    """The cases of one process and the samples of both modes."""

    def __init__(
        self, cases: list[Case], loop: asyncio.AbstractEventLoop, profiled: str | None = None
    ) -> None:
        self.cases = cases
        self.loop = loop
        self.profiled = profiled
        self.profiles = {mode: cProfile.Profile() for mode in (LOCKSTEP, BACK_TO_BACK)}
        self.samples: dict[str, dict[str, list[int]]] = {
            mode: {case.name: [] for case in cases} for mode in (LOCKSTEP, BACK_TO_BACK)
        }
        self.queries: dict[str, dict[str, int]] = {
            mode: dict.fromkeys(self.samples[mode], 0) for mode in self.samples
        }

    def read(self, case: Case, ident: int, mode: str | None = None) -> tuple[int, int]:
        """One read: its time (ns, ``before`` excluded) and the SELECTs it sent."""
        if case.before is not None:
            case.before(ident)
        profile = self.profiles[mode] if mode and case.name == self.profiled else None
        if profile is not None:
            profile.enable()
        selects = _cases.SELECTS[0]
        if case.run is not None:
            clock, run = time.perf_counter_ns, case.run
            started = clock()
            run(ident)
            elapsed = clock() - started
        else:
            elapsed = self.loop.run_until_complete(_timed(case, ident))
        if profile is not None:
            profile.disable()
        return elapsed, _cases.SELECTS[0] - selects

    def keep(self, mode: str, case: Case, elapsed: int, selects: int) -> None:
        self.samples[mode][case.name].append(elapsed)
        self.queries[mode][case.name] += selects

    def write_profiles(self, prefix: str | None) -> None:
        if prefix is None or self.profiled not in {case.name for case in self.cases}:
            return
        for mode, profile in self.profiles.items():
            profile.dump_stats(f"{prefix}-{mode.replace(' ', '-')}.pstats")

    def serve(self) -> None:
        commands, out = sys.stdin.buffer, sys.stdout.buffer
        for line in commands:
            word, *rest = line.split()
            if word == b"r":
                case = self.cases[int(rest[0])]
                keep = rest[2] == b"1"
                elapsed, selects = self.read(case, int(rest[1]), LOCKSTEP if keep else None)
                if keep:
                    self.keep(LOCKSTEP, case, elapsed, selects)
            elif word == b"c":
                case = self.cases[int(rest[0])]
                rng = random.Random(int(rest[2]))
                for _ in range(int(rest[1])):
                    found = self.read(case, rng.randint(1, _env.ROWS), BACK_TO_BACK)
                    self.keep(BACK_TO_BACK, case, *found)
            elif word == b"gc":
                gc.collect()
            elif word == b"dump":
                self.write_profiles(rest[0].decode() if rest else None)
                out.write(json.dumps({"samples": self.samples, "queries": self.queries}).encode())
                out.write(b"\n")
                out.flush()
                return
            else:
                raise ValueError(f"unknown command {line!r}")
            out.write(b".\n")
            out.flush()


async def _timed(case: Case, ident: int) -> int:
    arun = case.arun
    assert arun is not None
    started = time.perf_counter_ns()
    await arun(ident)
    return time.perf_counter_ns() - started


def main(options: dict[str, Any]) -> None:
    databases = _env.Databases(urls={name: tuple(urls) for name, urls in options["urls"].items()})
    stack = Stack(run_prefix=options["prefix"], databases=databases)
    stack.first_db = _issue17.DB
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        if options["role"] == "declcache":
            _cases.setup_listeners()
            cases = declcache_cases(stack, options["backends"], options["write_db"])
        else:  # the peer's process carries none of declcache's listeners
            cases = peer_cases(stack, options["backends"])
        worker = Worker(cases, loop, options.get("profile"))
        for case in cases:  # connections, first-time imports: not timed
            for ident in range(1, 21):
                worker.read(case, ident)
        sys.stdout.buffer.write(b"ready " + json.dumps([c.name for c in cases]).encode() + b"\n")
        sys.stdout.buffer.flush()
        worker.serve()
    finally:
        stack.dispose(loop)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
