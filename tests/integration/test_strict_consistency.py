"""``DECLCACHE_CONSISTENCY=strict``: no stale read when the writer loses the backend (issue 16).

The partition: the writer reaches Redis through a TCP proxy this module cuts, the readers
(other managers, as other processes would be) reach the same Redis directly. The proxy is cut
right after the database ``COMMIT`` (the dialect's ``do_commit`` returns, then the cut), so the
writer's invalidation after the commit fails and is queued; only its markers, written before
the commit, reach the readers. Each reader's SELECTs are counted with SQLAlchemy's
``before_cursor_execute`` event, to show that a read during the markers went to the database
and filled nothing, and that fills resume once the markers ran out.

Markers run out by wall clock. So as not to depend on how fast a test runs, most tests use a
long ``strict_marker_ttl`` and move the readers' clock past it (``_reads.time``); one test
waits a short ttl out for real. Over SQLite and PostgreSQL, sync and async, on the shared
Redis under the test's own key prefix; one test marks and clears on every backend of
``cache_config`` (memory, Redis, Memcached, dbm).
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import factory
import pytest
import redis
from sqlalchemy import String, create_engine, event, inspect, select, update
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from declcache import (
    CacheConfig,
    CacheManager,
    DeclCacheError,
    SettingsError,
    StrictConsistencyError,
)
from declcache import setup_cache_listeners as install_listeners
from declcache._codec import fingerprint
from declcache._invalidation import ModelChanges
from declcache._keys import UNSCOPED
from declcache._payload import Payloads, is_marker, marker_claims, marker_value, token_claims
from declcache._strict import mark_changes
from declcache.repository import SQLAlchemyAsyncRepository, SQLAlchemySyncRepository
from declcache.serializers import resolve_format
from tests.integration.conftest import delete_redis_keys

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    from tests.integration.conftest import StatementLog

#: Long enough never to run out while a test runs: tests move the readers' clock instead.
MARKER_TTL = 120.0
#: The marker ttl of the test that waits it out for real.
SHORT_MARKER_TTL = 0.5
#: Reads per reader while the markers run (each must query the database).
READS = 3


class Base(DeclarativeBase):
    pass


class Customer(Base):
    """Cached by id and by its unique email (a pointer key), with lists."""

    __tablename__ = "strict_customers"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(100))

    class CacheMeta:
        ttl = 300
        key_fields = (("id",), ("email",))


class CustomerFactory(factory.Factory):
    class Meta:
        model = Customer

    id = factory.Sequence(lambda n: n + 1)
    email = factory.Sequence(lambda n: f"customer{n + 1}@example.com")
    name = factory.Sequence(lambda n: f"customer {n + 1}")


class CustomerRepo(SQLAlchemySyncRepository[Customer]):
    model_type = Customer


class AsyncCustomerRepo(SQLAlchemyAsyncRepository[Customer]):
    model_type = Customer


# -- the partition ------------------------------------------------------------------------------


class CuttableProxy:
    """A TCP proxy to Redis whose link can be cut: the writer's side of a partition.

    Once cut, every connection through it is closed and every new one is closed as soon as
    it is accepted, while Redis itself keeps serving everyone else.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self.is_cut = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="strict-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self.is_cut:
                    _close(client)
                    continue
                try:
                    server = socket.create_connection(self.upstream, timeout=5)
                except OSError:
                    _close(client)
                    continue
                server.settimeout(None)
                self._sockets |= {client, server}
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            _close(target)

    def cut(self) -> None:
        """Close every connection through the proxy and refuse new ones."""
        with self._lock:
            self.is_cut = True
            held, self._sockets = self._sockets, set()
        for sock in held:
            _close(sock)

    def close(self) -> None:
        self.cut()
        _close(self._listener)


def _close(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with suppress(OSError):
        sock.close()


def cut_after_commit(engine: Engine, proxy: CuttableProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut ``proxy`` as soon as the database has committed on ``engine``, before anything else."""
    dialect = engine.dialect
    original = dialect.do_commit

    def do_commit(dbapi_connection: Any) -> None:
        original(dbapi_connection)
        proxy.cut()

    monkeypatch.setattr(dialect, "do_commit", do_commit)


class _ShiftedClock:
    """``time`` as the readers' flows see it, ``offset`` seconds later in wall-clock time."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()


def after_the_markers(monkeypatch: pytest.MonkeyPatch, ttl: float = MARKER_TTL) -> None:
    """Move the readers' wall clock past every marker written so far (the ttl elapsed)."""
    from declcache import _reads

    monkeypatch.setattr(_reads, "time", _ShiftedClock(ttl + 1))


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def urls(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[str, str]]:
    """Sync and async URLs of a database holding three customers (factory-made)."""
    if request.param == "sqlite":
        path = tmp_path / "strict.sqlite"
        sync_url, async_url = f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}"
    else:
        sync_url = request.getfixturevalue("postgres_url")
        async_url = request.getfixturevalue("postgres_async_url")
    engine = create_engine(sync_url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    CustomerFactory.reset_sequence(0)
    with Session(engine) as session:
        session.add_all(CustomerFactory.build_batch(3))
        session.commit()
    engine.dispose()
    yield sync_url, async_url
    engine = create_engine(sync_url)
    Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def proxy(redis_address: tuple[str, int], key_prefix: str) -> Iterator[CuttableProxy]:
    install_listeners()
    found = CuttableProxy(redis_address)
    yield found
    found.close()
    delete_redis_keys(*redis_address, key_prefix)


@dataclass
class Partitioned:
    """A database with three customers, a cuttable link to Redis, and what to observe with."""

    sync_url: str
    async_url: str
    proxy: CuttableProxy
    redis_address: tuple[str, int]
    key_prefix: str
    statements: Callable[[Engine], StatementLog]

    def managers(
        self, consistency: str = "strict", **more: Any
    ) -> AbstractContextManager[tuple[CacheManager, list[CacheManager]]]:
        """The writer's manager (through the proxy) and two readers' (straight to Redis)."""
        return managers(self.proxy, self.redis_address, self.key_prefix, consistency, **more)

    def raw(self, key: str) -> bytes | None:
        return raw(self.redis_address, key)


@pytest.fixture
def world(
    urls: tuple[str, str],
    proxy: CuttableProxy,
    redis_address: tuple[str, int],
    key_prefix: str,
    statements: Callable[[Engine], StatementLog],
) -> Partitioned:
    return Partitioned(*urls, proxy, redis_address, key_prefix, statements)


def config(
    address: tuple[str, int], key_prefix: str, consistency: str = "strict", **more: Any
) -> CacheConfig:
    return CacheConfig(
        backend="dogpile.cache.redis",
        arguments={"host": address[0], "port": address[1]},
        key_prefix=key_prefix,
        consistency=consistency,  # type: ignore[arg-type]
        strict_marker_ttl=more.pop("strict_marker_ttl", MARKER_TTL),
        **more,
    )


@contextmanager
def managers(
    proxy: CuttableProxy,
    redis_address: tuple[str, int],
    key_prefix: str,
    consistency: str = "strict",
    **more: Any,
) -> Iterator[tuple[CacheManager, list[CacheManager]]]:
    """The writer's manager (through the proxy) and two readers' (straight to Redis)."""
    writer = CacheManager(config(proxy.address, key_prefix, consistency, **more))
    readers = [CacheManager(config(redis_address, key_prefix, consistency, **more)) for _ in "ab"]
    try:
        yield writer, readers
    finally:
        for manager in (writer, *readers):
            manager.close()


def selects(log: StatementLog) -> int:
    return sum("strict_customers" in sql for sql in log.of_kind("SELECT"))


def read(manager: CacheManager, engine: Engine, ident: int) -> str:
    with Session(engine, info={"cache_manager": manager}) as session:
        return CustomerRepo(session=session, cache_manager=manager).get(ident).name


def read_list(manager: CacheManager, engine: Engine) -> list[str]:
    with Session(engine, info={"cache_manager": manager}) as session:
        repo = CustomerRepo(session=session, cache_manager=manager)
        return [item.name for item in repo.list(order_by=Customer.id)]


async def aread(manager: CacheManager, engine: AsyncEngine, ident: int) -> str:
    async with AsyncSession(engine, info={"cache_manager": manager}) as session:
        found = await AsyncCustomerRepo(session=session, cache_manager=manager).get(ident)
        return found.name


async def aread_list(manager: CacheManager, engine: AsyncEngine) -> list[str]:
    async with AsyncSession(engine, info={"cache_manager": manager}) as session:
        repo = AsyncCustomerRepo(session=session, cache_manager=manager)
        return [item.name for item in await repo.list(order_by=Customer.id)]


def rename(manager: CacheManager, engine: Engine, ident: int, name: str) -> None:
    with Session(engine, info={"cache_manager": manager}) as session:
        customer = session.get(Customer, ident)
        assert customer is not None
        customer.name = name
        session.commit()


async def arename(manager: CacheManager, engine: AsyncEngine, ident: int, name: str) -> None:
    async with AsyncSession(engine, info={"cache_manager": manager}) as session:
        customer = await session.get(Customer, ident)
        assert customer is not None
        customer.name = name
        await session.commit()


def names_in_database(sync_url: str) -> list[str]:
    engine = create_engine(sync_url)
    try:
        with engine.connect() as connection:
            return list(connection.scalars(select(Customer.name).order_by(Customer.id)))
    finally:
        engine.dispose()


def raw(redis_address: tuple[str, int], key: str) -> bytes | None:
    client = redis.Redis(*redis_address)
    try:
        value: bytes | None = client.get(key)
        return value
    finally:
        client.close()


def refused(manager: CacheManager) -> int:
    return manager.stats()["Customer"].fills_refused


# -- (1) a writer cut off after its commit ------------------------------------------------------


def test_a_writer_cut_off_after_its_commit_leaves_no_stale_read(
    world: Partitioned, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_engine, read_engine = create_engine(world.sync_url), create_engine(world.sync_url)
    log = world.statements(read_engine)
    with world.managers() as (writer, readers):
        for reader in readers:
            assert read(reader, read_engine, 1) == "customer 1"
            assert read_list(reader, read_engine)[0] == "customer 1"
        with log.fresh():
            assert [read(reader, read_engine, 1) for reader in readers] == ["customer 1"] * 2
            assert selects(log) == 0  # cached

        cut_after_commit(write_engine, world.proxy, monkeypatch)
        rename(writer, write_engine, 1, "renamed")
        assert world.proxy.is_cut
        assert writer.pending_invalidations > 0  # its invalidation never reached Redis
        assert names_in_database(world.sync_url)[0] == "renamed"

        before = [refused(reader) for reader in readers]
        for _ in range(READS):
            for reader in readers:
                with log.fresh():
                    assert read(reader, read_engine, 1) == "renamed"
                    assert selects(log) == 1  # the database, every time: nothing was filled
                with log.fresh():
                    assert read_list(reader, read_engine)[0] == "renamed"
                    assert selects(log) == 1
        assert all(refused(r) > count for r, count in zip(readers, before, strict=True))

        after_the_markers(monkeypatch)  # the marker ttl has passed: fills resume
        with log.fresh():
            assert read(readers[0], read_engine, 1) == "renamed"  # fills
            assert read_list(readers[0], read_engine)[0] == "renamed"  # fills
            assert selects(log) == 2
        with log.fresh():
            for reader in readers:
                assert read(reader, read_engine, 1) == "renamed"
                assert read_list(reader, read_engine)[0] == "renamed"
            assert selects(log) == 0  # hits again, in every process
    write_engine.dispose()
    read_engine.dispose()


async def test_an_async_writer_cut_off_after_its_commit_leaves_no_stale_read(
    world: Partitioned, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_engine = create_async_engine(world.async_url)
    read_engine = create_async_engine(world.async_url)
    log = world.statements(read_engine.sync_engine)
    try:
        with world.managers() as (writer, readers):
            for reader in readers:
                assert await aread(reader, read_engine, 2) == "customer 2"
                assert (await aread_list(reader, read_engine))[1] == "customer 2"

            cut_after_commit(write_engine.sync_engine, world.proxy, monkeypatch)
            await arename(writer, write_engine, 2, "renamed")
            assert world.proxy.is_cut
            assert writer.pending_invalidations > 0
            assert names_in_database(world.sync_url)[1] == "renamed"

            for _ in range(READS):
                for reader in readers:
                    with log.fresh():
                        assert await aread(reader, read_engine, 2) == "renamed"
                        assert (await aread_list(reader, read_engine))[1] == "renamed"
                        assert selects(log) == 2  # both from the database
            after_the_markers(monkeypatch)
            with log.fresh():
                assert await aread(readers[0], read_engine, 2) == "renamed"
                assert (await aread_list(readers[0], read_engine))[1] == "renamed"
                assert selects(log) == 2  # filled
            with log.fresh():
                for reader in readers:
                    assert await aread(reader, read_engine, 2) == "renamed"
                    assert (await aread_list(reader, read_engine))[1] == "renamed"
                assert selects(log) == 0
    finally:
        await write_engine.dispose()
        await read_engine.dispose()


def test_the_markers_run_out_by_themselves(
    world: Partitioned, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same partition with a short marker ttl, waited out for real (nothing is shifted)."""
    write_engine, read_engine = create_engine(world.sync_url), create_engine(world.sync_url)
    log = world.statements(read_engine)
    with world.managers(strict_marker_ttl=SHORT_MARKER_TTL) as (writer, readers):
        reader = readers[0]
        assert read(reader, read_engine, 3) == "customer 3"
        cut_after_commit(write_engine, world.proxy, monkeypatch)
        rename(writer, write_engine, 3, "renamed")
        assert writer.pending_invalidations > 0
        cache = reader._cache(Customer)
        assert cache is not None
        claims = marker_claims(world.raw(cache.keys.entity_key(("id",), (3,))))
        assert claims  # the writer's marker, never cleared
        assert read(reader, read_engine, 3) == "renamed"  # never the old row, whenever read

        while time.time() <= max(claims.values()):  # the marker's deadline, by this host's clock
            assert read(reader, read_engine, 3) == "renamed"
            time.sleep(0.05)
        with log.fresh():
            assert read(reader, read_engine, 3) == "renamed"  # fills
            assert read(reader, read_engine, 3) == "renamed"  # hits
            assert read_list(reader, read_engine)[2] == "renamed"
            assert read_list(reader, read_engine)[2] == "renamed"
            assert selects(log) == 2
    write_engine.dispose()
    read_engine.dispose()


def test_a_bulk_update_cut_off_after_its_commit_leaves_no_stale_read(
    world: Partitioned, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole-model change marks the model's generation: every entity misses meanwhile."""
    write_engine, read_engine = create_engine(world.sync_url), create_engine(world.sync_url)
    log = world.statements(read_engine)
    ids = (1, 2, 3)
    with world.managers() as (writer, readers):
        reader = readers[0]
        assert [read(reader, read_engine, i) for i in ids] == [f"customer {i}" for i in ids]
        cut_after_commit(write_engine, world.proxy, monkeypatch)
        with Session(write_engine, info={"cache_manager": writer}) as session:
            session.execute(update(Customer).values(name="bulk"))
            session.commit()
        assert writer.pending_invalidations > 0
        for _ in range(READS):
            with log.fresh():
                assert [read(reader, read_engine, i) for i in ids] == ["bulk"] * 3
                assert selects(log) == 3
        after_the_markers(monkeypatch)
        assert [read(reader, read_engine, i) for i in ids] == ["bulk"] * 3
        with log.fresh():
            assert [read(reader, read_engine, i) for i in ids] == ["bulk"] * 3
            assert selects(log) == 0
    write_engine.dispose()
    read_engine.dispose()


def test_a_session_joined_to_an_outer_transaction_marks_at_its_commit(
    world: Partitioned, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_engine, read_engine = create_engine(world.sync_url), create_engine(world.sync_url)
    log = world.statements(read_engine)
    with world.managers() as (writer, readers):
        reader = readers[0]
        assert read(reader, read_engine, 1) == "customer 1"
        cache = reader._cache(Customer)
        assert cache is not None
        key = cache.keys.entity_key(("id",), (1,))
        cut_after_commit(write_engine, world.proxy, monkeypatch)
        with write_engine.connect() as connection:
            outer = connection.begin()
            with Session(bind=connection, info={"cache_manager": writer}) as session:
                customer = session.get(Customer, 1)
                assert customer is not None
                customer.name = "renamed"
                session.commit()  # nothing is committed yet: nothing is marked either
            assert not is_marker(world.raw(key))
            with log.fresh():
                assert read(reader, read_engine, 1) == "customer 1"  # still true: a hit
                assert selects(log) == 0
            outer.commit()
        assert writer.pending_invalidations > 0
        for _ in range(READS):
            with log.fresh():
                assert read(reader, read_engine, 1) == "renamed"
                assert selects(log) == 1
    write_engine.dispose()
    read_engine.dispose()


# -- (2) markers that cannot be written ---------------------------------------------------------


def test_a_commit_whose_markers_cannot_be_written_fails_before_the_database(
    world: Partitioned,
) -> None:
    write_engine, read_engine = create_engine(world.sync_url), create_engine(world.sync_url)
    log = world.statements(read_engine)
    with world.managers() as (writer, readers):
        reader = readers[0]
        assert read(reader, read_engine, 1) == "customer 1"
        world.proxy.cut()  # the writer cannot reach the cache any more
        with Session(write_engine, info={"cache_manager": writer}) as session:
            customer = session.get(Customer, 1)
            assert customer is not None
            customer.name = "renamed"
            with pytest.raises(StrictConsistencyError) as caught:
                session.commit()
            session.rollback()
        error = caught.value
        assert isinstance(error, DeclCacheError)
        assert error.model == "Customer"
        assert "CacheConfig.consistency=strict" in str(error)
        assert "could not mark the Customer rows" in str(error)
        assert "nothing was committed" in str(error)
        assert error.__cause__ is None
        assert error.__context__ is None
        assert names_in_database(world.sync_url)[0] == "customer 1"  # unchanged
        assert writer.stats()["Customer"].errors >= 1
        assert writer.pending_invalidations == 0  # nothing committed: nothing to invalidate
        with log.fresh():
            assert read(reader, read_engine, 1) == "customer 1"  # still the truth: a hit
            assert selects(log) == 0
        with Session(write_engine) as session:  # the database is not left locked
            session.execute(update(Customer).where(Customer.id == 2).values(name="plain"))
            session.commit()
    write_engine.dispose()
    read_engine.dispose()


async def test_an_async_commit_whose_markers_cannot_be_written_fails_before_the_database(
    world: Partitioned,
) -> None:
    engine = create_async_engine(world.async_url)
    try:
        with world.managers() as (writer, _readers):
            world.proxy.cut()
            async with AsyncSession(engine, info={"cache_manager": writer}) as session:
                customer = await session.get(Customer, 2)
                assert customer is not None
                customer.name = "renamed"
                with pytest.raises(StrictConsistencyError, match="nothing was committed"):
                    await session.commit()
                await session.rollback()
            assert names_in_database(world.sync_url)[1] == "customer 2"
    finally:
        await engine.dispose()


def test_the_error_names_the_variable_the_mode_came_from(
    world: Partitioned, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, port = world.proxy.address
    monkeypatch.setenv("DECLCACHE_CONSISTENCY", "strict")
    monkeypatch.setenv("DECLCACHE_URL", f"redis://:s3cret-pw@{host}:{port}/0")
    manager = CacheManager(CacheConfig.from_env(key_prefix=world.key_prefix))
    engine = create_engine(world.sync_url)
    world.proxy.cut()
    try:
        with pytest.raises(StrictConsistencyError) as caught:
            rename(manager, engine, 3, "renamed")
        assert str(caught.value).startswith("DECLCACHE_CONSISTENCY=strict: could not mark")
        assert "s3cret-pw" not in str(caught.value)
        assert names_in_database(world.sync_url)[2] == "customer 3"
    finally:
        manager.close()
        engine.dispose()


# -- commits in flight together -----------------------------------------------------------------


def test_a_commit_does_not_lift_the_marker_of_another_still_in_flight(world: Partitioned) -> None:
    """Commit A marked and has not committed; commit B of another row marks and clears.

    Both rewrote the model's list version. B's clear must leave A's claim there: a list read
    between B's clear and A's commit could otherwise be cached without A's change.
    """
    engine = create_engine(world.sync_url)
    log = world.statements(engine)
    with world.managers() as (writer, readers):
        reader = readers[0]
        assert read_list(reader, engine)[0] == "customer 1"
        in_flight = {Customer: ModelChanges(keys={(("id",), (2,))}, scopes={UNSCOPED})}
        claim = mark_changes(writer, in_flight)[Customer]  # A: marked, not committed yet
        rename(readers[1], engine, 1, "renamed")  # B: marked, committed, cleared
        cache = reader._cache(Customer)
        assert cache is not None
        version = world.raw(cache.keys.list_version_key)
        assert version is not None
        assert set(token_claims(version.split(b"|", 1)[1].decode())) == {claim.id}
        entity = world.raw(cache.keys.entity_key(("id",), (1,)))
        assert entity is not None
        assert not is_marker(entity)  # B's own marker: replaced by its tombstone
        for _ in range(READS):
            with log.fresh():
                assert read_list(reader, engine)[0] == "renamed"
                assert selects(log) == 1  # A is still in flight: no list is cached
        in_flight[Customer].claims.append(claim)
        writer.apply(in_flight)  # A committed: its clear leaves a plain token
        version = world.raw(cache.keys.list_version_key)
        assert version is not None
        assert not is_marker(version)
        assert read_list(reader, engine)[0] == "renamed"
        with log.fresh():
            assert read_list(reader, engine)[0] == "renamed"
            assert selects(log) == 0
    engine.dispose()


# -- (3) the default mode -----------------------------------------------------------------------


def count_calls(manager: CacheManager, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The store methods ``manager``'s Customer cache calls from now on, in order."""
    cache = manager._cache(Customer)
    assert cache is not None
    calls: list[str] = []
    for name in ("get_many", "write_many", "add", "compare_and_set", "delete_many"):
        original = getattr(cache.store, name)

        def counted(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(cache.store, name, counted)
    return calls


def test_the_default_mode_writes_no_marker_and_serves_the_old_row_after_a_partition(
    world: Partitioned, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What strict mode is for: by default the same partition leaves the old row cached."""
    write_engine, read_engine = create_engine(world.sync_url), create_engine(world.sync_url)
    with world.managers(consistency="default") as (writer, readers):
        reader = readers[0]
        assert read(reader, read_engine, 1) == "customer 1"
        calls = count_calls(writer, monkeypatch)
        cut_after_commit(write_engine, world.proxy, monkeypatch)
        rename(writer, write_engine, 1, "renamed")
        assert calls == ["write_many"]  # the invalidation after the commit, nothing before
        assert writer.pending_invalidations > 0
        assert read(reader, read_engine, 1) == "customer 1"  # stale until the replay
    write_engine.dispose()
    read_engine.dispose()


def test_what_a_commit_costs_the_backend_in_each_mode(
    world: Partitioned, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_engine(world.sync_url)
    for consistency, expected in (
        ("default", ["write_many"]),
        # read, mark by compare-and-set; after the commit, one compare-and-set replaces them
        ("strict", ["get_many", "compare_and_set", "compare_and_set"]),
    ):
        with world.managers(consistency) as (writer, readers):
            read(writer, engine, 1)
            calls = count_calls(writer, monkeypatch)
            rename(writer, engine, 1, f"{consistency} name")
            assert calls == expected
            assert read(readers[0], engine, 1) == f"{consistency} name"
            calls.clear()
            assert read(writer, engine, 1) == f"{consistency} name"
            assert calls == ["get_many"]  # a read is one look-up in either mode (a hit)
    engine.dispose()


@pytest.mark.parametrize("urls", ["postgresql"], indirect=True)  # pysqlite: no savepoints
def test_a_rolled_back_savepoint_is_not_marked(world: Partitioned) -> None:
    engine = create_engine(world.sync_url)
    with world.managers() as (writer, _readers):
        marked: list[bool] = []
        cache = writer._cache(Customer)
        assert cache is not None
        keys = [cache.keys.entity_key(("id",), (ident,)) for ident in (1, 2)]

        def peek(_connection: Any) -> None:
            marked.extend(is_marker(world.raw(key)) for key in keys)

        event.listen(engine, "commit", peek)
        with Session(engine, info={"cache_manager": writer}) as session:
            one = session.get(Customer, 1)
            assert one is not None
            one.name = "kept"
            savepoint = session.begin_nested()
            two = session.get(Customer, 2)
            assert two is not None
            two.name = "dropped"
            session.flush()
            savepoint.rollback()
            session.commit()
        assert marked == [True, False]
        assert not any(is_marker(world.raw(key)) for key in keys)  # cleared after the commit
    engine.dispose()


# -- every backend, every format ----------------------------------------------------------------


def test_a_strict_commit_marks_and_clears_on_every_backend(
    cache_config: CacheConfig, tmp_path: Any
) -> None:
    """The compare-and-set of each store (Lua, gets/cas, a lock) marks and clears alike."""
    install_listeners()
    database = create_engine(f"sqlite:///{tmp_path / 'every.sqlite'}")
    Base.metadata.create_all(database)
    CustomerFactory.reset_sequence(0)
    with Session(database) as session:
        session.add_all(CustomerFactory.build_batch(2))
        session.commit()
    writer = CacheManager(cache_config.with_overrides(consistency="strict"))
    reader = CacheManager(cache_config.with_overrides(consistency="strict"))
    try:
        assert read(reader, database, 1) == "customer 1"
        seen: list[bool] = []
        cache = writer._cache(Customer)
        assert cache is not None
        key = cache.keys.entity_key(("id",), (1,))
        event.listen(
            database, "commit", lambda _c: seen.append(is_marker(cache.store.get_many([key])[0]))
        )
        rename(writer, database, 1, "renamed")
        assert seen == [True]  # marked before the database committed
        assert not is_marker(cache.store.get_many([key])[0])  # replaced after it
        assert read(reader, database, 1) == "renamed"
        assert read(reader, database, 1) == "renamed"
        assert reader.stats()["Customer"].hits == 1
        assert writer.stats()["Customer"].errors == 0
    finally:
        writer.close()
        reader.close()
        database.dispose()


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
def test_a_marker_is_a_miss_whatever_the_format(serializer: str) -> None:
    payloads = Payloads(fingerprint(inspect(Customer), serializer), resolve_format(serializer)[1])
    marker = marker_value({"abc": time.time() + 60, "def": 1.0})
    assert payloads.parse(marker) is None  # a miss, not an error
    assert is_marker(marker)
    assert set(marker_claims(marker) or {}) == {"abc", "def"}
    assert payloads.token(marker) is not None  # in a token: the token
    assert not is_marker(payloads.tombstone())
    assert not is_marker(payloads.dump("0123", "e", 1, "a@b", "name"))
    assert token_claims("0123|~abc@1.000~x@soon") == {"abc": 1.0, "x": float("inf")}


# -- (4) the settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("DECLCACHE_CONSISTENCY", "strong", "Input should be 'default' or 'strict'"),
        ("DECLCACHE_CONSISTENCY", "", "Input should be 'default' or 'strict'"),
        ("DECLCACHE_STRICT_MARKER_TTL", "0", "greater than 0"),
        ("DECLCACHE_STRICT_MARKER_TTL", "-1", "greater than 0"),
        ("DECLCACHE_STRICT_MARKER_TTL", "inf", "finite"),
        ("DECLCACHE_STRICT_MARKER_TTL", "3601", "less than or equal to 3600"),
        ("DECLCACHE_STRICT_MARKER_TTL", "soon", "valid number"),
    ],
)
def test_an_invalid_setting_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=problem) as caught:
        CacheConfig.from_env()
    assert caught.value.setting == variable
    assert str(caught.value).startswith(f"{variable}: ")


def test_the_settings_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CacheConfig().consistency == "default"
    assert CacheConfig().strict_marker_ttl == 10.0
    monkeypatch.setenv("DECLCACHE_CONSISTENCY", "strict")
    monkeypatch.setenv("DECLCACHE_STRICT_MARKER_TTL", "2.5")
    config = CacheConfig.from_env()
    assert (config.consistency, config.strict_marker_ttl) == ("strict", 2.5)
    assert config.sources["consistency"] == "DECLCACHE_CONSISTENCY"
    with pytest.raises(SettingsError, match=r"^CacheConfig\.consistency: "):
        CacheConfig(consistency="STRICT")  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match=r"^CacheConfig\.strict_marker_ttl: "):
        CacheConfig(strict_marker_ttl="5")  # type: ignore[arg-type]
