"""One manager shared by every tenant: no tenant ever receives another tenant's rows.

Two tenancy patterns, as users deploy them, on SQLite and PostgreSQL, with the memory, Redis
and Memcached backends:

* **schema per tenant**: ``schema_translate_map`` set on the engine or on the session's
  connection (SQLite ``ATTACH``, PostgreSQL schemas). Both tenants have a row ``id=1``;
* **row-level tenancy**: SQLAlchemy's documented recipe, a ``do_orm_execute`` listener adding
  ``with_loader_criteria(Account, tenant_id == current)``, with and without a scope function.

Every read path of the stock repository is checked (``get``, ``get_many``, ``get_one`` by a
``key_fields`` set, ``list``, ``list_and_count``, ``count``, ``exists``): after one tenant
filled the cache, the other tenant's read returns its own rows (a database query, counted),
and each tenant's committed writes are seen by its next read.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import factory
import pytest
from sqlalchemy import String, create_engine, event, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    sessionmaker,
    with_loader_criteria,
)

from declcache import CacheConfig, CacheManager, setup_cache_listeners
from declcache.exceptions import NotFoundError
from declcache.repository import SQLAlchemyAsyncRepository, SQLAlchemySyncRepository

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import ORMExecuteState

    from tests.integration.conftest import StatementLog


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "tenancy_accounts"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[int]
    slug: Mapped[str] = mapped_column(String(50), unique=True)
    name: Mapped[str] = mapped_column(String(50))

    class CacheMeta:
        ttl = 300
        key_fields = (("id",), ("slug",))
        cache_not_found = True  # "no such row" is per tenant too


class AccountFactory(factory.Factory):
    class Meta:
        model = Account

    id = factory.Sequence(lambda n: n + 1)
    tenant_id = 1
    slug = factory.LazyAttribute(lambda account: f"t{account.tenant_id}-{account.id}")
    name = factory.LazyAttribute(lambda account: f"tenant {account.tenant_id} #{account.id}")


class AccountRepo(SQLAlchemySyncRepository[Account]):
    model_type = Account


TENANT_SCHEMAS = ("tenant_a", "tenant_b")


@pytest.fixture(params=["memory", "redis", "memcached"])
def cache_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _listeners() -> None:
    setup_cache_listeners()
    AccountFactory.reset_sequence(0)


@pytest.fixture
def schema_engine(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Engine]:
    """An engine whose tenants' tables live in the schemas ``tenant_a`` and ``tenant_b``."""
    if database == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'main.sqlite'}")

        @event.listens_for(engine, "connect")
        def attach(connection: Any, _record: Any) -> None:
            for schema in TENANT_SCHEMAS:
                connection.execute(f"ATTACH DATABASE '{tmp_path / schema}.sqlite' AS {schema}")

    else:
        engine = create_engine(request.getfixturevalue("postgres_url"))
        with engine.begin() as connection:
            for schema in TENANT_SCHEMAS:
                connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
                connection.execute(text(f"CREATE SCHEMA {schema}"))
    for schema in TENANT_SCHEMAS:
        Base.metadata.create_all(engine.execution_options(schema_translate_map={None: schema}))
    yield engine
    if database == "postgresql":
        with engine.begin() as connection:
            for schema in TENANT_SCHEMAS:
                connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


def _seed(engine: Engine, schema: str | None, tenant_id: int, count: int = 3) -> None:
    target = (
        engine if schema is None else engine.execution_options(schema_translate_map={None: schema})
    )
    AccountFactory.reset_sequence(0)
    with Session(target) as session:
        session.add_all(AccountFactory.build_batch(count, tenant_id=tenant_id))
        session.commit()


@contextlib.contextmanager
def _tenant_session(
    engine: Engine, schema: str, manager: CacheManager, how: str
) -> Iterator[Session]:
    """A session reading ``schema``, the map set on the engine or on the session's connection."""
    schemas = {None: schema}
    if how == "engine":
        with Session(engine.execution_options(schema_translate_map=schemas)) as session:
            session.info["cache_manager"] = manager
            yield session
    else:
        with Session(engine) as session:
            session.info["cache_manager"] = manager
            session.connection(execution_options={"schema_translate_map": schemas})
            yield session


def _every_read(repo: AccountRepo) -> dict[str, Any]:
    """What each read path of the repository returns, as plain values."""
    items, total = repo.list_and_count(order_by=Account.id)
    return {
        "get": repo.get(1).name,
        "get_many": [item.name for item in repo.get_many([1, 2])],
        "get_one": repo.get_one(slug="t2-2").name if repo.exists(slug="t2-2") else None,
        "get_one_a": repo.get_one_or_none(slug="t1-2"),
        "list": [item.name for item in repo.list(order_by=Account.id)],
        "list_and_count": ([item.name for item in items], total),
        "count": repo.count(),
        "exists": repo.exists(name="tenant 1 #3"),
    }


def _expected(tenant_id: int, count: int = 3) -> dict[str, Any]:
    names = [f"tenant {tenant_id} #{n}" for n in range(1, count + 1)]
    return {
        "get": names[0],
        "get_many": [names[0], names[1]],
        "get_one": names[1] if tenant_id == 2 else None,
        "get_one_a": None if tenant_id == 2 else "row",
        "list": names,
        "list_and_count": (names, count),
        "count": count,
        "exists": tenant_id == 1,
    }


def _normalized(found: dict[str, Any]) -> dict[str, Any]:
    found = dict(found)
    found["get_one_a"] = None if found["get_one_a"] is None else "row"
    return found


@pytest.mark.parametrize("how", ["engine", "connection"])
def test_schema_per_tenant_never_serves_another_schemas_rows(
    schema_engine: Engine,
    cache_config: CacheConfig,
    statements: Callable[[Engine], StatementLog],
    how: str,
) -> None:
    _seed(schema_engine, "tenant_a", tenant_id=1)
    _seed(schema_engine, "tenant_b", tenant_id=2)
    manager = CacheManager(cache_config)
    log = statements(schema_engine)

    for schema, tenant in [("tenant_a", 1), ("tenant_b", 2)]:
        for round_ in (1, 2, 3):  # the first round's list loads the rows get then finds held
            with _tenant_session(schema_engine, schema, manager, how) as session, log.fresh():
                found = _normalized(_every_read(AccountRepo(session=session)))
                queried = [sql for sql in log.statements if "tenancy_accounts" in sql]
            assert found == _expected(tenant), (schema, round_)
            if round_ == 1:
                assert queried  # B's first reads went to B's schema, not to A's entries
            if round_ == 3:
                assert not queried, (schema, queried)  # all from B's own entries


@pytest.mark.parametrize("how", ["engine", "connection"])
def test_schema_per_tenant_writes_are_seen_by_their_tenant_only(
    schema_engine: Engine, cache_config: CacheConfig, how: str
) -> None:
    _seed(schema_engine, "tenant_a", tenant_id=1)
    _seed(schema_engine, "tenant_b", tenant_id=2)
    manager = CacheManager(cache_config)
    for schema in TENANT_SCHEMAS:  # both tenants' caches filled
        with _tenant_session(schema_engine, schema, manager, how) as session:
            _every_read(AccountRepo(session=session))

    with _tenant_session(schema_engine, "tenant_a", manager, how) as session:
        repo = AccountRepo(session=session)
        account = repo.get(1)
        account.name = "renamed in A"
        repo.update(account)
        repo.add(AccountFactory.build(id=4, tenant_id=1))
        session.commit()

    with _tenant_session(schema_engine, "tenant_a", manager, how) as session:
        repo = AccountRepo(session=session)
        assert repo.get(1).name == "renamed in A"
        assert repo.count() == 4
        assert [item.id for item in repo.list(order_by=Account.id)] == [1, 2, 3, 4]
    with _tenant_session(schema_engine, "tenant_b", manager, how) as session:
        repo = AccountRepo(session=session)
        assert repo.get(1).name == "tenant 2 #1"
        assert repo.count() == 3
        with pytest.raises(NotFoundError):
            repo.get(4)


# -- row-level tenancy ----------------------------------------------------------------------


@pytest.fixture
def row_engine(database: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """One table holding both tenants' rows: ids 1-3 are tenant 1's, 4-6 tenant 2's."""
    if database == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'rows.sqlite'}")
    else:
        engine = create_engine(request.getfixturevalue("postgres_url"))
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(AccountFactory.build_batch(3, tenant_id=1))
        session.add_all(AccountFactory.build_batch(3, tenant_id=2))
        session.commit()
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()


def _add_tenant_criteria(state: ORMExecuteState) -> None:
    """SQLAlchemy's row-level tenancy recipe: ``session.info["tenant_id"]``'s rows only."""
    tenant = state.session.info.get("tenant_id")
    if tenant is not None and state.is_select and not state.is_relationship_load:
        state.statement = state.statement.options(
            with_loader_criteria(Account, Account.tenant_id == tenant, include_aliases=True)
        )


def _tenant_sessions(engine: Engine, manager: CacheManager) -> sessionmaker[Session]:
    """Sessions of the row-level tenancy recipe (the listener on this factory alone)."""
    factory_ = sessionmaker(engine, info={"cache_manager": manager})
    event.listen(factory_, "do_orm_execute", _add_tenant_criteria)
    return factory_


def _tenant_scope(session: Session) -> str | None:
    tenant = session.info.get("tenant_id")
    return None if tenant is None else str(tenant)


def _row_reads(repo: AccountRepo) -> dict[str, Any]:
    items, total = repo.list_and_count(order_by=Account.id)
    return {
        "get": [repo.get_one_or_none(id=ident) for ident in (1, 4)],
        "get_many": repo.get_many([1, 4]),
        "get_one": [repo.get_one_or_none(slug=slug) for slug in ("t1-1", "t2-4")],
        "list": [item.id for item in repo.list(order_by=Account.id)],
        "list_and_count": ([item.id for item in items], total),
        "count": repo.count(),
        "exists": repo.exists(slug="t1-2"),
    }


def _row_view(found: dict[str, Any]) -> dict[str, Any]:
    """Instances by id, so two reads compare."""
    by_id = {
        key: [None if item is None else item.id for item in found[key]]
        for key in ("get", "get_many", "get_one")
    }
    return {**found, **by_id}


def _row_expected(tenant: int) -> dict[str, Any]:
    own = [1, 2, 3] if tenant == 1 else [4, 5, 6]
    return {
        "get": [1, None] if tenant == 1 else [None, 4],
        "get_many": [1, None] if tenant == 1 else [None, 4],
        "get_one": [1, None] if tenant == 1 else [None, 4],
        "list": own,
        "list_and_count": (own, 3),
        "count": 3,
        "exists": tenant == 1,
    }


def test_row_level_tenancy_with_a_scope_function_caches_each_tenant_apart(
    row_engine: Engine,
    cache_config: CacheConfig,
    statements: Callable[[Engine], StatementLog],
) -> None:
    manager = CacheManager(cache_config.with_overrides(scope=_tenant_scope))
    sessions = _tenant_sessions(row_engine, manager)
    log = statements(row_engine)
    for round_, tenant in [(1, 1), (1, 2), (2, 1), (2, 2)]:
        with sessions(info={"tenant_id": tenant}) as session, log.fresh() as sent:
            assert _row_view(_row_reads(AccountRepo(session=session))) == _row_expected(tenant)
            queries = [sql for sql in sent if "tenancy_accounts" in sql]
        if round_ == 2:  # all from this tenant's entries, "not found" ones included
            assert not queries


def test_row_level_tenancy_writes_reach_their_tenant_and_the_unscoped_view(
    row_engine: Engine, cache_config: CacheConfig
) -> None:
    manager = CacheManager(cache_config.with_overrides(scope=_tenant_scope))
    sessions = _tenant_sessions(row_engine, manager)
    for tenant in (1, 2, None):  # every view cached
        with sessions(info={"tenant_id": tenant}) as session:
            repo = AccountRepo(session=session)
            repo.get_many([1, 4])
            repo.list(order_by=Account.id)

    with sessions(info={"tenant_id": 1}) as session:
        repo = AccountRepo(session=session)
        account = repo.get(1)
        account.name = "renamed by tenant 1"
        repo.update(account)
        session.commit()
    with sessions(info={"tenant_id": 1}) as session:
        assert AccountRepo(session=session).get(1).name == "renamed by tenant 1"
    with sessions(info={"tenant_id": None}) as session:  # an unscoped (admin) view
        assert AccountRepo(session=session).get(1).name == "renamed by tenant 1"

    with sessions(info={"tenant_id": None}) as session:  # a write outside every scope
        repo = AccountRepo(session=session)
        account = repo.get(4)
        account.name = "renamed by an admin"
        repo.update(account)
        repo.add(AccountFactory.build(id=7, tenant_id=2))
        session.commit()
    with sessions(info={"tenant_id": 2}) as session:
        repo = AccountRepo(session=session)
        assert repo.get(4).name == "renamed by an admin"
        assert [item.id for item in repo.list(order_by=Account.id)] == [4, 5, 6, 7]


def test_row_level_tenancy_without_a_scope_function_reads_the_database(
    row_engine: Engine,
    cache_config: CacheConfig,
    statements: Callable[[Engine], StatementLog],
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = CacheManager(cache_config)
    sessions = _tenant_sessions(row_engine, manager)
    log = statements(row_engine)
    with sessions() as session:  # no tenant: the listener adds nothing, every row is seen
        assert [item.id for item in AccountRepo(session=session).list(order_by=Account.id)] == [
            1,
            2,
            3,
            4,
            5,
            6,
        ]
    for tenant in (1, 2, 2):
        with (
            caplog.at_level(logging.WARNING, "declcache"),
            sessions(info={"tenant_id": tenant}) as session,
            log.fresh() as sent,
        ):
            assert _row_view(_row_reads(AccountRepo(session=session))) == _row_expected(tenant)
            assert [sql for sql in sent if "tenancy_accounts" in sql]  # never the cache
    assert "add_tenant_criteria" in caplog.text
    assert "CacheConfig(scope=" in caplog.text


def test_invalidate_names_a_scope(row_engine: Engine, cache_config: CacheConfig) -> None:
    manager = CacheManager(cache_config.with_overrides(scope=_tenant_scope))
    sessions = _tenant_sessions(row_engine, manager)
    with sessions(info={"tenant_id": 1}) as session:
        AccountRepo(session=session).get(1)
    with row_engine.begin() as connection:  # a write the ORM does not see
        connection.execute(text("UPDATE tenancy_accounts SET name = 'changed' WHERE id = 1"))
    with sessions(info={"tenant_id": 1}) as session:
        assert AccountRepo(session=session).get(1).name == "tenant 1 #1"  # cached
    assert manager.invalidate(Account, 1, scope="1")
    with sessions(info={"tenant_id": 1}) as session:
        assert AccountRepo(session=session).get(1).name == "changed"

    with row_engine.begin() as connection:
        connection.execute(text("UPDATE tenancy_accounts SET name = 'again' WHERE id = 1"))
    assert manager.invalidate_model(Account, scope="2")  # another tenant: 1 keeps its entry
    with sessions(info={"tenant_id": 1}) as session:
        assert AccountRepo(session=session).get(1).name == "changed"
    assert manager.invalidate_model(Account)  # every scope
    with sessions(info={"tenant_id": 1}) as session:
        assert AccountRepo(session=session).get(1).name == "again"


class AsyncAccountRepo(SQLAlchemyAsyncRepository[Account]):
    model_type = Account


class _TenantSession(Session):
    """The sync session of the async tenants' sessions, with the recipe's listener."""


event.listen(_TenantSession, "do_orm_execute", _add_tenant_criteria)


async def test_async_sessions_are_scoped_like_sync_ones(
    database: str, cache_config: CacheConfig, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if database == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'rows.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_async_url")
    engine = create_async_engine(url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
    manager = CacheManager(cache_config.with_overrides(scope=_tenant_scope))
    sessions = async_sessionmaker(
        engine, sync_session_class=_TenantSession, info={"cache_manager": manager}
    )
    try:
        async with sessions() as session:
            session.add_all(AccountFactory.build_batch(2, tenant_id=1))
            session.add_all(AccountFactory.build_batch(2, tenant_id=2))
            await session.commit()
        for tenant, own in [(1, [1, 2]), (2, [3, 4]), (1, [1, 2]), (2, [3, 4])]:
            async with sessions(info={"tenant_id": tenant}) as session:
                repo = AsyncAccountRepo(session=session)
                assert [item.id for item in await repo.list(order_by=Account.id)] == own
                assert [item and item.id for item in await repo.get_many([1, 3])] == [
                    ident if ident in own else None for ident in (1, 3)
                ]
                assert await repo.count() == 2
        assert manager.stats()["Account"].hits > 0
        async with sessions(info={"tenant_id": 2}) as session:
            repo = AsyncAccountRepo(session=session)
            account = await repo.get(3)
            account.name = "renamed"
            await repo.update(account)
            await session.commit()
        async with sessions(info={"tenant_id": 2}) as session:
            assert (await AsyncAccountRepo(session=session).get(3)).name == "renamed"
    finally:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.drop_all)
        await engine.dispose()


def test_a_failing_scope_function_reads_the_database_and_writes_reach_every_scope(
    row_engine: Engine,
    cache_config: CacheConfig,
    statements: Callable[[Engine], StatementLog],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def scope(session: Session) -> str | None:
        if session.info.get("broken"):
            raise LookupError("no tenant context")
        return _tenant_scope(session)

    manager = CacheManager(cache_config.with_overrides(scope=scope))
    sessions = _tenant_sessions(row_engine, manager)
    with sessions(info={"tenant_id": 1}) as session:
        AccountRepo(session=session).get(1)  # tenant 1's entry
    log = statements(row_engine)
    with (
        caplog.at_level(logging.WARNING, "declcache"),
        sessions(info={"tenant_id": 1, "broken": True}) as session,
        log.fresh() as sent,
    ):
        repo = AccountRepo(session=session)
        account = repo.get(1)
        assert [sql for sql in sent if "tenancy_accounts" in sql]  # not the cache
        account.name = "written without a scope"
        repo.update(account)
        session.commit()
    assert "LookupError" in caplog.text
    with sessions(info={"tenant_id": 1}) as session:
        assert AccountRepo(session=session).get(1).name == "written without a scope"
