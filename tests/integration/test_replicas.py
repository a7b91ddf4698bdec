"""Reads routed to a lagging replica (issue 14, point 11).

A replica is a second real database the test copies rows into when it chooses: the moment
the replica catches up. The replica engine declares its maximum lag
(``execution_options(declcache_replica_lag=seconds)``); a fill of a row read through it is
refused while a tombstone or token the look-up saw is younger than that lag, so once the
replica has caught up no read through the cache returns the old row.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import factory
import pytest
from sqlalchemy import create_engine, delete, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from declcache import CacheConfig, CacheManager, _freshness, setup_cache_listeners
from tests.integration._invalidation_models import Base, Item, reset_rows, row

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine

LAG = 0.5  # the replica's declared maximum lag, in seconds
OLD = {"id": 1, "name": "item-1"}
NEW = {"id": 1, "name": "renamed"}


@pytest.fixture(autouse=True)
def _forget_lags() -> Iterator[None]:
    """The replica engines of a test are gone after it: later tests use no replica."""
    yield
    _freshness.forget_replica_lags()


class ItemFactory(factory.Factory):
    class Meta:
        model = Item

    id = factory.Sequence(lambda n: 200 + n)
    name = factory.Faker("word")


class Routed(Session):
    """Writes (flushes) to the primary, reads to the replica: a ``get_bind`` router."""

    def __init__(self, primary: Engine, replica: Engine, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.primary, self.replica = primary, replica

    def get_bind(self, mapper: Any = None, clause: Any = None, **kwargs: Any) -> Any:
        del mapper, clause, kwargs
        return self.primary if self._flushing else self.replica


def catch_up(primary: Engine, replica: Engine) -> None:
    """The replica applies everything the primary committed."""
    with Session(primary) as source, Session(replica) as target:
        rows = [row(item) for item in source.scalars(select(Item))]
        target.execute(delete(Item))
        target.add_all(Item(**values) for values in rows if values is not None)
        target.commit()


@pytest.fixture
def sqlite_pair(tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    setup_cache_listeners()
    primary = create_engine(f"sqlite:///{tmp_path / 'primary.sqlite'}")
    replica = create_engine(f"sqlite:///{tmp_path / 'replica.sqlite'}")
    for engine in (primary, replica):
        Base.metadata.create_all(engine)
        reset_rows(engine)
    yield primary, replica.execution_options(declcache_replica_lag=LAG)
    primary.dispose()
    replica.dispose()


@pytest.fixture
def postgres_pair(postgres_url: str) -> Iterator[tuple[Engine, Engine]]:
    """The run's database as the primary, and a database created here as the replica."""
    setup_cache_listeners()
    url = make_url(postgres_url)
    name = f"replica_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    primary = create_engine(url)
    replica = create_engine(url.set(database=name))
    try:
        for engine in (primary, replica):
            Base.metadata.create_all(engine)
            reset_rows(engine)
        yield primary, replica.execution_options(declcache_replica_lag=LAG)
    finally:
        primary.dispose()
        replica.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def pair(request: pytest.FixtureRequest) -> tuple[Engine, Engine]:
    fixture = "sqlite_pair" if request.param == "sqlite" else "postgres_pair"
    found: tuple[Engine, Engine] = request.getfixturevalue(fixture)
    return found


def rename(primary: Engine, replica: Engine, manager: CacheManager) -> None:
    with Routed(primary, replica, info={"cache_manager": manager}) as session:
        session.add_all(ItemFactory.build_batch(2))
        session.flush()
        session.execute(select(Item).where(Item.id == 1))  # a read on the replica
        item = session.get(Item, 1)
        assert item is not None
        item.name = NEW["name"]
        session.commit()


def read(primary: Engine, replica: Engine, manager: CacheManager) -> dict[str, Any] | None:
    with Routed(primary, replica, info={"cache_manager": manager}) as session:
        return row(manager.load(Item, 1, lambda: session.get(Item, 1)))


def read_list(primary: Engine, replica: Engine, manager: CacheManager) -> list[Any]:
    with Routed(primary, replica, info={"cache_manager": manager}) as session:
        loaded = manager.load_list(
            Item, "all", lambda: list(session.scalars(select(Item).order_by(Item.id)))
        )
        return [row(item) for item in loaded]


def test_a_lagging_replica_never_leaves_the_old_row_cached(
    pair: tuple[Engine, Engine], cache_config: CacheConfig
) -> None:
    primary, replica = pair
    manager = CacheManager(cache_config)
    rename(primary, replica, manager)
    assert read(primary, replica, manager) == OLD  # the replica lags: its own answer
    assert manager.stats()["Item"].fills_refused == 1
    catch_up(primary, replica)
    for reader in (manager, CacheManager(cache_config)):
        assert read(primary, replica, reader) == NEW


def test_a_lagging_replica_never_leaves_an_old_list_cached(
    pair: tuple[Engine, Engine], cache_config: CacheConfig
) -> None:
    primary, replica = pair
    manager = CacheManager(cache_config)
    rename(primary, replica, manager)
    assert len(read_list(primary, replica, manager)) == 3  # the replica lags the inserts
    catch_up(primary, replica)
    listed = read_list(primary, replica, CacheManager(cache_config))
    assert len(listed) == 5
    assert NEW in listed


def test_replica_fills_resume_once_the_invalidation_is_older_than_the_lag(
    pair: tuple[Engine, Engine], cache_config: CacheConfig
) -> None:
    primary, replica = pair
    manager = CacheManager(cache_config)
    rename(primary, replica, manager)
    manager.get(Item, 1)  # a first look-up creates the generation token: it is new too
    catch_up(primary, replica)
    time.sleep(LAG)  # not a bound on anything: the commit's tombstone is now older than LAG
    assert read(primary, replica, manager) == NEW
    assert manager.stats()["Item"].fills == 1
    with Session(replica) as session:
        loads: list[int] = []
        found = manager.load(Item, 1, lambda: loads.append(1) or session.get(Item, 1))
        assert row(found) == NEW
        assert loads == []  # a hit


def test_primary_reads_fill_at_once(pair: tuple[Engine, Engine], cache_config: CacheConfig) -> None:
    """Only the replica's reads wait out its lag: the primary's fill right after the commit."""
    primary, replica = pair
    manager = CacheManager(cache_config)
    rename(primary, replica, manager)
    assert read(primary, primary, manager) == NEW
    assert manager.stats()["Item"].fills == 1
