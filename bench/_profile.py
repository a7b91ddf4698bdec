"""``python -m bench --profile``: where the microseconds of a memory-backend hit go.

Two views of the sync ``repo.get`` hit on the memory backend: cProfile of 5,000 reads (and of
the floor, for contrast), then each step of the hit path timed alone, in a loop, as the median
of several repeats. The steps reach into declcache's private modules on purpose: they name
the code a change would touch. A step the current code no longer has is reported, not fatal.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from typing import TYPE_CHECKING, Any

from bench import _cases, _env

if TYPE_CHECKING:
    from collections.abc import Callable

    from bench._cases import Stack


def _per_call_us(step: Callable[[int], Any], calls: int = 5_000, repeats: int = 5) -> float:
    results = []
    for _ in range(repeats):
        started = time.perf_counter()
        for index in range(calls):
            step(index % _env.ROWS + 1)
        results.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(results)


def steps(stack: Stack, db: str) -> list[tuple[str, Callable[[int], Any] | None]]:
    """The hit path cut into the steps it runs, each callable on its own."""
    import json

    from declcache import _payload

    manager = stack.manager("memory", f"steps-{db}")
    sessions = stack.sessions(db, manager)
    _cases.warm(sessions)
    cache = manager._cache(_env.Account)
    assert cache is not None
    keys = {i: cache.keys.of_ident(i)[1] for i in range(1, _env.ROWS + 1)}
    raws = {i: cache.store.get_many([cache.keys.generation_key, keys[i]]) for i in keys}
    generation = cache.payloads.token(raws[1][0])
    assert generation is not None
    payloads = {i: _payload.unwrap(raws[i][1])[1] for i in keys}
    entries = {i: cache.current(raws[i][1], generation) for i in keys}
    bodies = {i: entry.body for i, entry in entries.items() if entry is not None}
    rows = {i: cache.codec.decode_row(bodies[i]) for i in keys}
    session = sessions()
    repository = _cases.AccountRepository(session=session)

    def fresh_session(_i: int) -> None:
        with sessions():
            pass

    def joined(i: int) -> None:
        with sessions() as fresh:
            cache.instances([rows[i]], fresh)

    return [
        ("fresh Session() + close", fresh_session),
        ("AccountRepository(session=...)", lambda _i: _cases.AccountRepository(session=session)),
        ("repo._cache_for (is_cached + _is_writing)", lambda _i: repository._cache_for(True)),
        ("repo._held (identity-map probe)", repository._held),
        ("cache.keys.of_ident (normalise + quote)", cache.keys.of_ident),
        (
            "store.get_many([generation, key])",
            lambda i: cache.store.get_many([cache.keys.generation_key, keys[i]]),
        ),
        (
            "payloads.token (remembered generation token)",
            lambda i: cache.payloads.token(raws[i][0]),
        ),
        (
            "  unwrap + decode (what a new token costs)",
            lambda i: _payload.unwrap(raws[i][0])[1].decode(),
        ),
        (
            "cache.current (remembered payload + checks)",
            lambda i: cache.current(raws[i][1], generation),
        ),
        ("  unwrap (what a new payload costs…)", lambda i: _payload.unwrap(raws[i][1])),
        ("  json.loads(payload) (…and this)", lambda i: json.loads(payloads[i])),
        ("  codec.decode_row (…and this)", lambda i: cache.codec.decode_row(bodies[i])),
        ("codec.build (detached instance of a decoded row)", lambda i: cache.codec.build(rows[i])),
        ("cache.owns (key re-check of the row)", lambda i: cache.owns(rows[i], keys[i])),
        ("fresh Session() + cache.instances (joins the session)", joined),
        ("counters.add (locked)", lambda _i: cache.counters.add("hits", 0)),
        ("manager.probe (all of the manager)", lambda i: manager.probe(_env.Account, [i])),
        (
            "repo.get in a fresh session (the whole hit)",
            _cases.hit_cases(stack, "memory", db)[0].run,
        ),
    ]


def profile(stack: Stack) -> None:
    db = stack.first_db
    rows = _rows(stack, db)
    print("== each step of a memory-backend sync hit, timed alone (µs per call) ==")
    for label, step in steps(stack, db):
        assert step is not None
        try:
            print(f"  {label:<52} {_per_call_us(step):8.2f}")
        except Exception as error:  # a step the code no longer has
            print(f"  {label:<52} n/a ({error!r})")
    hit = _cases.hit_cases(stack, "memory", db)[0]
    floor = _cases.floor_case(stack, "memory", rows)
    for label, run in (("declcache memory hit", hit.run), ("memory floor", floor.run)):
        assert run is not None
        for ident in range(1, _env.ROWS + 1):
            run(ident)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(5):
            for ident in range(1, _env.ROWS + 1):
                run(ident)
        profiler.disable()
        print(f"\n== cProfile, {label}: 5,000 reads ==")
        stats = pstats.Stats(profiler).strip_dirs()
        stats.sort_stats("tottime").print_stats(20)
        stats.sort_stats("cumulative").print_stats(30)


def _rows(stack: Stack, db: str) -> list[_env.Account]:
    with stack.sessions(db)() as session:
        return list(session.query(_env.Account).order_by(_env.Account.id))
