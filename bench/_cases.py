"""The timed cases: each is one operation on a random id, timed alone, in a fresh session."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dogpile.cache import make_region
from sqlalchemy import create_engine, event
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, make_transient_to_detached, sessionmaker
from sqlalchemy.orm.attributes import instance_state

from bench import _env
from bench._env import Account
from declcache import CacheConfig, CacheManager, setup_cache_listeners
from declcache.repository import SQLAlchemyAsyncRepository, SQLAlchemySyncRepository

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

SESSION_OPTIONS: dict[str, Any] = {"expire_on_commit": False}


class AccountRepository(SQLAlchemySyncRepository[Account]):
    model_type = Account


class AsyncAccountRepository(SQLAlchemyAsyncRepository[Account]):
    model_type = Account


@dataclass
class Case:
    """One timed operation. ``run(i)`` or ``arun(i)``; ``before(i)`` runs untimed first.

    A slow operation (100 rows, 20 parents) sets ``ops_divisor``: it runs ``--ops`` divided
    by it per round, so that no case dominates the run's time.
    """

    section: str
    name: str
    run: Callable[[int], Any] | None = None
    arun: Callable[[int], Awaitable[Any]] | None = None
    before: Callable[[int], Any] | None = None
    ops_divisor: int = 1
    samples: list[int] = field(default_factory=list)
    queries: int = 0
    backend_calls: list[int] = field(default_factory=list)


#: SELECTs of the benchmark tables (``bench_*``) run by every engine of the stack, so far.
SELECTS = [0]


def _count_select(*args: Any) -> None:
    statement = args[2]
    if statement.lstrip().upper().startswith("SELECT") and "bench_" in statement:
        SELECTS[0] += 1


@dataclass
class Stack:
    """The engines, managers and regions the cases use, and how to release them."""

    run_prefix: str
    databases: _env.Databases
    engines: dict[str, Any] = field(default_factory=dict)
    async_engines: dict[str, Any] = field(default_factory=dict)
    managers: list[CacheManager] = field(default_factory=list)
    redis_used: bool = False
    first_db: str = "sqlite"
    notes: list[str] = field(default_factory=list)

    def engine(self, db: str) -> Any:
        if db not in self.engines:
            self.engines[db] = create_engine(self.databases.urls[db][0], pool_size=20)
            event.listen(self.engines[db], "before_cursor_execute", _count_select)
        return self.engines[db]

    def async_engine(self, db: str) -> Any:
        if db not in self.async_engines:
            self.async_engines[db] = create_async_engine(self.databases.urls[db][1])
            event.listen(self.async_engines[db].sync_engine, "before_cursor_execute", _count_select)
        return self.async_engines[db]

    def manager(
        self,
        backend: str,
        tag: str,
        *,
        near: bool | None = None,
        scope: Any = None,
        consistency: Any = "default",
    ) -> CacheManager:
        """A manager on ``backend`` with its own key prefix (``tag``); the near cache on for
        ``redis+near`` unless ``near`` says otherwise; ``scope``: its scope function;
        ``consistency``: ``"default"`` or ``"strict"`` (issue 16)."""
        name, arguments = _env.cache_backend(backend)
        self.redis_used |= backend in {"redis", _env.NEAR}
        config = CacheConfig(
            backend=name,
            arguments=arguments,
            key_prefix=f"{self.run_prefix}{tag}:",
            near_cache=backend == _env.NEAR if near is None else near,
            scope=scope,
            consistency=consistency,
        )
        manager = CacheManager(config)
        self.managers.append(manager)
        return manager

    def dispose(self, loop: Any) -> None:
        """Dispose of every engine (the async ones on ``loop``), then close ``loop``."""
        for engine in self.async_engines.values():
            loop.run_until_complete(engine.dispose())
        for engine in self.engines.values():
            engine.dispose()
        loop.close()

    def sessions(
        self, db: str, manager: CacheManager | None = None, **info: Any
    ) -> sessionmaker[Session]:
        if manager is not None:
            info["cache_manager"] = manager
        return sessionmaker(bind=self.engine(db), info=info, **SESSION_OPTIONS)

    def async_sessions(self, db: str, manager: CacheManager | None = None) -> Any:
        info = {} if manager is None else {"cache_manager": manager}
        return async_sessionmaker(bind=self.async_engine(db), info=info, **SESSION_OPTIONS)


def warm(sessions: sessionmaker[Session]) -> None:
    """Fill the cache with every row, then read each once more: the timed reads are steady
    hits (with the near cache, the second pass is what fills it from Redis)."""
    for _ in range(2):
        with sessions() as session:
            repository = AccountRepository(session=session)
            for ident in range(1, _env.ROWS + 1):
                repository.get(ident)


# -- (1) uncached --------------------------------------------------------------------------


def uncached_cases(stack: Stack, db: str) -> list[Case]:
    sessions = stack.sessions(db)
    async_sessions = stack.async_sessions(db)

    def run(ident: int) -> None:
        with sessions() as session:
            session.get(Account, ident)

    async def arun(ident: int) -> None:
        async with async_sessions() as session:
            await session.get(Account, ident)

    return [
        Case("uncached", f"session.get {db} sync", run=run),
        Case("uncached", f"session.get {db} async", arun=arun),
    ]


def bypass_cases(stack: Stack, db: str) -> list[Case]:
    """``repo.get(..., use_cache=False)`` in a session with a manager: the very read a hit
    answers, from the database (the hit rows, since issue 15, are members of the session)."""
    manager = stack.manager("memory", f"bypass-{db}")
    sessions = stack.sessions(db, manager)
    async_sessions = stack.async_sessions(db, manager)

    def run(ident: int) -> None:
        with sessions() as session:
            AccountRepository(session=session).get(ident, use_cache=False)

    async def arun(ident: int) -> None:
        async with async_sessions() as session:
            await AsyncAccountRepository(session=session).get(ident, use_cache=False)

    return [
        Case("uncached", f"repo.get {db} sync, use_cache=False", run=run),
        Case("uncached", f"repo.get {db} async, use_cache=False", arun=arun),
    ]


# -- (2) the floor ----------------------------------------------------------------------------


def _row_values(account: Account) -> list[Any]:
    return [
        account.id,
        account.email,
        account.name,
        account.visits,
        account.created_at.isoformat(),
        str(account.balance),
        account.active,
    ]


def floor_case(stack: Stack, backend: str, rows: list[Account]) -> Case:
    """Raw dogpile ``region.get`` of the serialized row, decoded into a detached instance."""
    from declcache.backends.memcached import BytesOnlySerde

    name, arguments = _env.cache_backend(backend)
    if backend == "memcached":
        arguments = {**arguments, "serde": BytesOnlySerde()}
    region = make_region(
        serializer=lambda value: json.dumps(value, separators=(",", ":")).encode(),
        deserializer=json.loads,
    ).configure(name, expiration_time=_env.TTL, arguments=arguments)
    stack.redis_used |= backend == "redis"
    prefix = f"{stack.run_prefix}floor:{backend}:"
    region.set_multi({f"{prefix}{row.id}": _row_values(row) for row in rows})
    new_instance = Account.__mapper__.class_manager.new_instance
    fromisoformat, decimal_ = dt.datetime.fromisoformat, decimal.Decimal

    def run(ident: int) -> Account:
        values = region.get(f"{prefix}{ident}")
        instance = new_instance()
        state = instance_state(instance).dict
        state["id"], state["email"], state["name"], state["visits"] = values[:4]
        state["created_at"] = fromisoformat(values[4])
        state["balance"] = decimal_(values[5])
        state["active"] = values[6]
        make_transient_to_detached(instance)
        return instance

    return Case("floor", f"dogpile region.get {backend}", run=run)


def floor_in_session_case(stack: Stack, floor: Case) -> Case:
    """The floor plus what every repository read pays first: a fresh session, closed after."""
    sessions = stack.sessions(stack.first_db)
    read = floor.run
    assert read is not None

    def run(ident: int) -> None:
        with sessions():
            read(ident)

    return Case("layers", f"{floor.name} + fresh session", run=run)


# -- (3) declcache hits -----------------------------------------------------------------------


def _tenant_scope(session: Session) -> str | None:
    tenant: str | None = session.info.get("tenant")
    return tenant


def _tenant_hit_case(stack: Stack, backend: str, db: str) -> Case:
    """``repo.get`` in a named scope (a tenant): the cost of a scope function and its token."""
    manager = stack.manager(backend, f"tenant-{backend}-{db}", scope=_tenant_scope)
    sessions = stack.sessions(db, manager, tenant="acme")
    warm(sessions)

    def run(ident: int) -> None:
        with sessions() as session:
            AccountRepository(session=session).get(ident)

    return Case("layers", f"repo.get {backend} {db} sync, in a tenant's scope", run=run)


def hit_cases(stack: Stack, backend: str, db: str, *, layers: bool | None = None) -> list[Case]:
    """``repo.get`` hits, sync and async; with ``layers`` (default: on the first database)
    the cases that cut a hit apart too."""
    manager = stack.manager(backend, f"hit-{backend}-{db}")
    sessions = stack.sessions(db, manager)
    async_sessions = stack.async_sessions(db, manager)
    warm(sessions)

    def run(ident: int) -> None:
        with sessions() as session:
            AccountRepository(session=session).get(ident)

    async def arun(ident: int) -> None:
        async with async_sessions() as session:
            await AsyncAccountRepository(session=session).get(ident)

    cases = [
        Case("declcache hit", f"repo.get {backend} {db} sync", run=run),
        Case("declcache hit", f"repo.get {backend} {db} async", arun=arun),
    ]
    if db == stack.first_db if layers is None else layers:  # the layers under repo.get

        def empty_session(_ident: int) -> None:
            with sessions() as session:
                AccountRepository(session=session)

        async def empty_async_session(_ident: int) -> None:
            async with async_sessions() as session:
                AsyncAccountRepository(session=session)

        cases += [
            _tenant_hit_case(stack, backend, db),
            _undecoded_hit_case(stack, backend, db),
            Case("layers", f"CacheManager.get {backend}", run=lambda i: manager.get(Account, i)),
            Case("layers", "fresh session + repository, no read", run=empty_session),
            Case("layers", "fresh AsyncSession + repository, no read", arun=empty_async_session),
        ]
    return cases


def _undecoded_hit_case(stack: Stack, backend: str, db: str) -> Case:
    """A hit whose payload this process has not parsed and decoded before (its own manager:
    forgetting the decoded payloads must not slow the other cases down)."""
    manager = stack.manager(backend, f"undecoded-{backend}-{db}")
    sessions = stack.sessions(db, manager)
    warm(sessions)
    cache = manager._cache(Account)
    assert cache is not None

    def run(ident: int) -> None:
        with sessions() as session:
            AccountRepository(session=session).get(ident)

    return Case(
        "layers",
        f"repo.get {backend} {db} sync, payload new to this process",
        run=run,
        before=lambda _ident: cache.payloads.forget_payloads(),
    )


def miss_case(stack: Stack, backend: str, db: str) -> Case:
    """A miss: backend get, query, fill (the invalidation before it is not timed)."""
    manager = stack.manager(backend, f"miss-{backend}-{db}")
    sessions = stack.sessions(db, manager)
    cache = manager._cache(Account)
    assert cache is not None
    calls = cache.store.inner = _CallCounter(cache.store.inner)  # each call: one round trip

    def run(ident: int) -> None:
        before = calls.count
        with sessions() as session:
            AccountRepository(session=session).get(ident)
        case.backend_calls.append(calls.count - before)

    case = Case(
        "declcache miss",
        f"repo.get miss {backend} {db} sync",
        run=run,
        before=lambda ident: manager.invalidate(Account, ident),
    )
    return case


class _CallCounter:
    """A model's store, counting the calls made to it (each is one backend round trip)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.count = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return method(*args, **kwargs)

        return counted


# -- (4) the peer ------------------------------------------------------------------------------


def peer_cases(stack: Stack, backend: str, db: str) -> list[Case]:
    from advanced_alchemy.cache import CacheConfig as PeerConfig
    from advanced_alchemy.cache import CacheManager as PeerManager
    from advanced_alchemy.repository import (
        SQLAlchemyAsyncRepository as PeerAsyncRepository,
    )
    from advanced_alchemy.repository import (
        SQLAlchemySyncRepository as PeerSyncRepository,
    )

    class PeerRepository(PeerSyncRepository[Account]):  # type: ignore[type-var]
        model_type = Account

    class PeerAsyncAccountRepository(PeerAsyncRepository[Account]):  # type: ignore[type-var]
        model_type = Account

    name, arguments = _env.cache_backend(backend)
    stack.redis_used |= backend == "redis"
    peer = PeerManager(
        PeerConfig(
            backend=name,
            expiration_time=_env.TTL,
            arguments=arguments,
            key_prefix=f"{stack.run_prefix}aa-{backend}-{db}:",
        )
    )
    sessions = stack.sessions(db)
    async_sessions = stack.async_sessions(db)
    with sessions() as session:
        repository = PeerRepository(session=session, cache_manager=peer, auto_expunge=True)
        for ident in range(1, _env.ROWS + 1):
            repository.get(ident)

    def run(ident: int) -> None:
        with sessions() as session:
            PeerRepository(session=session, cache_manager=peer, auto_expunge=True).get(ident)

    async def arun(ident: int) -> None:
        async with async_sessions() as session:
            repository = PeerAsyncAccountRepository(
                session=session, cache_manager=peer, auto_expunge=True
            )
            await repository.get(ident)

    return [
        Case("peer hit", f"advanced-alchemy get {backend} {db} sync", run=run),
        Case("peer hit", f"advanced-alchemy get {backend} {db} async", arun=arun),
    ]


# -- (5) many and lists -------------------------------------------------------------------------


def batch_cases(stack: Stack, backend: str, db: str) -> list[Case]:
    manager = stack.manager(backend, f"batch-{backend}-{db}")
    sessions = stack.sessions(db, manager)
    warm(sessions)
    batches = {seed: random.Random(seed).sample(range(1, _env.ROWS + 1), 100) for seed in range(50)}

    def many(ident: int) -> None:
        with sessions() as session:
            AccountRepository(session=session).get_many(batches[ident % 50])

    def singles(ident: int) -> None:
        with sessions() as session:
            repository = AccountRepository(session=session)
            for each in batches[ident % 50]:
                repository.get(each)

    def listed(ident: int, *, use_cache: bool) -> None:
        with sessions() as session:
            AccountRepository(session=session).list(
                order_by=Account.id, limit=100, offset=(ident % 10) * 100, use_cache=use_cache
            )

    for ident in range(10):
        listed(ident, use_cache=True)
    return [
        Case("100 rows", f"get_many(100) hit {backend} {db}", run=many, ops_divisor=10),
        Case("100 rows", f"100 x get hit {backend} {db}", run=singles, ops_divisor=10),
        Case(
            "100 rows",
            f"list(100) hit {backend} {db}",
            run=lambda i: listed(i, use_cache=True),
            ops_divisor=10,
        ),
        Case(
            "100 rows",
            f"list(100) uncached {db}",
            run=lambda i: listed(i, use_cache=False),
            ops_divisor=10,
        ),
    ]


# -- (6) writes ---------------------------------------------------------------------------------


def write_cases(stack: Stack, backend: str, db: str) -> list[Case]:
    """update + commit of one row, in a session with a manager (listeners act) and without."""
    manager = stack.manager(backend, f"write-{backend}-{db}")
    cached = stack.sessions(db, manager)
    plain = stack.sessions(db)

    def update(sessions: sessionmaker[Session], ident: int) -> None:
        with sessions() as session:
            account = session.get(Account, ident)
            assert account is not None
            account.visits += 1
            session.commit()

    return [
        Case("write", f"update+commit {db} no listeners", run=lambda i: update(plain, i)),
        Case(
            "write",
            f"update+commit {db} listeners, {backend}",
            run=lambda i: update(cached, i),
        ),
    ]


def strict_write_case(stack: Stack, backend: str, db: str) -> Case:
    """update + commit of one row with ``DECLCACHE_CONSISTENCY=strict`` (issue 16): markers
    written before the database commit, replaced after it; beside ``write_cases``' default."""
    manager = stack.manager(backend, f"write-strict-{backend}-{db}", consistency="strict")
    sessions = stack.sessions(db, manager)

    def update(ident: int) -> None:
        with sessions() as session:
            account = session.get(Account, ident)
            assert account is not None
            account.visits += 1
            session.commit()

    return Case("write", f"update+commit {db} listeners, {backend} strict", run=update)


# -- the near cache under writes ------------------------------------------------------------------


def mixed_workload(
    stack: Stack, db: str, reads: int = 2000, write_every: int = 20
) -> dict[str, dict[str, Any]]:
    """Reads of random ids, one committed update by *another* manager per ``write_every``.

    Run on plain Redis and on Redis with the near cache, same ids, same writes. The writer
    shares the reader's key prefix as a second process would; every read of a row written
    during the run is checked against the value committed last (``stale`` counts misses).
    """
    results: dict[str, dict[str, Any]] = {}
    for backend in ("redis", _env.NEAR):
        tag = f"mixed-{backend}-{db}"
        reader = stack.manager(backend, tag)
        writer = stack.manager("redis", tag)
        read_sessions, write_sessions = stack.sessions(db, reader), stack.sessions(db, writer)
        warm(read_sessions)
        before, near_before = reader.stats()["Account"], reader.near_cache_stats()
        rng = random.Random(5)
        committed: dict[int, int] = {}
        samples, stale = [], 0
        for index in range(reads):
            if index % write_every == 0:
                written = rng.randint(1, _env.ROWS)
                with write_sessions() as session:
                    account = session.get(Account, written)
                    assert account is not None
                    account.visits += 1
                    session.commit()
                    committed[written] = account.visits
            ident = rng.randint(1, _env.ROWS)
            started = time.perf_counter_ns()
            with read_sessions() as session:
                found = AccountRepository(session=session).get(ident)
            samples.append(time.perf_counter_ns() - started)
            stale += ident in committed and found.visits != committed[ident]
        after = reader.stats()["Account"]
        hits, misses = after.hits - before.hits, after.misses - before.misses
        near, near_ratio = reader.near_cache_stats(), None
        if near is not None and near_before is not None:
            near_hits = near.hits - near_before.hits
            near_ratio = near_hits / max(1, near_hits + near.misses - near_before.misses)
        results[backend] = {
            "median_us": statistics.median(samples) / 1000,
            "hit_ratio": hits / max(1, hits + misses),
            "near_hit_ratio": near_ratio,
            "stale": stale,
            "reads": reads,
            "writes": len(range(0, reads, write_every)),
        }
    return results


# -- (7) stampede ---------------------------------------------------------------------------------


class QueryCounter:
    """Counts the SELECTs of the benchmark table an engine runs."""

    def __init__(self, engine: Any) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        statement = args[2]
        if statement.lstrip().upper().startswith("SELECT") and "bench_accounts" in statement:
            self.count += 1


def setup_listeners() -> None:
    setup_cache_listeners()
