"""The stale-fill race, reproduced step by step (issue 4, "No stale fill").

A reader misses, SELECTs the old row and is paused inside its loader (a ``threading.Event``)
before it can fill the cache; a writer commits a change (its invalidation applied when
``commit()`` returns); the reader resumes and tries to fill. The fill must not make the old row
visible: every read that starts after the commit returns the new row. The reader's own result
may be the old row: its read began before the commit.

Over PostgreSQL (READ COMMITTED, so the writer is never blocked by the paused reader), on the
memory, Redis, Memcached, dbm and Valkey backends. The same race over a key that already holds
a value (a tombstone, an expired entry) runs on every backend in ``backends/_suite.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from sqlalchemy import create_engine, func, select, update
from sqlalchemy.orm import Session

from declcache import CacheConfig, CacheManager, setup_cache_listeners
from tests.integration._invalidation_models import (
    Base,
    Item,
    PausedRead,
    Person,
    Reader,
    Slot,
    race,
    reset_rows,
    writing,
)
from tests.integration.conftest import WITH_VALKEY

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Engine

OLD_ITEM = {"id": 1, "name": "item-1"}
NEW_ITEM = {"id": 1, "name": "new"}


@pytest.fixture(params=WITH_VALKEY)
def cache_backend(request: pytest.FixtureRequest) -> str:
    """Every backend of ``cache_config``, Valkey included."""
    return str(request.param)


@pytest.fixture(scope="module")
def module_engine(postgres_url: str) -> Iterator[Engine]:
    setup_cache_listeners()
    engine = create_engine(postgres_url, pool_size=10)
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def engine(module_engine: Engine) -> Engine:
    reset_rows(module_engine)
    return module_engine


@pytest.fixture
def manager(cache_config: CacheConfig) -> CacheManager:
    """The paused reader's manager."""
    return CacheManager(cache_config)


@pytest.fixture
def writer(cache_config: CacheConfig) -> CacheManager:
    return CacheManager(cache_config)


def refused(manager: CacheManager, model: type) -> int:
    return manager.stats()[model.__name__].fills_refused


def test_fill_after_an_update_is_refused(
    engine: Engine, manager: CacheManager, writer: CacheManager, cache_config: CacheConfig
) -> None:
    def commit() -> None:
        with writing(engine, writer) as session:
            session.get(Item, 1).name = "new"
            session.commit()

    own = race(engine, manager, Item, 1, query=lambda s: s.get(Item, 1), commit=commit)
    assert own == OLD_ITEM  # selected before the commit
    assert refused(manager, Item) == 1
    after = Reader(engine, manager)
    assert after.get(Item, 1) == NEW_ITEM
    assert after.loads == 1
    assert after.get(Item, 1) == NEW_ITEM  # cached again, the new row
    assert after.loads == 1
    assert Reader(engine, CacheManager(cache_config)).get(Item, 1) == NEW_ITEM


def test_fill_by_a_key_field_after_an_update_is_refused(
    engine: Engine, manager: CacheManager, writer: CacheManager, cache_config: CacheConfig
) -> None:
    email = "ann@example.com"

    def commit() -> None:
        with writing(engine, writer) as session:
            session.get(Person, 1).name = "Anna"
            session.commit()

    race(
        engine,
        manager,
        Person,
        {"email": email},
        query=lambda s: s.scalars(select(Person).filter_by(email=email)).one(),
        commit=commit,
    )
    assert refused(manager, Person) >= 1  # the entity and its email pointer
    new = {"id": 1, "email": email, "name": "Anna"}
    for reader in (Reader(engine, manager), Reader(engine, CacheManager(cache_config))):
        assert reader.get(Person, {"email": email}) == new
        assert reader.get(Person, 1) == new


def test_fill_after_a_delete_is_refused(
    engine: Engine, manager: CacheManager, writer: CacheManager
) -> None:
    def commit() -> None:
        with writing(engine, writer) as session:
            session.delete(session.get(Item, 1))
            session.commit()

    assert race(engine, manager, Item, 1, query=lambda s: s.get(Item, 1), commit=commit) == OLD_ITEM
    assert refused(manager, Item) == 1
    assert Reader(engine, manager).get(Item, 1) is None


def test_fill_after_a_bulk_update_is_never_served(
    engine: Engine, manager: CacheManager, writer: CacheManager, cache_config: CacheConfig
) -> None:
    """A bulk statement names no key: it draws a new generation for the model. The reader's
    fill may land, but it carries the old generation, so no read ever returns it."""

    def commit() -> None:
        with writing(engine, writer) as session:
            session.execute(update(Item).where(Item.id == 1).values(name="new"))
            session.commit()

    assert race(engine, manager, Item, 1, query=lambda s: s.get(Item, 1), commit=commit) == OLD_ITEM
    for reader in (Reader(engine, manager), Reader(engine, CacheManager(cache_config))):
        assert reader.get(Item, 1) == NEW_ITEM
        assert reader.get(Item, 1) == NEW_ITEM


def test_not_found_fill_after_an_insert_is_refused(
    engine: Engine, manager: CacheManager, writer: CacheManager, cache_config: CacheConfig
) -> None:
    def commit() -> None:
        with writing(engine, writer) as session:
            session.add(Slot(id=7, name="seven"))
            session.commit()

    assert race(engine, manager, Slot, 7, query=lambda s: s.get(Slot, 7), commit=commit) is None
    assert refused(manager, Slot) == 1
    for reader in (Reader(engine, manager), Reader(engine, CacheManager(cache_config))):
        assert reader.get(Slot, 7) == {"id": 7, "name": "seven"}


def test_concurrent_readers_all_see_the_commit(
    engine: Engine, manager: CacheManager, writer: CacheManager, cache_config: CacheConfig
) -> None:
    """Several readers paused at once, on their own managers (processes, in effect)."""
    readers = [
        PausedRead(engine, CacheManager(cache_config), Item, 1, lambda s: s.get(Item, 1))
        for _ in range(4)
    ]
    for reader in readers:
        reader.pause()
    with writing(engine, writer) as session:
        session.get(Item, 1).name = "new"
        session.commit()
    for reader in readers:
        assert reader.finish() == OLD_ITEM
    assert sum(refused(reader.manager, Item) for reader in readers) == len(readers)
    assert Reader(engine, manager).get(Item, 1) == NEW_ITEM


# --- loaders whose data is older than the lookup ------------------------------------------------


def test_long_lived_session_does_not_fill_its_stale_identity_map(
    engine: Engine, manager: CacheManager, writer: CacheManager, cache_config: CacheConfig
) -> None:
    """A session that loaded the row before the commit looks it up after the commit: it sees
    the commit's tombstone unchanged, but its loader answers from the identity map. The old
    row may be its own result; it must not reach the shared cache."""
    with Session(engine, info={"cache_manager": manager}) as long_lived:
        earlier = long_lived.get(Item, 1)  # e.g. earlier in the same request, still held
        assert earlier.name == "item-1"
        with writing(engine, writer) as session:
            session.get(Item, 1).name = "new"
            session.commit()
        assert manager.load(Item, 1, lambda: long_lived.get(Item, 1)) is earlier
    assert Reader(engine, CacheManager(cache_config)).get(Item, 1) == NEW_ITEM


def test_repeatable_read_snapshot_does_not_fill_the_old_row(
    engine: Engine, manager: CacheManager, writer: CacheManager, cache_config: CacheConfig
) -> None:
    """The same with a REPEATABLE READ snapshot taken before the commit."""
    snapshot_engine = engine.execution_options(isolation_level="REPEATABLE READ")
    with Session(snapshot_engine, info={"cache_manager": manager}) as session:
        assert session.scalar(select(func.count()).select_from(Item)) == 3  # snapshot taken
        with writing(engine, writer) as other:
            other.get(Item, 1).name = "new"
            other.commit()
        manager.load(Item, 1, lambda: session.get(Item, 1))
    assert Reader(engine, CacheManager(cache_config)).get(Item, 1) == NEW_ITEM
