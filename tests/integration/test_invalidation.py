"""Transaction-aware invalidation (API.md §5, issue 4): what a commit invalidates, and when.

Every test runs on each backend of the ``cache_config`` fixture (memory, Redis, Memcached,
dbm) and on SQLite and PostgreSQL. A test builds a *writer* manager for the sessions that
write and a separate *reader* manager for the reads: two managers of one config share one
store, as two processes sharing a server do, so a read proves what every other process
sees, not what the writer's own manager remembers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import create_engine, delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from declcache import CacheConfig, CacheManager, Lookup, _frames, setup_cache_listeners
from tests.integration._invalidation_models import (
    Base,
    Document,
    Folder,
    Item,
    Note,
    Person,
    Reader,
    Slot,
    reset_rows,
    row,
    writing,
)
from tests.integration.conftest import delete_redis_keys

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Engine

ROOT = Path(__file__).resolve().parents[2]

ANN = {"id": 1, "email": "ann@example.com", "name": "Ann"}
BOB = {"id": 2, "email": "bob@example.com", "name": "Bob"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def module_engine(
    database: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    setup_cache_listeners()
    if database == "sqlite":
        path = tmp_path_factory.mktemp("invalidation") / "db.sqlite"
        engine = create_engine(f"sqlite:///{path}")
    else:
        engine = create_engine(request.getfixturevalue("postgres_url"))
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def engine(module_engine: Engine) -> Engine:
    reset_rows(module_engine)
    return module_engine


@pytest.fixture
def writer(cache_config: CacheConfig) -> CacheManager:
    """The manager of the sessions that write."""
    return CacheManager(cache_config)


@pytest.fixture
def reader(engine: Engine, cache_config: CacheConfig) -> Reader:
    """Reads through a second manager on the same store (another process, in effect)."""
    return Reader(engine, CacheManager(cache_config))


def other_reader(engine: Engine, cache_config: CacheConfig) -> Reader:
    return Reader(engine, CacheManager(cache_config))


def invalidations(manager: CacheManager, model: type) -> int:
    stats = manager.stats().get(model.__name__)
    return 0 if stats is None else stats.invalidations


def warm(reader: Reader, *reads: tuple[type, Any]) -> None:
    """Read each entity twice: the second read must be a cache hit."""
    for model, ident in reads:
        reader.get(model, ident)
    for model, ident in reads:
        assert reader.loads_during(lambda m=model, i=ident: reader.get(m, i)) == 0, (model, ident)


# --- commit, rollback, savepoints ---------------------------------------------------------------


def test_update_invalidates_after_commit_and_not_before(
    engine: Engine, writer: CacheManager, reader: Reader, cache_config: CacheConfig
) -> None:
    warm(reader, (Person, 1), (Person, {"email": ANN["email"]}))
    with writing(engine, writer) as session:
        session.get(Person, 1).name = "Anna"
        session.flush()
        # Flushed, not committed: everybody else must still be served the committed row.
        observer = other_reader(engine, cache_config)
        assert observer.get(Person, 1) == ANN
        assert observer.get(Person, {"email": ANN["email"]}) == ANN
        assert observer.loads == 0
        assert invalidations(writer, Person) == 0
        session.commit()
    assert invalidations(writer, Person) > 0
    loads = reader.loads
    assert reader.get(Person, 1) == {**ANN, "name": "Anna"}
    assert reader.get(Person, {"email": ANN["email"]}) == {**ANN, "name": "Anna"}
    assert reader.loads == loads + 2  # both keys miss after the commit
    assert reader.loads_during(lambda: reader.get(Person, 1)) == 0  # and are cached again


def test_insert_invalidates_a_cached_not_found_and_the_list_version(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    assert reader.get(Slot, 7) is None
    assert reader.loads_during(lambda: reader.get(Slot, 7)) == 0  # "not found" is cached
    before = reader.list_all(Item)
    assert reader.loads_during(lambda: reader.list_all(Item)) == 0
    with writing(engine, writer) as session:
        session.add_all([Slot(id=7, name="seven"), Item(id=4, name="item-4")])
        session.commit()
    assert reader.get(Slot, 7) == {"id": 7, "name": "seven"}
    assert reader.list_all(Item) == [*before, {"id": 4, "name": "item-4"}]


def test_delete_invalidates_every_key_and_the_list_version(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Person, 1), (Person, {"email": ANN["email"]}))
    assert len(reader.list_all(Person)) == 2
    with writing(engine, writer) as session:
        session.delete(session.get(Person, 1))
        session.commit()
    assert reader.get(Person, 1) is None
    assert reader.get(Person, {"email": ANN["email"]}) is None
    assert reader.list_all(Person) == [BOB]


def test_rollback_discards_the_invalidations(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Person, 1), (Item, 1))
    with writing(engine, writer) as session:
        session.get(Person, 1).name = "Anna"
        session.execute(update(Item).values(name="bulk"))
        session.flush()
        session.rollback()
        session.commit()  # nothing left to commit: nothing may be invalidated
    assert invalidations(writer, Person) == 0
    assert invalidations(writer, Item) == 0
    assert reader.loads_during(lambda: reader.get(Person, 1)) == 0
    assert reader.get(Person, 1) == ANN


def test_savepoint_rollback_discards_only_its_own_changes(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Item, 1), (Item, 2), (Item, 3))
    with writing(engine, writer) as session:
        session.get(Item, 1).name = "outer"
        savepoint = session.begin_nested()
        session.get(Item, 2).name = "rolled back"
        session.execute(update(Item).where(Item.id == 3).values(name="rolled back too"))
        session.flush()
        savepoint.rollback()
        session.commit()
    assert reader.get(Item, 1) == {"id": 1, "name": "outer"}
    # The savepoint's changes never happened: their entries stay valid and cached.
    assert reader.loads_during(lambda: reader.get(Item, 2)) == 0
    assert reader.loads_during(lambda: reader.get(Item, 3)) == 0
    assert reader.get(Item, 2) == {"id": 2, "name": "item-2"}
    assert reader.get(Item, 3) == {"id": 3, "name": "item-3"}


def test_released_savepoint_applies_at_the_outer_commit(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Item, 1), (Item, 2))
    with writing(engine, writer) as session:
        with session.begin_nested():
            session.get(Item, 1).name = "inner"
        with session.begin_nested(), session.begin_nested():
            session.get(Item, 2).name = "deeper"
        # Released savepoints are still inside an uncommitted transaction.
        assert reader.loads_during(lambda: reader.get(Item, 1)) == 0
        assert invalidations(writer, Item) == 0
        session.commit()
    assert reader.get(Item, 1) == {"id": 1, "name": "inner"}
    assert reader.get(Item, 2) == {"id": 2, "name": "deeper"}


def test_inner_savepoint_rollback_keeps_the_outer_savepoints_changes(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Item, 1), (Item, 2))
    with writing(engine, writer) as session:
        with session.begin_nested():
            session.get(Item, 1).name = "outer savepoint"
            inner = session.begin_nested()
            session.get(Item, 2).name = "inner savepoint"
            session.flush()
            inner.rollback()
        session.commit()
    assert reader.get(Item, 1) == {"id": 1, "name": "outer savepoint"}
    assert reader.loads_during(lambda: reader.get(Item, 2)) == 0
    assert reader.get(Item, 2) == {"id": 2, "name": "item-2"}


def test_outer_savepoint_rollback_discards_its_released_inner_savepoints(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Item, 1), (Item, 2))
    with writing(engine, writer) as session:
        session.get(Item, 2).name = "outer transaction"
        outer = session.begin_nested()
        with session.begin_nested():
            session.get(Item, 1).name = "released inner"
        outer.rollback()
        session.commit()
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 0
    assert reader.get(Item, 1) == {"id": 1, "name": "item-1"}
    assert reader.get(Item, 2) == {"id": 2, "name": "outer transaction"}


def test_savepoint_rollback_of_a_key_field_change_keeps_both_keys_cached(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Person, 1), (Person, {"email": ANN["email"]}), (Person, 2))
    with writing(engine, writer) as session:
        session.get(Person, 2).name = "Bobby"
        savepoint = session.begin_nested()
        session.get(Person, 1).email = "renamed@example.com"
        session.flush()
        savepoint.rollback()
        session.commit()
    assert reader.get(Person, 2) == {**BOB, "name": "Bobby"}
    assert reader.loads_during(lambda: reader.get(Person, 1)) == 0
    assert reader.loads_during(lambda: reader.get(Person, {"email": ANN["email"]})) == 0
    assert reader.get(Person, {"email": ANN["email"]}) == ANN
    assert reader.get(Person, {"email": "renamed@example.com"}) is None


def test_a_row_changed_before_a_rolled_back_savepoint_is_still_invalidated(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Item, 1))
    with writing(engine, writer) as session:
        item = session.get(Item, 1)
        item.name = "before the savepoint"
        session.flush()
        savepoint = session.begin_nested()
        item.name = "inside the savepoint"
        session.flush()
        savepoint.rollback()
        session.commit()
    assert reader.get(Item, 1) == {"id": 1, "name": "before the savepoint"}
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 0  # cached again


def test_released_savepoint_then_outer_rollback_discards_everything(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Item, 1))
    with writing(engine, writer) as session:
        with session.begin_nested():
            session.get(Item, 1).name = "inner"
        session.rollback()
    assert invalidations(writer, Item) == 0
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 0


# --- several changes of one row -----------------------------------------------------------------


def test_two_updates_of_one_row_in_one_transaction(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Person, 1), (Person, {"email": ANN["email"]}))
    with writing(engine, writer) as session:
        person = session.get(Person, 1)
        person.email, person.name = "ann.b@example.com", "Anna"
        session.flush()
        person.email, person.name = "ann.c@example.com", "Annie"
        session.commit()
    final = {"id": 1, "email": "ann.c@example.com", "name": "Annie"}
    assert reader.get(Person, 1) == final
    assert reader.get(Person, {"email": "ann.c@example.com"}) == final
    assert reader.get(Person, {"email": "ann.b@example.com"}) is None
    assert reader.get(Person, {"email": ANN["email"]}) is None


def test_insert_then_update_in_one_transaction(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    assert reader.get(Slot, 5) is None
    with writing(engine, writer) as session:
        slot = Slot(id=5, name="inserted")
        session.add(slot)
        session.flush()
        slot.name = "updated"
        session.commit()
    assert reader.get(Slot, 5) == {"id": 5, "name": "updated"}


def test_update_then_delete_in_one_transaction(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Person, 1), (Person, {"email": ANN["email"]}))
    with writing(engine, writer) as session:
        person = session.get(Person, 1)
        person.email = "gone@example.com"
        session.flush()
        session.delete(person)
        session.commit()
    assert reader.get(Person, 1) is None
    assert reader.get(Person, {"email": ANN["email"]}) is None
    assert reader.get(Person, {"email": "gone@example.com"}) is None


def test_key_field_change_invalidates_the_old_and_the_new_key(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    new_email = "anna@example.com"
    warm(reader, (Person, 1), (Person, {"email": ANN["email"]}))
    warm(reader, (Person, {"email": BOB["email"]}))
    with writing(engine, writer) as session:
        session.get(Person, 1).email = new_email
        session.commit()
    for key in ({"email": ANN["email"]}, {"email": new_email}, 1):  # right after the commit
        assert reader.manager.get(Person, key) is Lookup.MISS, key
    assert row(reader.manager.get(Person, {"email": BOB["email"]})) == BOB  # others stay cached
    changed = {**ANN, "email": new_email}
    assert reader.get(Person, {"email": new_email}) == changed
    assert reader.get(Person, {"email": ANN["email"]}) is None
    assert reader.get(Person, 1) == changed
    # Once the entity is cached again under its primary key, the old email still misses.
    assert reader.get(Person, {"email": ANN["email"]}) is None


def _change_email_of_an_expired_person(engine: Engine, writer: CacheManager) -> None:
    with writing(engine, writer) as session:
        person = session.get(Person, 1)
        session.commit()  # expire_on_commit: the old email is no longer loaded
        person.email = "anna@example.com"
        session.commit()


def test_key_field_change_of_an_expired_instance(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Person, 1), (Person, {"email": ANN["email"]}))
    _change_email_of_an_expired_person(engine, writer)
    assert reader.get(Person, 1) == {**ANN, "email": "anna@example.com"}
    assert reader.get(Person, {"email": ANN["email"]}) is None
    assert reader.get(Person, {"email": "anna@example.com"}) == {**ANN, "email": "anna@example.com"}


def test_key_field_change_of_an_expired_instance_invalidates_the_old_key(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Person, 1), (Person, {"email": ANN["email"]}))
    _change_email_of_an_expired_person(engine, writer)
    assert reader.get(Person, 1) == {**ANN, "email": "anna@example.com"}
    assert reader.get(Person, {"email": ANN["email"]}) is None
    assert reader.manager.stats()["Person"].errors == 0


def test_cascaded_delete_invalidates_the_cached_children(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Document, 1), (Document, 2))
    with writing(engine, writer) as session:
        session.delete(session.get(Folder, 1))
        session.commit()
    assert reader.get(Document, 1) is None
    assert reader.get(Document, 2) is None


def test_delete_orphan_invalidates_the_removed_child(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    """An orphan is deleted by the unit of work, never appearing in ``session.deleted``."""
    warm(reader, (Document, 1))
    with writing(engine, writer) as session:
        folder = session.get(Folder, 1)
        folder.documents.remove(session.get(Document, 1))
        session.commit()
    with writing(engine, writer) as session:
        assert session.get(Document, 1) is None  # the database deleted the orphan
    assert reader.get(Document, 1) is None


# --- bulk and textual statements ----------------------------------------------------------------

BULK_STATEMENTS = {
    "orm-update": lambda: update(Item).where(Item.id == 1).values(name="bulk"),
    "orm-delete": lambda: delete(Item).where(Item.id == 1),
    "orm-insert": lambda: insert(Item).values(id=9, name="bulk"),
    "table-update": lambda: (
        update(Item.__table__)  # type: ignore[arg-type]
        .where(Item.__table__.c.id == 1)  # type: ignore[attr-defined]
        .values(name="bulk")
    ),
}


@pytest.mark.parametrize("kind", list(BULK_STATEMENTS))
def test_bulk_statement_through_the_session_invalidates_the_whole_model(
    engine: Engine, writer: CacheManager, reader: Reader, kind: str
) -> None:
    warm(reader, (Item, 1), (Item, 2), (Item, 3))
    assert reader.get(Item, 9) is None
    with writing(engine, writer) as session:
        session.execute(BULK_STATEMENTS[kind]())
        session.commit()
    # Entities the statement did not touch miss too: the model's generation changed.
    assert reader.loads_during(lambda: reader.get(Item, 2)) == 1
    assert reader.loads_during(lambda: reader.get(Item, 3)) == 1
    expected_1 = {
        "orm-update": {"id": 1, "name": "bulk"},
        "orm-delete": None,
        "orm-insert": {"id": 1, "name": "item-1"},
        "table-update": {"id": 1, "name": "bulk"},
    }[kind]
    assert reader.get(Item, 1) == expected_1
    if kind == "orm-insert":
        assert reader.get(Item, 9) == {"id": 9, "name": "bulk"}
    assert reader.loads_during(lambda: reader.get(Item, 2)) == 0  # cached again


def test_bulk_insert_invalidates_a_cached_not_found(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    assert reader.get(Slot, 3) is None
    with writing(engine, writer) as session:
        session.execute(insert(Slot), [{"id": 3, "name": "three"}, {"id": 4, "name": "four"}])
        session.commit()
    assert reader.get(Slot, 3) == {"id": 3, "name": "three"}


def test_text_naming_its_models_invalidates_them(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Item, 1), (Item, 2))
    with writing(engine, writer) as session:
        session.execute(
            text("UPDATE inv_items SET name = 'text' WHERE id = 1"),
            execution_options={"invalidate_models": [Item]},
        )
        session.commit()
    assert reader.get(Item, 1) == {"id": 1, "name": "text"}
    assert reader.loads_during(lambda: reader.get(Item, 2)) == 1


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # one database is enough
def test_unseen_writes_stay_stale_until_the_ttl_expires(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    """Documented limit: declcache cannot see text() without ``invalidate_models``, nor Core
    statements on a bare connection; such writes are stale for at most the model's ttl
    (Note: 1 s), or until ``manager.invalidate_model(Model)``."""
    filled = time.monotonic()
    warm(reader, (Note, 1))
    with writing(engine, writer) as session:
        session.execute(text("UPDATE inv_notes SET body = 'by text' WHERE id = 1"))
        session.commit()
    with engine.begin() as connection:
        connection.execute(update(Note.__table__).values(body="by core"))  # type: ignore[arg-type]
    assert invalidations(writer, Note) == 0  # nothing told the cache
    stale = reader.get(Note, 1)
    if time.monotonic() - filled < 0.9:  # a very slow machine may already be past the ttl
        assert stale == {"id": 1, "body": "first"}  # stale, as documented
    time.sleep(max(0.0, filled + 1.05 - time.monotonic()))
    assert reader.get(Note, 1) == {"id": 1, "body": "by core"}


# --- manual invalidation ------------------------------------------------------------------------


def _rename_outside_the_orm(engine: Engine, model: type, ident: int, **values: Any) -> None:
    table = model.__table__  # type: ignore[attr-defined]
    with engine.begin() as connection:
        connection.execute(update(table).where(table.c.id == ident).values(**values))


def test_invalidate_by_primary_key_and_by_key_fields(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Person, 1), (Person, 2), (Item, 1), (Item, 2))
    _rename_outside_the_orm(engine, Item, 1, name="renamed")
    assert writer.invalidate(Item, 1) is True
    assert reader.get(Item, 1) == {"id": 1, "name": "renamed"}
    assert reader.loads_during(lambda: reader.get(Item, 2)) == 0  # only that entity
    _rename_outside_the_orm(engine, Person, 2, name="Robert")
    assert writer.invalidate(Person, {"email": BOB["email"]}) is True
    assert reader.get(Person, {"email": BOB["email"]}) == {**BOB, "name": "Robert"}
    assert reader.loads_during(lambda: reader.get(Person, 1)) == 0


def test_invalidate_by_key_fields_drops_the_entity_under_its_primary_key(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Person, 2), (Person, {"email": BOB["email"]}))
    _rename_outside_the_orm(engine, Person, 2, name="Robert")
    writer.invalidate(Person, {"email": BOB["email"]})
    assert reader.get(Person, 2) == {**BOB, "name": "Robert"}


def test_invalidate_model_drops_every_entity_and_list(
    engine: Engine, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Item, 1), (Item, 2), (Person, 1))
    reader.list_all(Item)
    with engine.begin() as connection:
        connection.execute(update(Item.__table__).values(name="core"))  # type: ignore[arg-type]
    assert writer.invalidate_model(Item) is True
    assert reader.get(Item, 1) == {"id": 1, "name": "core"}
    assert reader.get(Item, 2) == {"id": 2, "name": "core"}
    assert {item["name"] for item in reader.list_all(Item)} == {"core"}  # type: ignore[index]
    assert reader.loads_during(lambda: reader.get(Person, 1)) == 0  # other models untouched


def test_clear_drops_only_this_prefix(
    engine: Engine, writer: CacheManager, reader: Reader, cache_config: CacheConfig
) -> None:
    other_config = cache_config.with_overrides(key_prefix=f"{cache_config.key_prefix}other:")
    other = Reader(engine, CacheManager(other_config))
    warm(reader, (Item, 1), (Person, 1))
    warm(other, (Item, 1), (Person, 1))
    assert writer.clear() is True
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 1
    assert reader.loads_during(lambda: reader.get(Person, 1)) == 1
    assert other.loads_during(lambda: other.get(Item, 1)) == 0
    assert other.loads_during(lambda: other.get(Person, 1)) == 0


CLEAR_WITH_A_DISPOSED_MODEL = """
from sqlalchemy.orm import DeclarativeBase, Mapped, configure_mappers, mapped_column
from declcache import CacheConfig, CacheManager

class Base(DeclarativeBase):
    pass

class Gone(Base):
    __tablename__ = "gone"
    id: Mapped[int] = mapped_column(primary_key=True)

    class CacheMeta:
        ttl = 60

configure_mappers()
Base.registry.dispose()  # e.g. a test's throw-away models, or a reloaded module
CacheManager(CacheConfig(key_prefix="p:")).clear()
"""


def test_clear_ignores_a_model_whose_registry_was_disposed() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CLEAR_WITH_A_DISPOSED_MODEL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_sessions_without_a_manager_use_the_default_one(
    engine: Engine, writer: CacheManager, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(_frames._state, "default", None)  # restored afterwards
    setup_cache_listeners(default_manager=writer)
    warm(reader, (Item, 1))
    with Session(engine) as session:  # no cache_manager in session.info
        session.get(Item, 1).name = "default"
        session.commit()
    assert reader.get(Item, 1) == {"id": 1, "name": "default"}


# --- other processes, async sessions ------------------------------------------------------------

WRITE_FROM_ANOTHER_PROCESS = """
import json, sys
from sqlalchemy import create_engine
from declcache import CacheConfig, CacheManager, setup_cache_listeners
from tests.integration._invalidation_models import Item, writing

args = json.loads(sys.argv[1])
setup_cache_listeners()
config = CacheConfig(
    backend="dogpile.cache.redis",
    arguments={"host": args["host"], "port": args["port"]},
    key_prefix=args["prefix"],
)
engine = create_engine(args["url"])
with writing(engine, CacheManager(config)) as session:
    session.add(Item(id=10, name="from another process"))
    session.commit()
engine.dispose()
"""


@pytest.fixture
def redis_prefix(redis_address: tuple[str, int], key_prefix: str) -> Iterator[str]:
    """``key_prefix`` on the shared Redis, its keys deleted afterwards (tokens live a day)."""
    yield key_prefix
    delete_redis_keys(*redis_address, key_prefix)


def test_list_version_bumped_by_another_process(
    engine: Engine, redis_address: tuple[str, int], redis_prefix: str
) -> None:
    host, port = redis_address
    key_prefix = redis_prefix
    config = CacheConfig(
        backend="dogpile.cache.redis",
        arguments={"host": host, "port": port},
        key_prefix=key_prefix,
    )
    reader = Reader(engine, CacheManager(config))
    assert len(reader.list_all(Item)) == 3
    assert reader.loads_during(lambda: reader.list_all(Item)) == 0
    args = {"host": host, "port": port, "prefix": key_prefix, "url": _url_of(engine)}
    subprocess.run(
        [sys.executable, "-c", WRITE_FROM_ANOTHER_PROCESS, json.dumps(args)],
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    # A list read in this process, right after the other process's commit returned, misses.
    assert reader.loads_during(lambda: reader.list_all(Item)) == 1
    assert reader.list_all(Item)[-1] == {"id": 10, "name": "from another process"}


def _url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


@pytest.fixture
def async_engine(engine: Engine, database: str, request: pytest.FixtureRequest) -> Any:
    if database == "sqlite":
        return create_async_engine(engine.url.set(drivername="sqlite+aiosqlite"))
    return create_async_engine(request.getfixturevalue("postgres_async_url"))


async def test_async_commit_invalidates_before_it_returns(
    async_engine: Any, writer: CacheManager, reader: Reader
) -> None:
    warm(reader, (Item, 1), (Person, {"email": ANN["email"]}))
    try:
        async with AsyncSession(async_engine, info={"cache_manager": writer}) as session:
            item = await session.get(Item, 1)
            item.name = "async"
            person = (await session.scalars(select(Person).filter_by(id=1))).one()
            person.name = "Async Ann"
            await session.commit()
            # Right after the commit returned, nothing reads the old rows any more.
            assert reader.manager.get(Item, 1) is Lookup.MISS
            assert reader.manager.get(Person, {"email": ANN["email"]}) is Lookup.MISS
    finally:
        await async_engine.dispose()
    assert reader.get(Item, 1) == {"id": 1, "name": "async"}
    assert reader.get(Person, {"email": ANN["email"]}) == {**ANN, "name": "Async Ann"}
