"""Every private API of another library declcache relies on still does what it is used for.

``declcache/_private_apis.py`` is the one module that touches private names of SQLAlchemy,
dogpile.cache and redis-py (and valkey-py). A new release may move any of them; each test
below calls one against the installed versions, so such a release fails here, naming the API,
instead of somewhere deep in a cache read.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from dogpile.cache import make_region
from dogpile.cache import region as dogpile_region
from sqlalchemy import Integer, String, create_engine, event, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, reconstructor
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.util import greenlet_spawn

from declcache import _payload, _private_apis
from tests import _servers

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy.engine import Connection
    from sqlalchemy.pool import PoolProxiedConnection


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "things"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)


class Labelled(Base):
    __tablename__ = "labelled"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[str] = mapped_column(String(20))

    @reconstructor
    def _on_load(self) -> None:
        self.reconstructed = True


def test_session_is_clean_tells_a_session_with_changes() -> None:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        assert _private_apis.session_is_clean(session)
        session.add(Thing(id=1))
        assert not _private_apis.session_is_clean(session)
        session.flush()
        assert _private_apis.session_is_clean(session)
        session.get(Thing, 1).id = 2  # type: ignore[union-attr]
        assert not _private_apis.session_is_clean(session)


def _new_row(ident: int, label: str) -> Labelled:
    """A new ``Labelled`` holding a row's values and its identity key, as a load makes one."""
    item = Labelled.__mapper__.class_manager.new_instance()
    state = instance_state(item)
    state.dict.update({"id": ident, "label": label})
    state.key = Labelled.__mapper__.identity_key_from_primary_key((ident,))
    return item


def test_load_as_persistent_enters_states_as_a_load_does() -> None:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    fired: list[tuple[str, Any]] = []

    def loaded(_target: Any, context: Any) -> None:
        fired.append(("load", context))

    event.listen(Labelled, "load", loaded)
    try:
        with Session(engine) as session:
            event.listen(session, "loaded_as_persistent", lambda _, it: fired.append(("as", it)))
            rows = [_new_row(1, "one"), _new_row(2, "two")]
            states = [instance_state(row) for row in rows]
            _private_apis.load_as_persistent(session, states)

            assert all(state.persistent and not state.modified for state in states)
            assert session.get(Labelled, 1) is rows[0]  # from the identity map, no query
            assert rows[0].reconstructed  # the mapper's own load listener ran too
            assert fired == [("load", None), ("load", None), ("as", rows[0]), ("as", rows[1])]
            rows[0].label = "changed"
            assert list(session.dirty) == [rows[0]]
    finally:
        event.remove(Labelled, "load", loaded)


def test_refresh_as_loaded_commits_refilled_attributes_and_fires_refresh() -> None:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    refreshed: list[tuple[Any, Any]] = []

    def refresh(_target: Any, context: Any, keys: Any) -> None:
        refreshed.append((context, keys))

    event.listen(Labelled, "refresh", refresh)
    try:
        with Session(engine) as session:
            row = _new_row(1, "one")
            state = instance_state(row)
            _private_apis.load_as_persistent(session, [state])
            session.expire(row)
            state.dict.update({"id": 1, "label": "two"})
            _private_apis.refresh_as_loaded(state, ["id", "label"])

            assert not state.expired
            assert not state.expired_attributes
            assert not state.modified
            event.listen(engine, "before_cursor_execute", pytest.fail)  # no query from here
            assert row.label == "two"
            assert refreshed == [(None, ["id", "label"])]
    finally:
        event.remove(Labelled, "refresh", refresh)


def test_held_connection_is_the_transactions_connection_with_its_options() -> None:
    engine = create_engine("sqlite://")
    with Session(engine) as session:
        assert _private_apis.held_connection(session, engine) is None  # nothing begun
        session.begin()
        assert _private_apis.held_connection(session, engine) is None  # no connection yet
        schemas = {None: "tenant_b"}
        connection = session.connection(execution_options={"schema_translate_map": schemas})
        held = _private_apis.held_connection(session, engine)
        assert held is connection
        assert held.get_execution_options()["schema_translate_map"] == schemas
        session.begin_nested()
        assert _private_apis.held_connection(session, engine) is connection


def test_after_dbapi_commit_runs_after_the_root_transactions_commit() -> None:
    engine = create_engine("sqlite://")
    untouched = create_engine("sqlite://")  # another dialect instance: not wrapped
    seen: list[tuple[PoolProxiedConnection, bool]] = []
    _private_apis.after_dbapi_commit(
        engine.dialect,
        lambda dbapi: seen.append((dbapi, dbapi.dbapi_connection.in_transaction)),  # type: ignore[union-attr]
    )
    with engine.connect() as connection:
        connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        connection.commit()
        seen.clear()
        connection.begin()
        connection.exec_driver_sql("INSERT INTO t VALUES (1)")
        assert seen == []  # nothing before the COMMIT
        connection.commit()

        assert len(seen) == 1
        dbapi, still_open = seen[0]
        assert dbapi is connection.connection
        assert dbapi.info is connection.info  # the pool record's info: what waits there
        assert not still_open  # called after the database committed
    with untouched.begin() as other:
        other.exec_driver_sql("SELECT 1")
    assert len(seen) == 1


def test_sqlite_in_transaction_tells_a_transaction_begun_by_sql() -> None:
    engine = create_engine("sqlite://")
    with engine.connect() as connection:
        _check_sqlite_in_transaction(connection)


def test_sqlite_in_transaction_reaches_through_the_aiosqlite_adapter() -> None:
    async def check() -> None:
        engine = create_async_engine("sqlite+aiosqlite://")
        async with engine.connect() as connection:
            await connection.run_sync(_check_sqlite_in_transaction)
        await engine.dispose()

    asyncio.run(check())


def _check_sqlite_in_transaction(connection: Connection) -> None:
    """A transaction begun by SQL, as the pysqlite ``BEGIN`` recipe begins it."""
    assert _private_apis.sqlite_in_transaction(connection) is False
    connection.exec_driver_sql("BEGIN")
    assert _private_apis.sqlite_in_transaction(connection) is True
    connection.exec_driver_sql("COMMIT")
    assert _private_apis.sqlite_in_transaction(connection) is False


def test_statement_cache_key_separates_shape_from_values() -> None:
    one = _private_apis.statement_cache_key(select(Thing).where(Thing.id == 1))
    two = _private_apis.statement_cache_key(select(Thing).where(Thing.id == 2))
    other = _private_apis.statement_cache_key(select(Thing).where(Thing.id > 1))

    assert one is not None
    assert two is not None
    assert other is not None
    assert one.key == two.key != other.key
    assert [param.value for param in one.bindparams] == [1]


def test_dbm_opener_opens_the_file_under_dogpiles_lock(tmp_path: Path) -> None:
    region = make_region().configure(
        "dogpile.cache.dbm", arguments={"filename": str(tmp_path / "cache.dbm")}
    )
    opener = _private_apis.dbm_opener(region.backend)

    with opener(True) as db:
        db["key"] = b"value"
    with opener(False) as db:
        assert db["key"] == b"value"


@pytest.mark.parametrize("client", ["redis", "valkey"])
def test_resp3_parser_handles_invalidation_pushes(client: str) -> None:
    parser = _private_apis.resp3_parser(client)

    assert parser.__name__ == "_RESP3Parser"
    assert callable(parser.set_invalidation_push_handler)  # type: ignore[attr-defined]


def test_socket_of_a_connected_redis_connection() -> None:
    import redis

    host, port = _servers.redis_address()
    connection = redis.Connection(host=host, port=port)
    assert _private_apis.socket_of(connection) is None
    connection.connect()
    try:
        assert _private_apis.socket_of(connection).fileno() >= 0
    finally:
        connection.disconnect()


def test_set_push_handler_on_a_resp3_connection() -> None:
    import redis

    host, port = _servers.redis_address()
    parser = _private_apis.resp3_parser("redis")
    connection = redis.Connection(host=host, port=port, protocol=3, parser_class=parser)
    connection.connect()
    try:
        _private_apis.set_push_handler(connection, lambda message: message)
    finally:
        connection.disconnect()


def test_await_only_runs_a_coroutine_from_sqlalchemys_greenlet() -> None:
    def inside() -> tuple[bool, int]:
        return _private_apis.in_greenlet(), _private_apis.await_only(asyncio.sleep(0, result=5))

    assert not _private_apis.in_greenlet()
    assert asyncio.run(greenlet_spawn(inside)) == (True, 5)


def test_payloads_use_dogpiles_value_layout_version() -> None:
    assert _payload.value_version == dogpile_region.value_version


def test_cache_items_and_lru_order_are_cachetools_own_state() -> None:
    import cachetools

    lru: cachetools.LRUCache[str, int] = cachetools.LRUCache(2)
    lru["a"], lru["b"] = 1, 2
    items, order = _private_apis.cache_items(lru), _private_apis.lru_order(lru)
    assert items == {"a": 1, "b": 2}
    assert list(order) == ["a", "b"]  # least recently used first
    order.move_to_end("a")  # what a read through the private view does
    lru["c"] = 3  # evicts the least recently used: now "b"
    assert set(items) == {"a", "c"}
    assert _private_apis.cache_items(cachetools.Cache(4)) == {}


def test_class_loader_is_what_an_unloaded_relationship_access_calls() -> None:
    from sqlalchemy import ForeignKey
    from sqlalchemy.orm import configure_mappers, relationship

    class Base(DeclarativeBase):
        pass

    class Parent(Base):
        __tablename__ = "loader_parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        children: Mapped[list[Child]] = relationship()

    class Child(Base):
        __tablename__ = "loader_children"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int] = mapped_column(ForeignKey("loader_parents.id"))

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    configure_mappers()
    mapper = Parent.__mapper__
    original = _private_apis.class_loader(mapper, "children")
    assert callable(original)
    calls: list[str] = []

    def loader(state: Any, passive: Any) -> Any:
        calls.append(state.key[1][0])
        return [Child(id=9, parent_id=1)]

    _private_apis.set_class_loader(mapper, "children", loader)
    try:
        with Session(engine) as session:
            session.add(Parent(id=1))
            session.commit()
            parent = session.get(Parent, 1)
            assert parent is not None
            assert [child.id for child in parent.children] == [9]
    finally:
        _private_apis.set_class_loader(mapper, "children", original)  # type: ignore[arg-type]
    assert calls == [1]
    assert _private_apis.class_loader(mapper, "children") is original
