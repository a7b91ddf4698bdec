"""advanced-alchemy's serializer pair works as it is written: model functions, checked hits.

Issue 13 part 3: ``serializer(model) -> bytes`` and ``deserializer(data, model_class) ->
model``, given as ``CacheConfig(serializer=..., deserializer=...)`` or in CacheMeta, used to be
called with declcache's payload lists: every fill failed and every read went to the database.
Now the pair is recognised (its deserializer takes two positional arguments) and each cached
row is the bytes the user's serializer made. Hits are proven by counting the SQL statements
(``before_cursor_execute``); a deserializer that returns the wrong type or another row is
refused: a miss, counted as an error, never the wrong object. Every backend; SQLite; rows from
factory-boy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import factory
import msgpack
import pytest
from sqlalchemy import String, create_engine, inspect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from declcache import CacheManager
from declcache.repository import SQLAlchemySyncRepository

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine

    from declcache import CacheConfig
    from tests.integration.conftest import StatementLog


# -- the pair exactly as advanced-alchemy's caching page writes it ------------------------------


def msgpack_serializer(model):  # type: ignore[no-untyped-def]
    # Convert model to dict and serialize with msgpack
    from sqlalchemy import inspect

    mapper = inspect(model.__class__)
    data = {col.key: getattr(model, col.key) for col in mapper.columns}
    return msgpack.packb(data)


def msgpack_deserializer(data, model_class):  # type: ignore[no-untyped-def]
    unpacked = msgpack.unpackb(data)
    return model_class(**unpacked)


# -- models -------------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Columns:
    """The columns of every model here: simple types, so the reference's msgpack round-trips."""

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    stock: Mapped[int]


class Gadget(Columns, Base):
    __tablename__ = "model_pair_gadgets"

    class CacheMeta:
        ttl = 600


class Widget(Columns, Base):
    """Cached with the pair named in its CacheMeta, not by the manager's default."""

    __tablename__ = "model_pair_widgets"

    class CacheMeta:
        serializer = (msgpack_serializer, msgpack_deserializer)


class Lookalike(Columns, Base):
    """Same columns as Gadget: what a careless deserializer might build instead."""

    __tablename__ = "model_pair_lookalikes"


class GadgetFactory(factory.Factory):
    class Meta:
        model = Gadget

    id = factory.Sequence(lambda n: n + 1)
    name = factory.Faker("word")
    stock = factory.Faker("pyint", max_value=500)


class WidgetFactory(GadgetFactory):
    class Meta:
        model = Widget


class GadgetRepo(SQLAlchemySyncRepository[Gadget]):
    model_type = Gadget


class WidgetRepo(SQLAlchemySyncRepository[Widget]):
    model_type = Widget


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'model_pair.sqlite'}")
    Base.metadata.create_all(engine)
    GadgetFactory.reset_sequence(0)
    WidgetFactory.reset_sequence(0)
    with Session(engine) as session:
        session.add_all(GadgetFactory.build_batch(3))
        session.add_all(WidgetFactory.build_batch(3))
        session.commit()
    yield engine
    engine.dispose()


def columns(instance: object) -> dict[str, Any]:
    return {attr.key: getattr(instance, attr.key) for attr in inspect(type(instance)).column_attrs}


def database_row(db: Engine, model: type, ident: int) -> dict[str, Any]:
    with Session(db) as session:
        return columns(session.get(model, ident))


def pair_manager(cache_config: CacheConfig, deserializer: Callable[..., Any]) -> CacheManager:
    return CacheManager(
        cache_config.with_overrides(serializer=msgpack_serializer, deserializer=deserializer)
    )


# -- hits ---------------------------------------------------------------------------------------


def test_the_reference_pair_as_the_config_default_serves_gets_from_the_cache(
    cache_config: CacheConfig, db: Engine, statements: Callable[[Engine], StatementLog]
) -> None:
    manager = pair_manager(cache_config, msgpack_deserializer)
    with Session(db) as session:
        GadgetRepo(session=session, cache_manager=manager).get(2)  # the database, then a fill

    log = statements(db)
    with Session(db) as session:
        cached = GadgetRepo(session=session, cache_manager=manager).get(2)
        assert columns(cached) == database_row(db, Gadget, 2)
    assert len(log) == 1  # database_row's own SELECT only: the get was a hit

    stats = manager.stats()["Gadget"]
    assert (stats.hits, stats.fills, stats.errors) == (1, 1, 0)
    assert manager.spec(Gadget) is not None
    assert manager.spec(Gadget).serializer.startswith("model-pair:")  # type: ignore[union-attr]


def test_the_reference_pair_serves_lists_from_the_cache(
    cache_config: CacheConfig, db: Engine, statements: Callable[[Engine], StatementLog]
) -> None:
    manager = pair_manager(cache_config, msgpack_deserializer)
    with Session(db) as session:
        expected = [columns(g) for g in GadgetRepo(session=session, cache_manager=manager).list()]

    log = statements(db)
    with Session(db) as session:
        cached = GadgetRepo(session=session, cache_manager=manager).list(order_by=None)
        count = len(cached)

    assert len(log) == 0
    assert count == 3
    assert [columns(g) for g in cached] == expected
    assert manager.stats()["Gadget"].errors == 0


def test_the_reference_pair_in_cache_meta(
    cache_config: CacheConfig, db: Engine, statements: Callable[[Engine], StatementLog]
) -> None:
    manager = CacheManager(cache_config)
    with Session(db) as session:
        WidgetRepo(session=session, cache_manager=manager).get(3)

    log = statements(db)
    with Session(db) as session:
        cached = WidgetRepo(session=session, cache_manager=manager).get(3)
        assert columns(cached) == {**database_row(db, Widget, 3)}
    assert len(log) == 1
    assert manager.stats()["Widget"].hits == 1


# -- refusals -----------------------------------------------------------------------------------


def wrong_type(data: bytes, model_class: type) -> Any:
    return Lookalike(**msgpack.unpackb(data))


def another_row(data: bytes, model_class: type) -> Any:
    unpacked = msgpack.unpackb(data)
    return model_class(**{**unpacked, "id": unpacked["id"] + 100, "name": "forged"})


def failing(data: bytes, model_class: type) -> Any:
    raise RuntimeError("cannot decode")


REFUSED = [
    pytest.param(wrong_type, id="wrong-type"),
    pytest.param(another_row, id="another-row"),
    pytest.param(failing, id="raises"),
]


def get_one(repo: GadgetRepo) -> list[Gadget]:
    return [repo.get(1)]


def list_all(repo: GadgetRepo) -> list[Gadget]:
    return list(repo.list())


@pytest.mark.parametrize("read", [get_one, list_all], ids=["get", "list"])
@pytest.mark.parametrize("deserializer", REFUSED)
def test_a_bad_deserialized_row_is_a_counted_miss(
    cache_config: CacheConfig,
    db: Engine,
    statements: Callable[[Engine], StatementLog],
    deserializer: Callable[..., Any],
    read: Callable[[GadgetRepo], list[Gadget]],
) -> None:
    manager = pair_manager(cache_config, deserializer)
    with Session(db) as session:
        expected = [columns(g) for g in read(GadgetRepo(session=session, cache_manager=manager))]

    log = statements(db)
    with Session(db) as session:
        found = read(GadgetRepo(session=session, cache_manager=manager))
        assert [columns(g) for g in found] == expected  # the database's rows, not forged ones
        assert all(type(g) is Gadget for g in found)

    assert len(log.of_kind("SELECT")) == 1  # the read went to the database
    stats = manager.stats()["Gadget"]
    assert stats.hits == 0
    assert stats.errors >= 1
