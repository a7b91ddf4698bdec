"""Snapshot transactions however they start (issue 14, point 3).

A transaction that keeps a snapshot and began before a commit reads the old row after that
commit returned. Its look-up sees the commit's tombstone unchanged, so the compare-and-set of
its fill would succeed: the fill must be refused because the snapshot is older than the
look-up. Recognised without a query: SQLite's ``BEGIN`` recipe (WAL), ``SET TRANSACTION
ISOLATION LEVEL REPEATABLE READ`` sent as SQL on PostgreSQL. Each refusal has a counterpart
that fills, so a check refusing everything fails too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import factory
import pytest
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.orm import Session

from declcache import CacheConfig, CacheManager, setup_cache_listeners
from tests.integration._invalidation_models import Base, Item, Reader, reset_rows, row, writing

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine

    from tests.integration.conftest import StatementLog

NEW = "renamed"


class ItemFactory(factory.Factory):
    """Rows of :class:`Item` past the starting ones."""

    class Meta:
        model = Item

    id = factory.Sequence(lambda n: 100 + n)
    name = factory.Faker("word")


def _recipe(engine: Engine) -> Engine:
    """SQLAlchemy's documented pysqlite recipe: the driver's own BEGIN off, ours at begin."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


@pytest.fixture
def sqlite_recipe(tmp_path: Path) -> Iterator[Engine]:
    setup_cache_listeners()
    engine = _recipe(create_engine(f"sqlite:///{tmp_path / 'snap.sqlite'}"))
    Base.metadata.create_all(engine)
    reset_rows(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def pg_module_engine(postgres_url: str) -> Iterator[Engine]:
    setup_cache_listeners()
    engine = create_engine(postgres_url, pool_size=5)
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def pg(pg_module_engine: Engine) -> Engine:
    reset_rows(pg_module_engine)
    return pg_module_engine


def rename(engine: Engine, manager: CacheManager) -> None:
    with writing(engine, manager) as session:
        session.get(Item, 1).name = NEW
        session.commit()


def load_in(session: Session, manager: CacheManager) -> dict[str, Any] | None:
    return row(manager.load(Item, 1, lambda: session.get(Item, 1)))


def refused(manager: CacheManager) -> int:
    return manager.stats()["Item"].fills_refused


def test_sqlite_begin_recipe_snapshot_older_than_the_look_up_fills_nothing(
    sqlite_recipe: Engine,
) -> None:
    manager = CacheManager(CacheConfig())
    with Session(sqlite_recipe, info={"cache_manager": manager}) as old:
        assert old.scalar(select(func.count()).select_from(Item)) == 3  # BEGIN; snapshot
        rename(sqlite_recipe, manager)  # WAL: commits while the snapshot is held
        assert load_in(old, manager) == {"id": 1, "name": "item-1"}  # its snapshot's row
    assert refused(manager) == 1
    assert Reader(sqlite_recipe, manager).get(Item, 1) == {"id": 1, "name": NEW}


def test_sqlite_begin_recipe_transaction_begun_by_the_load_fills(sqlite_recipe: Engine) -> None:
    manager = CacheManager(CacheConfig())
    rename(sqlite_recipe, manager)
    with Session(sqlite_recipe, info={"cache_manager": manager}) as fresh:
        assert load_in(fresh, manager) == {"id": 1, "name": NEW}
    reader = Reader(sqlite_recipe, manager)
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 0
    assert refused(manager) == 0


def test_pysqlite_default_older_transaction_still_fills(engine: Engine) -> None:
    """pysqlite's default mode opens no transaction for a SELECT: no snapshot, so it fills."""
    manager = CacheManager(CacheConfig())
    with Session(engine, info={"cache_manager": manager}) as old:
        old.add_all(ItemFactory.build_batch(2))
        old.commit()
        assert old.scalar(select(func.count()).select_from(Item)) == 5
        rename(engine, manager)
        assert load_in(old, manager) == {"id": 1, "name": NEW}
    reader = Reader(engine, manager)
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 0


@pytest.mark.parametrize(
    "statement",
    [
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    ],
)
def test_postgres_isolation_set_in_sql_is_recognised(
    pg: Engine, cache_config: CacheConfig, statement: str
) -> None:
    manager = CacheManager(cache_config)
    with pg.connect() as connection, Session(connection, info={"cache_manager": manager}) as old:
        try:
            old.execute(text(statement))
            if "SESSION" in statement:  # the level of the following transactions
                old.commit()
            assert old.scalar(select(func.count()).select_from(Item)) == 3  # snapshot taken
            rename(pg, manager)
            assert load_in(old, manager) == {"id": 1, "name": "item-1"}
        finally:
            old.rollback()
            connection.invalidate()  # a SESSION level must not outlive this test
    assert refused(manager) == 1
    assert Reader(pg, CacheManager(cache_config)).get(Item, 1) == {"id": 1, "name": NEW}


def test_postgres_read_committed_older_transaction_fills_without_a_query(
    pg: Engine, cache_config: CacheConfig, statements: Callable[[Engine], StatementLog]
) -> None:
    """READ COMMITTED (the default) sees every commit: it fills, and asks the database
    nothing about its isolation to decide."""
    manager = CacheManager(cache_config)
    with Session(pg, info={"cache_manager": manager}) as old:
        assert old.scalar(select(func.count()).select_from(Item)) == 3
        rename(pg, manager)
        log = statements(pg)
        assert load_in(old, manager) == {"id": 1, "name": NEW}
        assert len(log) == 1  # the SELECT of the row, nothing else
    reader = Reader(pg, CacheManager(cache_config))
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 0
