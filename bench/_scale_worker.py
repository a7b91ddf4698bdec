"""The processes of ``python -m bench scale``: ``python -m bench._scale_worker KIND OPTIONS_JSON``.

``hits``
    Fills each backend with the rows of the database up to each size in turn (loaded from the
    database, stored with ``CacheManager.set_many``), and after each size times hits of random
    ids among the entries held, the backends in a shuffled order in each of ``rounds``
    rounds: ``repo.get`` in a fresh session, and the backend's own client reading the entry's
    raw bytes (Redis, Memcached). Reports what the entries take: Redis's ``used_memory`` and
    Memcached's ``bytes`` (both asked of the server), or for the memory backend the bytes
    ``tracemalloc`` sees this process keep while it fills.
``reads``
    Reads random cached ids, each ``repo.get`` in a fresh session, from ``start`` to ``end``
    (wall-clock times it is given in the ``go`` file), and reports how many it made.

Each prints one line of JSON on stdout.
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, select
from sqlalchemy.orm import sessionmaker

from bench._cases import SESSION_OPTIONS, AccountRepository
from bench._env import Account
from declcache import CacheConfig, CacheManager, setup_cache_listeners

#: Rows loaded and stored per ``set_many`` call while filling.
CHUNK = 10_000


def _manager(options: dict[str, Any]) -> CacheManager:
    config: dict[str, Any] = {"key_prefix": options["prefix"], "expiration_time": 3600}
    if options.get("url"):
        config["url"] = options["url"]
    else:
        config["backend"], config["arguments"] = options["backend"], options["arguments"]
    if options.get("memory_max_entries"):
        config["memory_max_entries"] = options["memory_max_entries"]
    return CacheManager(CacheConfig(**config))


def _counted_engine(url: str) -> tuple[Any, list[int]]:
    engine = create_engine(url)
    selects = [0]

    def seen(*args: Any) -> None:
        if args[2].lstrip().upper().startswith("SELECT") and "bench_accounts" in args[2]:
            selects[0] += 1

    event.listen(engine, "before_cursor_execute", seen)
    return engine, selects


def _server_memory(kind: str, address: tuple[str, int]) -> tuple[int, int]:
    """``(bytes, entries)`` the server reports holding."""
    if kind == "redis":
        import redis

        client = redis.Redis(*address)
        try:
            return int(client.info("memory")["used_memory"]), int(client.dbsize())
        finally:
            client.close()
    from pymemcache.client.base import Client

    memcached = Client(address)
    try:
        stats = memcached.stats()
        return int(stats[b"bytes"]), int(stats[b"curr_items"])
    finally:
        memcached.close()


def _raw_reader(kind: str, address: tuple[str, int]) -> Any:
    """The backend's own client's ``get`` of one key's bytes."""
    if kind == "redis":
        import redis

        return redis.Redis(*address).get
    from pymemcache.client.base import Client

    return Client(address).get


def _us(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": statistics.median(ordered) / 1000,
        "p90_us": ordered[int(len(ordered) * 0.9)] / 1000,
    }


def _fill(
    manager: CacheManager, loading: sessionmaker[Any], first: int, last: int, *, traced: bool
) -> tuple[int, int]:
    """Rows ``first`` to ``last`` into the cache; ``(stored, bytes tracemalloc saw kept)``."""
    if traced:
        gc.collect()
        tracemalloc.start()
    stored = 0
    for start in range(first, last + 1, CHUNK):
        with loading() as session:
            batch = session.scalars(
                select(Account).where(Account.id.between(start, min(last, start + CHUNK - 1)))
            ).all()
            stored += manager.set_many(Account, batch)
    kept = 0
    if traced:
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    return stored, kept


class Target:
    """One backend of the ``hits`` worker: its manager, sessions, raw client and memory."""

    def __init__(self, spec: dict[str, Any], engine: Any) -> None:
        self.kind = spec["kind"]
        self.address = tuple(spec["address"]) if spec.get("address") else None
        self.manager = _manager(spec)
        self.sessions = sessionmaker(
            bind=engine, info={"cache_manager": self.manager}, **SESSION_OPTIONS
        )
        cache = self.manager._cache(Account)
        assert cache is not None
        self.keys = cache.keys
        self.raw_get = None if self.address is None else _raw_reader(self.kind, self.address)
        self.base = 0 if self.address is None else _server_memory(self.kind, self.address)[0]
        self.traced = 0
        self.samples: list[int] = []
        self.raw: list[int] = []

    def read(self, ident: int) -> Account:
        with self.sessions() as session:
            return AccountRepository(session=session).get(ident)

    def held(self) -> tuple[int, int]:
        """``(bytes, entries)`` the entries take: traced here, or as the server says."""
        if self.address is None:
            return self.traced, -1
        used, entries = _server_memory(self.kind, self.address)
        return used - self.base, entries


def hits(options: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every backend filled to each size, then their hits timed in interleaved rounds."""
    setup_cache_listeners()
    engine, selects = _counted_engine(options["db"])
    targets = [Target(spec, engine) for spec in options["targets"]]
    rng = random.Random(6)
    filled = 0
    results: dict[str, list[dict[str, Any]]] = {target.kind: [] for target in targets}
    for size in options["sizes"]:
        filling = {}
        for target in targets:
            started = time.perf_counter()
            stored, kept = _fill(
                target.manager,
                sessionmaker(bind=engine),
                filled + 1,
                size,
                traced=target.kind == "memory",
            )
            target.traced += kept
            filling[target.kind] = (stored, time.perf_counter() - started)
        filled = size
        ids = [rng.randint(1, size) for _ in range(options["reads"])]
        for target in targets:
            target.samples, target.raw = [], []
            for ident in ids[:200]:  # connections, first-time work: not timed
                target.read(ident)
        before = selects[0]
        rounds = options["rounds"]
        for round_ in range(rounds):
            chunk = ids[round_::rounds]
            for target in rng.sample(targets, len(targets)):
                gc.collect()
                target.samples += _timed(target.read, chunk)
                if target.raw_get is not None:
                    keys = [target.keys.of_ident(ident)[1] for ident in chunk]
                    target.raw += _timed(target.raw_get, keys)
        selects_per_read = (selects[0] - before) / (len(ids) * len(targets))
        for target in targets:
            held, entries = target.held()
            stored, seconds = filling[target.kind]
            results[target.kind].append(
                {
                    "entries": size,
                    "stored_now": stored,
                    "fill_seconds": round(seconds, 1),
                    "memory_bytes": held,
                    "server_items": entries,
                    "bytes_per_entry": held / size,
                    "hit": _us(target.samples),
                    "raw_get": _us(target.raw) if target.raw else None,
                    "selects_per_read": selects_per_read,
                }
            )
        print(f"  {size} entries done", file=sys.stderr)
    for target in targets:
        target.manager.close()
    engine.dispose()
    return results


def _timed(call: Any, arguments: list[Any]) -> list[int]:
    """``call(argument)`` for each, timed alone (ns); a call that finds nothing fails."""
    clock, samples = time.perf_counter_ns, []
    for argument in arguments:
        begun = clock()
        found = call(argument)
        samples.append(clock() - begun)
        if found is None:
            raise LookupError(f"nothing cached for {argument!r}")
    return samples


def reads(options: dict[str, Any]) -> dict[str, Any]:
    setup_cache_listeners()
    manager = _manager(options)
    engine, selects = _counted_engine(options["db"])
    sessions = sessionmaker(bind=engine, info={"cache_manager": manager}, **SESSION_OPTIONS)
    rng = random.Random(options["seed"])
    keys = options["keys"]

    def read() -> None:
        with sessions() as session:
            AccountRepository(session=session).get(rng.randint(1, keys))

    for _ in range(300):  # connections to every node, first-time work
        read()
    Path(options["ready"]).touch()
    go = Path(options["go"])
    deadline = time.time() + 60
    while not go.exists():
        if time.time() > deadline:
            raise TimeoutError("never told to go")
        time.sleep(0.001)
    window = json.loads(go.read_text())  # written whole, then renamed into place
    start, end = window["start"], window["end"]
    while time.time() < start:
        time.sleep(0.0005)
    count, before = 0, selects[0]
    while time.time() < end:
        read()
        count += 1
    manager.close()
    engine.dispose()
    return {"reads": count, "selects": selects[0] - before}


if __name__ == "__main__":
    kind, options = sys.argv[1], json.loads(sys.argv[2])
    worker = {"hits": hits, "reads": reads}[kind]
    print(json.dumps(worker(options)))
