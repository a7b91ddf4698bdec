"""Issue 17's cases and targets, shared by the back-to-back suite and the lock-step mode.

Two cases the earlier suites lacked: the memory floor inside a fresh ``AsyncSession`` (the
async floor), and the first read of a row after a fill on Redis with the near cache. Then
:func:`read_targets` turns the medians of either mode into the rows of the issue's "Targets"
list, each with its ratio and verdict; the targets that are not ratios of timed cases (SELECTs
after a commit, ``get_many`` overlap, loop lag, round trips) are measured by
:mod:`bench._experiments` and reported by the lock-step mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench import _cases, _env
from bench._cases import AccountRepository, Case
from bench._env import Account

if TYPE_CHECKING:
    from bench._cases import Stack

#: ``(target, measured, verdict)``; verdict "met" or "not met", and what it was measured on.
Row = tuple[str, str, str]

#: Names of the cases the targets read, as the suite and the lock-step workers name them.
DB = "sqlite"
MEMORY_HIT = f"repo.get memory {DB} sync"
ASYNC_MEMORY_HIT = f"repo.get memory {DB} async"
MEMORY_FLOOR = "dogpile region.get memory"
ASYNC_FLOOR = "dogpile region.get memory + fresh AsyncSession"
PEER_MEMORY_HIT = f"advanced-alchemy get memory {DB} sync"
NEAR_HIT = f"repo.get {_env.NEAR} {DB} sync"
NEAR_FIRST_READ = f"repo.get {_env.NEAR} {DB} sync, first read after a fill"
WRITE_DB = "postgresql"


def session_floor(backend: str) -> str:
    """The name of ``backend``'s floor in a fresh session (same process)."""
    return f"dogpile region.get {backend} + fresh session"


def hit(backend: str) -> str:
    return f"repo.get {backend} {DB} sync"


def peer_hit(backend: str) -> str:
    return f"advanced-alchemy get {backend} {DB} sync"


def write(db: str, backend: str | None) -> str:
    """``update+commit`` of one row: with the listeners on ``backend``, or without any."""
    return (
        f"update+commit {db} no listeners"
        if backend is None
        else (f"update+commit {db} listeners, {backend}")
    )


# -- cases ----------------------------------------------------------------------------------------


def floor_in_async_session_case(stack: Stack, floor: Case) -> Case:
    """The floor inside a fresh ``AsyncSession``, opened and closed: the async hit's floor."""
    sessions = stack.async_sessions(stack.first_db)
    read = floor.run
    assert read is not None

    async def arun(ident: int) -> None:
        async with sessions():
            read(ident)

    return Case("layers", f"{floor.name} + fresh AsyncSession", arun=arun)


def near_first_read_case(stack: Stack, db: str) -> Case:
    """Redis with the near cache: the first read of a row after this process filled it.

    Untimed before each read: the row is invalidated, then read once (a miss, which fills
    Redis). The timed read is the next one, which a fill that seeds the in-process layer
    answers from memory and one that does not sends to Redis.
    """
    manager = stack.manager(_env.NEAR, f"near-fill-{db}")
    sessions = stack.sessions(db, manager)
    _cases.warm(sessions)

    def read(ident: int) -> None:
        with sessions() as session:
            AccountRepository(session=session).get(ident)

    def refill(ident: int) -> None:
        manager.invalidate(Account, ident)
        read(ident)

    return Case(
        "declcache hit",
        f"repo.get {_env.NEAR} {db} sync, first read after a fill",
        run=read,
        before=refill,
    )


def suite_cases(
    stack: Stack, backends: list[str], floors: list[Case], databases: list[str]
) -> list[Case]:
    """What ``python -m bench`` adds for issue 17: the async floor, the near cache's first
    read after a fill, and one-row writes with the listeners on Memcached."""
    cases = []
    if "memory" in backends:
        cases.append(floor_in_async_session_case(stack, floors[backends.index("memory")]))
    if "redis" in backends:
        cases.append(near_first_read_case(stack, stack.first_db))
    if "memcached" in backends:
        for db in databases:
            cases.append(_cases.write_cases(stack, "memcached", db)[1])
    return cases


# -- targets --------------------------------------------------------------------------------------


def _verdict(value: float, limit: float, *, at_least: bool = False) -> str:
    return "met" if (value >= limit if at_least else value <= limit) else "not met"


def read_targets(by_name: dict[str, float], mode: str) -> list[Row]:
    """The timed targets of issue 17 that ``by_name`` (medians in µs) can answer.

    ``mode`` ("lock-step", "back to back") is named in each row, since the memory targets
    must hold in both.
    """
    rows: list[Row] = []

    def ratio(label: str, num: str, den: str, limit: float, *, at_least: bool = False) -> None:
        if num not in by_name or den not in by_name:
            rows.append((f"{label}, {mode}", "n/a", f"not measured ({num} / {den})"))
            return
        value = by_name[num] / by_name[den]
        sign = "≥" if at_least else "≤"
        rows.append(
            (
                f"{label} ({sign} {limit:g}x), {mode}",
                f"{value:.2f}x",
                f"{_verdict(value, limit, at_least=at_least)} "
                f"({by_name[num]:.1f} / {by_name[den]:.1f} µs)",
            )
        )

    ratio("memory hit / floor in a fresh session", MEMORY_HIT, session_floor("memory"), 1.15)
    ratio("advanced-alchemy memory hit / ours", PEER_MEMORY_HIT, MEMORY_HIT, 1.5, at_least=True)
    ratio("async memory hit / async floor", ASYNC_MEMORY_HIT, ASYNC_FLOOR, 1.2)
    for backend in ("redis", "memcached"):
        ratio(
            f"{backend} hit / floor in a fresh session", hit(backend), session_floor(backend), 1.05
        )
    ratio("near cache redis hit / memory hit", NEAR_HIT, MEMORY_HIT, 1.2)
    ratio("near cache first read after a fill / memory hit", NEAR_FIRST_READ, MEMORY_HIT, 1.2)
    for backend in ("redis", "memcached"):
        plain, cached = write(WRITE_DB, None), write(WRITE_DB, backend)
        if plain in by_name and cached in by_name:
            overhead = by_name[cached] / by_name[plain] - 1
            rows.append(
                (
                    f"write overhead, {backend} on {WRITE_DB} (≤ 10 %), {mode}",
                    f"{overhead * 100:+.1f} %",
                    f"{_verdict(overhead, 0.10)} ({by_name[cached]:.0f} / {by_name[plain]:.0f} µs)",
                )
            )
        else:
            rows.append((f"write overhead, {backend} on {WRITE_DB}, {mode}", "n/a", "not measured"))
    return rows


def print_rows(title: str, rows: list[Row]) -> None:
    if not rows:
        return
    print(f"\n{title}\n")
    width = max(len(row[0]) for row in rows)
    for label, value, verdict in rows:
        print(f"  {label:<{width}}  {value:>9}  {verdict}")
