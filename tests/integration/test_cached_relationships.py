"""``CacheMeta.cached_relationships``: a parent hit and its cached relationships cost 0 queries.

A writer that shares only the cache backend with the reader (its own engine, its own
manager: another process, as far as the reader can tell; one test runs it in a real child
process) changes a collection: a member inserted, deleted, moved to another parent, an
association row added or removed by either side or by a Core statement. The reader's next
access sees the change. On SQLite and PostgreSQL, with the memory backend (one manager for
both sides: one process) and Redis.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import factory
import pytest
from sqlalchemy import Column, ForeignKey, Integer, String, Table, create_engine, delete, insert
from sqlalchemy.exc import MissingGreenlet
from sqlalchemy.ext.asyncio import AsyncAttrs, async_sessionmaker, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    configure_mappers,
    mapped_column,
    relationship,
)
from sqlalchemy.orm.mapper import _CONFIGURE_MUTEX

from declcache import CacheConfig, CacheManager, setup_cache_listeners
from declcache.exceptions import CacheMetaError
from declcache.repository import SQLAlchemyAsyncRepository, SQLAlchemySyncRepository

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Engine

    from tests.integration.conftest import StatementLog


class Base(AsyncAttrs, DeclarativeBase):
    pass


memberships = Table(
    "relc_memberships",
    Base.metadata,
    Column("writer_id", ForeignKey("relc_writers.id"), primary_key=True),
    Column("club_id", ForeignKey("relc_clubs.id"), primary_key=True),
)


class Writer(Base):
    __tablename__ = "relc_writers"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    essays: Mapped[list[Essay]] = relationship(back_populates="writer", order_by="Essay.id")
    clubs: Mapped[list[Club]] = relationship(
        secondary=memberships, back_populates="writers", order_by="Club.id"
    )

    class CacheMeta:
        ttl = 300
        cached_relationships = ("essays", "clubs")


class Essay(Base):
    __tablename__ = "relc_essays"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(String(50))
    writer_id: Mapped[int | None] = mapped_column(ForeignKey("relc_writers.id"))
    writer: Mapped[Writer | None] = relationship(back_populates="essays")

    class CacheMeta:
        ttl = 300
        cached_relationships = ("writer",)


class Club(Base):
    __tablename__ = "relc_clubs"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    writers: Mapped[list[Writer]] = relationship(
        secondary=memberships, back_populates="clubs", order_by="Writer.id"
    )

    class CacheMeta:
        ttl = 300
        cached_relationships = ("writers",)


class WriterFactory(factory.Factory):
    class Meta:
        model = Writer

    id = factory.Sequence(lambda n: n + 1)
    name = factory.Sequence(lambda n: f"writer {n + 1}")


class EssayFactory(factory.Factory):
    class Meta:
        model = Essay

    id = factory.Sequence(lambda n: n + 1)
    title = factory.Sequence(lambda n: f"essay {n + 1}")


class ClubFactory(factory.Factory):
    class Meta:
        model = Club

    id = factory.Sequence(lambda n: n + 1)
    name = factory.Sequence(lambda n: f"club {n + 1}")


class WriterRepo(SQLAlchemySyncRepository[Writer]):
    model_type = Writer


class EssayRepo(SQLAlchemySyncRepository[Essay]):
    model_type = Essay


class AsyncWriterRepo(SQLAlchemyAsyncRepository[Writer]):
    model_type = Writer


@pytest.fixture(params=["memory", "redis"])
def cache_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'relations.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(autouse=True)
def _reset() -> None:
    setup_cache_listeners()
    for made in (WriterFactory, EssayFactory, ClubFactory):
        made.reset_sequence(0)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def reader(cache_config: CacheConfig) -> Iterator[CacheManager]:
    manager = CacheManager(cache_config)
    yield manager
    manager.close()


@pytest.fixture
def writer_manager(
    cache_backend: str, cache_config: CacheConfig, reader: CacheManager
) -> Iterator[CacheManager]:
    """The writing side: its own manager on a shared backend (one process on memory)."""
    if cache_backend == "memory":
        yield reader
        return
    manager = CacheManager(cache_config)
    yield manager
    manager.close()


@pytest.fixture
def writer_engine(engine: Engine, database_url: str) -> Iterator[Engine]:
    other = create_engine(database_url)
    yield other
    other.dispose()


@dataclass
class Sides:
    """The reading side and the writing side (another engine, another manager)."""

    engine: Engine
    reader: CacheManager
    writer_engine: Engine
    writer: CacheManager


@pytest.fixture
def sides(
    engine: Engine, reader: CacheManager, writer_engine: Engine, writer_manager: CacheManager
) -> Sides:
    return Sides(engine, reader, writer_engine, writer_manager)


def _seed(engine: Engine) -> None:
    with Session(engine) as session:
        clubs = [ClubFactory() for _ in range(2)]
        first, second = WriterFactory(), WriterFactory()
        first.essays = [EssayFactory(), EssayFactory()]
        second.essays = [EssayFactory()]
        first.clubs = [clubs[0]]
        second.clubs = list(clubs)
        session.add_all([first, second])
        session.commit()


def _warm(engine: Engine, manager: CacheManager) -> None:
    """Read writer 1, its essays and clubs, and each club's writers: every cache filled.

    Twice: the first read fills the collections from SQLAlchemy's lazy loads; the members
    those loads read fill their entity cache the next time they are asked for through it.
    """
    for _ in range(2):
        with Session(engine, info={"cache_manager": manager}) as session:
            writer = WriterRepo(session=session).get(1)
            for essay in writer.essays:
                assert essay.writer is writer
            for club in writer.clubs:
                assert club.writers
        with Session(engine, info={"cache_manager": manager}) as session:
            for essay in EssayRepo(session=session).get_many([1, 2, 3]):
                assert essay is not None
                assert essay.writer is not None


def _essays(engine: Engine, manager: CacheManager, writer_id: int = 1) -> list[str]:
    with Session(engine, info={"cache_manager": manager}) as session:
        return [essay.title for essay in WriterRepo(session=session).get(writer_id).essays]


def _clubs(engine: Engine, manager: CacheManager, writer_id: int = 1) -> list[str]:
    with Session(engine, info={"cache_manager": manager}) as session:
        return [club.name for club in WriterRepo(session=session).get(writer_id).clubs]


def _club_writers(engine: Engine, manager: CacheManager, club_id: int) -> list[str]:
    with Session(engine, info={"cache_manager": manager}) as session:
        club = session.get(Club, club_id)
        assert club is not None
        return [writer.name for writer in club.writers]


# -- hits cost no query --------------------------------------------------------------------------


def test_a_parent_hit_and_its_cached_collections_cost_no_query(
    engine: Engine, reader: CacheManager, statements: Any
) -> None:
    _seed(engine)
    _warm(engine, reader)
    log: StatementLog = statements(engine)

    with log.fresh() as sent, Session(engine, info={"cache_manager": reader}) as session:
        writer = WriterRepo(session=session).get(1)
        titles = [essay.title for essay in writer.essays]
        clubs = [club.name for club in writer.clubs]
        back = [essay.writer for essay in writer.essays]

    assert sent == []
    assert titles == ["essay 1", "essay 2"]
    assert clubs == ["club 1"]
    assert back == [writer, writer]


def test_a_cached_many_to_one_is_one_entity_read(
    engine: Engine, reader: CacheManager, statements: Any
) -> None:
    _seed(engine)
    _warm(engine, reader)
    log: StatementLog = statements(engine)

    with log.fresh() as sent, Session(engine, info={"cache_manager": reader}) as session:
        essay = EssayRepo(session=session).get(3)
        name = essay.writer.name if essay.writer is not None else None

    assert sent == []
    assert name == "writer 2"


def test_a_miss_loads_the_collection_once_and_fills_the_cache(
    engine: Engine, reader: CacheManager, statements: Any
) -> None:
    _seed(engine)
    log: StatementLog = statements(engine)

    with log.fresh() as sent:
        assert _essays(engine, reader) == ["essay 1", "essay 2"]
    first = list(sent)
    with log.fresh() as sent:
        assert _essays(engine, reader) == ["essay 1", "essay 2"]
    second = list(sent)
    with log.fresh() as sent:
        assert _essays(engine, reader) == ["essay 1", "essay 2"]

    assert len(first) == 2  # the writer, its essays (which fill the collection)
    assert len(second) == 1  # the essays by id: the collection's members fill their cache
    assert sent == []


# -- another process's change is seen by the next read -------------------------------------------


def _insert_essay(engine: Engine, manager: CacheManager) -> None:
    with Session(engine, info={"cache_manager": manager}) as session:
        session.add(Essay(id=10, title="late essay", writer_id=1))
        session.commit()


def _delete_essay(engine: Engine, manager: CacheManager) -> None:
    with Session(engine, info={"cache_manager": manager}) as session:
        session.delete(session.get(Essay, 2))
        session.commit()


def _move_essay(engine: Engine, manager: CacheManager) -> None:
    with Session(engine, info={"cache_manager": manager}) as session:
        essay = session.get(Essay, 2)
        assert essay is not None
        essay.writer_id = 2
        session.commit()


def _core_insert_essay(engine: Engine, manager: CacheManager) -> None:
    with Session(engine, info={"cache_manager": manager}) as session:
        session.execute(insert(Essay.__table__).values(id=11, title="core essay", writer_id=1))
        session.commit()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_insert_essay, ["essay 1", "essay 2", "late essay"]),
        (_delete_essay, ["essay 1"]),
        (_move_essay, ["essay 1"]),
        (_core_insert_essay, ["essay 1", "essay 2", "core essay"]),
    ],
    ids=["member-inserted", "member-deleted", "foreign-key-changed", "core-insert"],
)
def test_a_collection_change_elsewhere_is_seen_by_the_next_read(
    sides: Sides, change: Any, expected: list[str]
) -> None:
    _seed(sides.engine)
    _warm(sides.engine, sides.reader)
    assert _essays(sides.engine, sides.reader) == ["essay 1", "essay 2"]

    change(sides.writer_engine, sides.writer)

    assert _essays(sides.engine, sides.reader) == expected


def _join(engine: Engine, manager: CacheManager, *, from_club: bool) -> None:
    with Session(engine, info={"cache_manager": manager}) as session:
        writer, club = session.get(Writer, 1), session.get(Club, 2)
        assert writer is not None
        assert club is not None
        if from_club:
            club.writers.append(writer)
        else:
            writer.clubs.append(club)
        session.commit()


_join_from_writer = functools.partial(_join, from_club=False)
_join_from_club = functools.partial(_join, from_club=True)


def _join_by_core(engine: Engine, manager: CacheManager) -> None:
    with Session(engine, info={"cache_manager": manager}) as session:
        session.execute(insert(memberships).values(writer_id=1, club_id=2))
        session.commit()


def _leave_by_core(engine: Engine, manager: CacheManager) -> None:
    with Session(engine, info={"cache_manager": manager}) as session:
        session.execute(delete(memberships).where(memberships.c.writer_id == 1))
        session.commit()


@pytest.mark.parametrize(
    ("change", "clubs", "club_2_writers"),
    [
        (_join_from_writer, ["club 1", "club 2"], ["writer 1", "writer 2"]),
        (_join_from_club, ["club 1", "club 2"], ["writer 1", "writer 2"]),
        (_join_by_core, ["club 1", "club 2"], ["writer 1", "writer 2"]),
        (_leave_by_core, [], ["writer 2"]),
    ],
    ids=["orm-from-parent", "orm-from-member", "core-insert", "core-delete"],
)
def test_an_association_change_elsewhere_is_seen_from_both_sides(
    sides: Sides, change: Any, clubs: list[str], club_2_writers: list[str]
) -> None:
    _seed(sides.engine)
    _warm(sides.engine, sides.reader)
    assert _clubs(sides.engine, sides.reader) == ["club 1"]
    assert _club_writers(sides.engine, sides.reader, 2) == ["writer 2"]

    change(sides.writer_engine, sides.writer)

    assert _clubs(sides.engine, sides.reader) == clubs
    assert _club_writers(sides.engine, sides.reader, 2) == club_2_writers


def _change_in_child(database_url: str, address: tuple[str, int], key_prefix: str) -> None:
    setup_cache_listeners()
    engine = create_engine(database_url)
    host, port = address
    manager = CacheManager(
        CacheConfig(
            backend="dogpile.cache.redis",
            arguments={"host": host, "port": port},
            key_prefix=key_prefix,
        )
    )
    _insert_essay(engine, manager)
    manager.close()
    engine.dispose()


@pytest.mark.parametrize("cache_backend", ["redis"])  # shared with another process
def test_a_change_made_by_another_process_is_seen(
    engine: Engine,
    database_url: str,
    cache_config: CacheConfig,
    redis_address: tuple[str, int],
    key_prefix: str,
) -> None:
    manager = CacheManager(cache_config)
    _seed(engine)
    _warm(engine, manager)
    assert _essays(engine, manager) == ["essay 1", "essay 2"]

    child = multiprocessing.get_context("spawn").Process(
        target=_change_in_child, args=(database_url, redis_address, key_prefix)
    )
    child.start()
    child.join(60)

    assert child.exitcode == 0
    assert _essays(engine, manager) == ["essay 1", "essay 2", "late essay"]
    manager.close()


# -- the session's own writes and the cache's faults ---------------------------------------------


def test_a_session_writing_a_model_reads_its_relationships_from_the_database(
    engine: Engine, reader: CacheManager
) -> None:
    _seed(engine)
    _warm(engine, reader)

    with Session(engine, info={"cache_manager": reader}) as session:
        session.add(Essay(id=12, title="draft", writer_id=1))
        session.flush()
        writer = WriterRepo(session=session).get(1)
        titles = [essay.title for essay in writer.essays]
        session.rollback()

    assert titles == ["essay 1", "essay 2", "draft"]
    assert _essays(engine, reader) == ["essay 1", "essay 2"]


def test_a_corrupt_collection_entry_is_a_miss(
    engine: Engine, reader: CacheManager, statements: Any
) -> None:
    _seed(engine)
    _warm(engine, reader)
    cache = reader._usable(Essay, reader.scope(Session(engine), Essay))  # type: ignore[arg-type]
    assert cache is not None
    with Session(engine, info={"cache_manager": reader}) as session:
        writer = session.get(Writer, 1)
        from declcache._associations import collection_key

        key = cache.keys.list_key(collection_key(Writer.essays.property, writer._sa_instance_state))  # type: ignore[union-attr]
    cache.store.write_many([(key, b"\x00not a payload", 60)])

    assert _essays(engine, reader) == ["essay 1", "essay 2"]


def test_a_backend_that_is_down_costs_the_cache_not_the_relationship(
    engine: Engine, private_redis: Any, key_prefix: str
) -> None:
    config = CacheConfig(
        backend="dogpile.cache.redis",
        arguments={"host": "127.0.0.1", "port": private_redis.port},
        key_prefix=key_prefix,
    )
    manager = CacheManager(config)
    _seed(engine)
    _warm(engine, manager)
    private_redis.stop()

    assert _essays(engine, manager) == ["essay 1", "essay 2"]
    assert _clubs(engine, manager) == ["club 1"]
    manager.close()


# -- preloading many parents ---------------------------------------------------------------------


def test_preloading_a_list_of_parents_costs_no_query_once_cached(
    engine: Engine, reader: CacheManager, statements: Any
) -> None:
    _seed(engine)
    log: StatementLog = statements(engine)

    def read() -> dict[str, Any]:
        with Session(engine, info={"cache_manager": reader}) as session:
            repo = WriterRepo(session=session)
            writers = repo.list(order_by=Writer.id, preload=("essays", "clubs"))
            return {
                w.name: ([e.title for e in w.essays], [c.name for c in w.clubs]) for w in writers
            }

    counts = []
    for _ in range(3):
        with log.fresh() as sent:
            assert read() == {
                "writer 1": (["essay 1", "essay 2"], ["club 1"]),
                "writer 2": (["essay 3"], ["club 1", "club 2"]),
            }
        counts.append(len(sent))

    # cold: the list, then one query per relationship; then the members by id (their entity
    # cache fills); then nothing
    assert counts == [3, 2, 0]


# -- async -----------------------------------------------------------------------------------------


def test_async_hits_serve_cached_relationships(
    engine: Engine, database_url: str, reader: CacheManager, statements: Any
) -> None:
    _seed(engine)
    _warm(engine, reader)
    url = database_url.replace("sqlite://", "sqlite+aiosqlite://").replace(
        "postgresql://", "postgresql+asyncpg://"
    )

    async def read() -> tuple[list[str], int, list[dict[str, list[str]]], list[int]]:
        async_engine = create_async_engine(url)
        log: StatementLog = statements(async_engine.sync_engine)
        sessions = async_sessionmaker(async_engine, info={"cache_manager": reader})
        async with sessions() as session:
            writer = await AsyncWriterRepo(session=session).get(1)
            essays = [essay.title for essay in await writer.awaitable_attrs.essays]
        hit_selects = len(log.of_kind("SELECT"))
        preloaded, counts = [], []
        for _ in range(3):
            log.clear()
            async with sessions() as session:
                writers = await AsyncWriterRepo(session=session).list(
                    order_by=Writer.id, preload=("clubs",)
                )
                preloaded.append({w.name: [club.name for club in w.clubs] for w in writers})
            counts.append(len(log.of_kind("SELECT")))
        await async_engine.dispose()
        return essays, hit_selects, preloaded, counts

    essays, hit_selects, preloaded, counts = asyncio.run(read())

    assert essays == ["essay 1", "essay 2"]
    assert hit_selects == 0  # writer 1 and its essays, warmed: all from the cache
    assert preloaded == [{"writer 1": ["club 1"], "writer 2": ["club 1", "club 2"]}] * 3
    assert counts[-1] == 0


def test_async_plain_access_raises_as_sqlalchemy_does_even_when_cached(
    engine: Engine, database_url: str, reader: CacheManager
) -> None:
    """Code that works only while the cache is warm would fail on its first miss."""
    _seed(engine)
    _warm(engine, reader)
    url = database_url.replace("sqlite://", "sqlite+aiosqlite://").replace(
        "postgresql://", "postgresql+asyncpg://"
    )

    async def read() -> None:
        async_engine = create_async_engine(url)
        sessions = async_sessionmaker(async_engine, info={"cache_manager": reader})
        try:
            async with sessions() as session:
                writer = await AsyncWriterRepo(session=session).get(1)
                with pytest.raises(MissingGreenlet):
                    _ = writer.essays
                assert [e.title for e in await writer.awaitable_attrs.essays] == [
                    "essay 1",
                    "essay 2",
                ]
        finally:
            await async_engine.dispose()

    asyncio.run(read())


# -- configuration -------------------------------------------------------------------------------


class _Other(DeclarativeBase):
    pass


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ("nope", "'nope' is not a relationship of"),
        ("dynamic_items", "lazy='dynamic'"),
        ("raising_items", "lazy='raise'"),
    ],
)
def test_an_unservable_cached_relationship_is_a_cache_meta_error(
    declared: str, message: str
) -> None:
    # Declared and configured under SQLAlchemy's configure lock, as one module import: a
    # query in another thread of the suite must not configure Holder before Item exists.
    with _CONFIGURE_MUTEX:
        try:

            class Holder(_Other):
                __tablename__ = f"relc_holder_{declared}"
                id: Mapped[int] = mapped_column(primary_key=True)
                dynamic_items = relationship(f"Item_{declared}", lazy="dynamic", viewonly=True)
                raising_items = relationship(f"Item_{declared}", lazy="raise", viewonly=True)

                class CacheMeta:
                    cached_relationships = (declared,)

            type(
                f"Item_{declared}",
                (_Other,),
                {
                    "__tablename__": f"relc_item_{declared}",
                    "id": Column(Integer, primary_key=True),
                    "holder_id": Column(ForeignKey(f"relc_holder_{declared}.id")),
                },
            )

            with pytest.raises(CacheMetaError) as error:
                configure_mappers()
        finally:
            _Other.registry.dispose()  # a failure here must not fail every later configure
    assert error.value.attribute == "cached_relationships"
    assert message in str(error.value)
