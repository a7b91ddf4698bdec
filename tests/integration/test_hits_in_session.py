"""A cache hit behaves exactly like a loaded row (issue 15, points 1 and 4).

A hit read through a repository (or ``CacheManager`` reads given ``session=``) is persistent in
that session as if the session had loaded it: its changes flush alone (no lost update), mutable
values track in-place changes, ``@reconstructor`` runs, attributes the cache does not hold and
relationships load on access, ``version_id_col`` is checked. ``repo.update()`` of an instance
the session does not hold writes only what changed. Every loader strategy works on a hit and a
miss.

Every scenario runs four ways (the ``side`` fixture): the sync and the async repository, on
SQLite and PostgreSQL. A hit is proven by the engine sending no SELECT of the table
(``before_cursor_execute``), in a fresh session.
"""

from __future__ import annotations

import functools
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import factory
import pytest
from sqlalchemy import JSON, ForeignKey, Integer, String, Text, func, inspect, select
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncSession
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    column_property,
    mapped_column,
    reconstructor,
    relationship,
)
from sqlalchemy.orm.exc import DetachedInstanceError, StaleDataError

from declcache.config import SQLAlchemyAsyncConfig, SQLAlchemySyncConfig
from declcache.repository import SQLAlchemyAsyncRepository, SQLAlchemySyncRepository

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from declcache import CacheConfig, CacheManager
    from tests.integration.conftest import StatementLog

T = TypeVar("T")

pytestmark = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:sqlalchemy.exc.SADeprecationWarning"
)

# -- models -------------------------------------------------------------------------------------


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Note(Base):
    """Not cached; counted by ``Member.note_count``, which the cache therefore never holds."""

    __tablename__ = "hits_notes"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    member_id: Mapped[int] = mapped_column(ForeignKey("hits_members.id"))
    body: Mapped[str] = mapped_column(String(100))
    member: Mapped[Member] = relationship(back_populates="notes")


class Member(Base):
    """The issue's user: no version column, so a concurrent change must survive an update."""

    __tablename__ = "hits_members"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(100), unique=True)
    first_name: Mapped[str] = mapped_column(String(50))
    last_name: Mapped[str] = mapped_column(String(50))
    prefs: Mapped[dict[str, Any]] = mapped_column(MutableDict.as_mutable(JSON), default=dict)
    bio: Mapped[str] = mapped_column(Text, deferred=True, default="")
    full_name: Mapped[str] = column_property(first_name + " " + last_name)
    note_count: Mapped[int] = column_property(
        select(func.count(Note.id))
        .where(Note.member_id == id)
        .correlate_except(Note)
        .scalar_subquery()
    )
    notes: Mapped[list[Note]] = relationship(back_populates="member", order_by=Note.id)

    class CacheMeta:
        key_fields = (("id",), ("email",))

    @reconstructor
    def _on_load(self) -> None:
        self.reconstructed = True


class Versioned(Base):
    __tablename__ = "hits_versioned"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    version: Mapped[int] = mapped_column(nullable=False)

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012 - SQLAlchemy's spelling

    class CacheMeta:
        pass


STRATEGIES = ("joined", "selectin", "subquery", "raise", "noload")


def _folder_models(strategy: str) -> tuple[type, type]:
    """A cached ``Folder`` whose ``papers`` collection loads ``lazy=strategy``, and ``Paper``."""
    title = strategy.title()
    paper = type(
        f"{title}Paper",
        (Base,),
        {
            "__tablename__": f"hits_{strategy}_papers",
            "id": mapped_column(Integer, primary_key=True, autoincrement=False),
            "folder_id": mapped_column(ForeignKey(f"hits_{strategy}_folders.id")),
            "title": mapped_column(String(50)),
        },
    )

    class CacheMeta:
        key_fields = (("id",), ("code",))

    folder = type(
        f"{title}Folder",
        (Base,),
        {
            "__tablename__": f"hits_{strategy}_folders",
            "id": mapped_column(Integer, primary_key=True, autoincrement=False),
            "code": mapped_column(String(20), unique=True),
            "papers": relationship(paper, lazy=strategy, order_by=paper.id),  # type: ignore[attr-defined]
            "CacheMeta": CacheMeta,
        },
    )
    return folder, paper


FOLDERS = {strategy: _folder_models(strategy) for strategy in STRATEGIES}


class MemberFactory(factory.Factory):
    class Meta:
        model = Member

    id = factory.Sequence(lambda n: n + 1)
    email = factory.Sequence(lambda n: f"member{n + 1}@example.com")
    first_name = "Ada"
    last_name = "Lovelace"
    prefs = factory.LazyFunction(lambda: {"theme": "light"})
    bio = "Analyst"


class NoteFactory(factory.Factory):
    class Meta:
        model = Note

    id = factory.Sequence(lambda n: n + 1)
    member_id = 1
    body = factory.Faker("sentence", nb_words=3)


class VersionedFactory(factory.Factory):
    class Meta:
        model = Versioned

    id = factory.Sequence(lambda n: n + 1)
    name = factory.Faker("word")


MEMBERS = "hits_members"

# -- running a scenario sync or async, on SQLite or PostgreSQL ----------------------------------


class _Awaited:
    """A sync repository whose methods are awaited, as the async repository's are."""

    def __init__(self, repository: Any) -> None:
        self._repository = repository

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._repository, name)

        async def awaited(*args: Any, **kwargs: Any) -> Any:
            return method(*args, **kwargs)

        return awaited


@functools.cache
def _repository(model: type, base: type) -> type:
    return type(f"{model.__name__}{base.__name__}", (base,), {"model_type": model})


@dataclass
class Side:
    """One way to run a scenario: the sync or the async repository, on one database."""

    mode: str
    config: Any
    sent: StatementLog

    @property
    def manager(self) -> CacheManager:
        manager: CacheManager = self.config.cache_manager
        return manager

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Any]:
        """A fresh ``Session`` (sync) or ``AsyncSession`` (async)."""
        if self.mode == "sync":
            with self.config.get_session() as session:
                yield session
        else:
            async with self.config.get_session() as session:
                yield session

    def repo(self, model: type, session: Any, **options: Any) -> Any:
        """A repository of ``model`` over ``session``, its methods awaited either way."""
        if self.mode == "sync":
            repository = _repository(model, SQLAlchemySyncRepository)
            return _Awaited(repository(session=session, **options))
        return _repository(model, SQLAlchemyAsyncRepository)(session=session, **options)

    async def run(self, session: Any, work: Callable[[Session], T]) -> T:
        """``work(sync session)``: for an AsyncSession, in its greenlet (lazy loads work)."""
        if self.mode == "sync":
            return work(session)
        result: T = await session.run_sync(work)
        return result

    async def seed(self, *items: Any) -> None:
        """Rows there before the test: written by a session without a manager (no tombstones)."""
        if self.mode == "sync":
            with Session(self.config.engine) as session:
                session.add_all(items)
                session.commit()
        else:
            async with AsyncSession(self.config.engine) as session:
                session.add_all(items)
                await session.commit()

    async def change(self, model: type, ident: int, **values: Any) -> None:
        """Another request changes a row and commits: a session of its own."""

        def work(session: Session) -> None:
            row = session.get(model, ident)
            for name, value in values.items():
                setattr(row, name, value)
            session.commit()

        async with self.session() as session:
            await self.run(session, work)

    async def row(self, model: type, ident: int) -> dict[str, Any]:
        """The row as committed in the database (no ORM, no cache)."""
        table: Any = model.__table__  # type: ignore[attr-defined]
        query = select(table).where(table.c.id == ident)
        async with self.session() as session:
            return await self.run(session, lambda s: dict(s.execute(query).mappings().one()))

    async def warm(self, model: type, *idents: int) -> None:
        """Read each ident once through the cache, so the next read is a hit."""
        async with self.session() as session:
            for ident in idents:
                await self.repo(model, session).get(ident)

    def selects(self, table: str = MEMBERS) -> int:
        return sum(table in sql for sql in self.sent.of_kind("SELECT"))


@pytest.fixture(params=["memory"])
def cache_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["sync-sqlite", "async-sqlite", "sync-postgres", "async-postgres"])
async def side(
    request: pytest.FixtureRequest,
    tmp_path: Any,
    cache_config: CacheConfig,
    statements: Callable[..., StatementLog],
) -> AsyncIterator[Side]:
    mode, database = str(request.param).split("-")
    if database == "sqlite":
        driver = "sqlite+aiosqlite" if mode == "async" else "sqlite"
        url = f"{driver}:///{tmp_path}/hits.db"
    else:
        url = request.getfixturevalue("postgres_async_url" if mode == "async" else "postgres_url")
    for made in (MemberFactory, NoteFactory, VersionedFactory):
        made.reset_sequence(0)
    if mode == "sync":
        config: Any = SQLAlchemySyncConfig(connection_string=url, cache_config=cache_config)
        config.drop_all(Base.metadata)
        config.create_all(Base.metadata)
        yield Side(mode, config, statements(config.engine))
        config.drop_all(Base.metadata)
        config.dispose()
    else:
        config = SQLAlchemyAsyncConfig(connection_string=url, cache_config=cache_config)
        await config.drop_all(Base.metadata)
        await config.create_all(Base.metadata)
        yield Side(mode, config, statements(config.engine.sync_engine))
        await config.drop_all(Base.metadata)
        await config.dispose()


def update_columns(sql: str) -> list[str]:
    """The columns an ``UPDATE … SET a=…, b=… WHERE …`` statement sets."""
    assignments = sql.split(" SET ", 1)[1].split(" WHERE ", 1)[0]
    return [assignment.split("=", 1)[0].strip() for assignment in assignments.split(",")]


# -- a hit is the session's, as if loaded -------------------------------------------------------


async def test_a_hit_is_persistent_in_the_session_as_if_loaded(side: Side) -> None:
    await side.seed(MemberFactory.build())
    await side.warm(Member, 1)

    async with side.session() as session:
        side.sent.clear()
        member = await side.repo(Member, session).get(1)
        assert side.selects() == 0
        state = inspect(member)
        assert state.persistent
        assert member in session
        assert not state.modified
        assert await side.run(session, lambda s: s.get(Member, 1)) is member  # identity map
        assert await side.repo(Member, session).get_one(email="member1@example.com") is member
        assert side.selects() == 0
        assert await side.run(session, lambda s: (s.flush(), list(s.dirty))[1]) == []
        assert side.sent.of_kind("UPDATE") == []


async def test_reconstructor_runs_on_a_hit(side: Side) -> None:
    await side.seed(*MemberFactory.build_batch(2))
    await side.warm(Member, 1)
    async with side.session() as session:
        await side.repo(Member, session).list(order_by=Member.id)  # fills the list

    async with side.session() as session:
        side.sent.clear()
        repo = side.repo(Member, session)
        got = await repo.get(1)
        listed = await repo.list(order_by=Member.id)
        assert side.selects() == 0
        assert got.reconstructed
        assert all(member.reconstructed for member in listed)


# -- lost updates -------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_backend", ["memory", "redis"])
async def test_no_lost_update_a_hit_flushes_only_what_changed(side: Side) -> None:
    await side.seed(MemberFactory.build(email="old@example.com", first_name="Ada"))
    await side.warm(Member, 1)

    async with side.session() as request_a:
        repo = side.repo(Member, request_a)
        side.sent.clear()
        member = await repo.get(1)  # request A, from the cache
        assert side.selects() == 0
        await side.change(Member, 1, email="new@example.com")  # request B commits meanwhile
        member.first_name = "Augusta"
        await repo.update(member, auto_commit=True)

    row = await side.row(Member, 1)
    assert (row["first_name"], row["email"]) == ("Augusta", "new@example.com")


async def test_no_lost_update_a_detached_hit_writes_only_its_changes(side: Side) -> None:
    await side.seed(MemberFactory.build(email="old@example.com", first_name="Ada"))
    await side.warm(Member, 1)

    async with side.session() as session:
        side.sent.clear()
        member = await side.repo(Member, session, auto_expunge=True).get(1)
        assert side.selects() == 0
        assert inspect(member).detached
    await side.change(Member, 1, email="new@example.com", last_name="King")
    member.first_name = "Augusta"

    async with side.session() as session:
        repo = side.repo(Member, session)
        updated = await repo.update(member, auto_commit=True)
        assert updated is not member  # the session's instance of the row
        assert update_columns(side.sent.of_kind("UPDATE")[-1]) == ["first_name"]

    row = await side.row(Member, 1)
    assert (row["first_name"], row["last_name"], row["email"]) == (
        "Augusta",
        "King",
        "new@example.com",
    )


async def test_no_lost_update_of_another_sessions_hit(side: Side) -> None:
    await side.seed(MemberFactory.build(email="old@example.com", first_name="Ada"))
    await side.warm(Member, 1)

    async with side.session() as first, side.session() as second:
        member = await side.repo(Member, first).get(1)  # persistent in the first session
        await side.change(Member, 1, email="new@example.com")
        member.first_name = "Augusta"
        updated = await side.repo(Member, second).update(member, auto_commit=True)
        assert updated is not member
        assert member in first  # still the first session's

    row = await side.row(Member, 1)
    assert (row["first_name"], row["email"]) == ("Augusta", "new@example.com")


async def test_a_flush_after_a_hit_updates_the_changed_column_only(side: Side) -> None:
    await side.seed(MemberFactory.build())
    await side.warm(Member, 1)

    async with side.session() as session:
        member = await side.repo(Member, session).get(1)
        member.last_name = "Byron"
        side.sent.clear()
        await side.run(session, lambda s: s.flush())
        (update,) = side.sent.of_kind("UPDATE")
        assert update_columns(update) == ["last_name"]
        assert side.sent.of_kind("SELECT") == []
        await side.run(session, lambda s: s.commit())
    assert (await side.row(Member, 1))["last_name"] == "Byron"


# -- version_id_col -----------------------------------------------------------------------------


async def test_a_version_conflict_on_the_flush_of_a_hit_raises_stale_data(side: Side) -> None:
    await side.seed(VersionedFactory.build(name="first"))
    await side.warm(Versioned, 1)

    async with side.session() as session:
        side.sent.clear()
        item = await side.repo(Versioned, session).get(1)
        assert side.selects("hits_versioned") == 0
        assert item.version == 1
        await side.change(Versioned, 1, name="theirs")  # version 2
        item.name = "ours"
        with pytest.raises(StaleDataError):
            await side.repo(Versioned, session).update(item, auto_commit=True)
    assert (await side.row(Versioned, 1))["name"] == "theirs"

    await side.warm(Versioned, 1)  # version 2, cached again
    async with side.session() as session:
        item = await side.repo(Versioned, session).get(1)
        item.name = "ours"
        await side.repo(Versioned, session).update(item, auto_commit=True)
    row = await side.row(Versioned, 1)
    assert (row["name"], row["version"]) == ("ours", 3)


async def test_a_version_conflict_on_update_of_a_detached_hit_raises_stale_data(
    side: Side,
) -> None:
    await side.seed(VersionedFactory.build(name="first"))
    await side.warm(Versioned, 1)

    async with side.session() as session:
        item = await side.repo(Versioned, session, auto_expunge=True).get(1)
    await side.change(Versioned, 1, name="theirs")
    item.name = "ours"
    async with side.session() as session:
        with pytest.raises(StaleDataError):
            await side.repo(Versioned, session).update(item, auto_commit=True)
    assert (await side.row(Versioned, 1))["name"] == "theirs"


# -- mutable values, column properties, deferred columns, relationships -------------------------


async def test_a_mutable_json_value_of_a_hit_tracks_in_place_changes(side: Side) -> None:
    await side.seed(*MemberFactory.build_batch(2))
    await side.warm(Member, 1, 2)

    async with side.session() as session:
        member = await side.repo(Member, session).get(1)
        assert isinstance(member.prefs, MutableDict)
        member.prefs["theme"] = "dark"
        assert inspect(member).modified
        await side.repo(Member, session).update(member, auto_commit=True)
    assert (await side.row(Member, 1))["prefs"] == {"theme": "dark"}

    async with side.session() as session:
        detached = await side.repo(Member, session, auto_expunge=True).get(2)
    assert isinstance(detached.prefs, MutableDict)
    detached.prefs["font"] = "serif"
    async with side.session() as session:
        await side.repo(Member, session).update(detached, auto_commit=True)
    assert (await side.row(Member, 2))["prefs"] == {"theme": "light", "font": "serif"}


@pytest.mark.parametrize("read", ["get", "list"])
async def test_column_properties_of_a_hit_have_their_values(side: Side, read: str) -> None:
    await side.seed(MemberFactory.build(), *NoteFactory.build_batch(2))

    async def member(session: Any) -> Any:
        repo = side.repo(Member, session)
        return await repo.get(1) if read == "get" else (await repo.list(order_by=Member.id))[0]

    async with side.session() as session:
        missed = await member(session)
        assert (missed.full_name, missed.note_count) == ("Ada Lovelace", 2)

    async with side.session() as session:
        side.sent.clear()
        hit = await member(session)
        assert side.selects() == 0
        # a correlated subquery of another table is never cached: expired, loaded on access
        assert "note_count" not in inspect(hit).dict
        found = await side.run(session, lambda _: (hit.full_name, hit.note_count))
        assert found == ("Ada Lovelace", 2)
        assert len(side.sent.of_kind("SELECT")) == 1


async def test_a_deferred_column_of_a_hit_loads_on_access(side: Side) -> None:
    await side.seed(MemberFactory.build(bio="Countess"))
    await side.warm(Member, 1)

    async with side.session() as session:
        side.sent.clear()
        member = await side.repo(Member, session).get(1)
        assert side.selects() == 0
        assert "bio" in inspect(member).unloaded
        assert await side.run(session, lambda _: member.bio) == "Countess"
        assert side.selects() == 1


async def test_relationships_of_a_hit_load_lazily(side: Side) -> None:
    await side.seed(MemberFactory.build(), *NoteFactory.build_batch(2))
    await side.warm(Member, 1)

    async with side.session() as session:
        side.sent.clear()
        member = await side.repo(Member, session).get(1)
        assert side.selects() == 0
        notes = await member.awaitable_attrs.notes if side.mode == "async" else member.notes
        assert [note.id for note in notes] == [1, 2]
        assert all(note.member is member for note in notes)
        assert side.selects("hits_notes") == 1


# -- identities the session holds, auto_expunge -------------------------------------------------


async def test_a_hit_of_an_identity_the_session_holds_is_that_instance(side: Side) -> None:
    await side.seed(*MemberFactory.build_batch(2))
    async with side.session() as session:
        await side.repo(Member, session).list(order_by=Member.id)  # fills the list
    await side.warm(Member, 1)

    async with side.session() as session:
        repo = side.repo(Member, session)
        held = await repo.get(1, use_cache=False)
        side.sent.clear()
        listed = await repo.list(order_by=Member.id)
        assert side.selects() == 0
        assert listed[0] is held
        assert inspect(listed[1]).persistent

        session.expire(held)  # as a commit with expire_on_commit does
        again = await repo.get(1)  # a hit refills the instance the session holds
        assert again is held
        assert side.selects() == 0
        assert (held.email, held.first_name) == ("member1@example.com", "Ada")
        assert isinstance(held.prefs, MutableDict)
        assert not inspect(held).modified
        assert side.selects() == 0


async def test_auto_expunge_detaches_a_hit_with_its_cached_columns_loaded(side: Side) -> None:
    await side.seed(MemberFactory.build())
    await side.warm(Member, 1)

    async with side.session() as session:
        side.sent.clear()
        member = await side.repo(Member, session, auto_expunge=True).get(1)
        assert side.selects() == 0
        assert member not in session
    assert inspect(member).detached
    assert (member.id, member.email, member.first_name) == (1, "member1@example.com", "Ada")
    with pytest.raises(DetachedInstanceError):  # not cached, and nothing to load it with
        _ = member.note_count


# -- update() -----------------------------------------------------------------------------------


async def test_update_of_an_instance_the_session_holds_does_not_merge(side: Side) -> None:
    await side.seed(MemberFactory.build())
    await side.warm(Member, 1)

    async with side.session() as session:
        repo = side.repo(Member, session)
        member = await repo.get(1)
        member.first_name = "Augusta"
        side.sent.clear()
        assert await repo.update(member, auto_refresh=False) is member
        assert side.selects() == 0
        assert [update_columns(sql) for sql in side.sent.of_kind("UPDATE")] == [["first_name"]]


async def test_update_of_a_transient_instance_merges_it(side: Side) -> None:
    await side.seed(MemberFactory.build())
    replacement = MemberFactory.build(id=1, email="whole@example.com", first_name="Whole")

    async with side.session() as session:
        merged = await side.repo(Member, session).update(replacement, auto_commit=True)
        assert merged is not replacement
    row = await side.row(Member, 1)
    assert (row["email"], row["first_name"]) == ("whole@example.com", "Whole")


async def test_update_of_a_detached_instance_whose_row_was_deleted_raises(side: Side) -> None:
    await side.seed(MemberFactory.build())
    await side.warm(Member, 1)
    async with side.session() as session:
        member = await side.repo(Member, session, auto_expunge=True).get(1)
    async with side.session() as session:
        await side.repo(Member, session).delete(1, auto_commit=True)

    member.first_name = "Gone"
    async with side.session() as session:
        with pytest.raises(StaleDataError):
            await side.repo(Member, session).update(member)


async def test_update_of_a_detached_instance_applies_its_relationship_changes(
    side: Side,
) -> None:
    await side.seed(*MemberFactory.build_batch(2), NoteFactory.build(member_id=1))
    async with side.session() as session:
        note = await side.repo(Note, session, auto_expunge=True).get(1)
        member = await side.repo(Member, session, auto_expunge=True).get(2)
    note.member = member  # a many-to-one
    async with side.session() as session:
        await side.repo(Note, session).update(note, auto_commit=True)
    assert (await side.row(Note, 1))["member_id"] == 2

    async with side.session() as session:
        member = await side.repo(Member, session).get(2)
        await side.run(session, lambda _: member.notes)  # loaded, then detached with it
        session.expunge(member)
    member.notes.append(NoteFactory.build(id=2, member_id=None))  # a collection
    async with side.session() as session:
        await side.repo(Member, session).update(member, auto_commit=True)
    assert (await side.row(Note, 2))["member_id"] == 2


# -- loader strategies --------------------------------------------------------------------------


async def _papers(side: Side, folder: Any) -> Any:
    """``folder.papers`` as the application reads it: awaitable in an AsyncSession."""
    if side.mode == "async":
        return await folder.awaitable_attrs.papers
    return folder.papers


#: Each cached read, of a folder of its own: ``read(repository, model)``.
READS: dict[str, Callable[[Any, Any], Any]] = {
    "get": lambda repo, model: repo.get(1),
    "get_many": lambda repo, model: repo.get_many([2]),
    "list": lambda repo, model: repo.list(model.code == "f3"),
    "get_one": lambda repo, model: repo.get_one(code="f4"),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_every_loader_strategy_on_a_hit_and_on_a_miss(side: Side, strategy: str) -> None:
    folder_model, paper_model = FOLDERS[strategy]
    folders = f"hits_{strategy}_folders"
    papers = f"hits_{strategy}_papers"
    await side.seed(
        *(folder_model(id=n, code=f"f{n}") for n in range(1, 5)),
        *(
            paper_model(id=n * 2 + i, folder_id=n, title=t)
            for n in range(1, 5)
            for i, t in [(0, "a"), (1, "b")]
        ),
    )
    for read, run in READS.items():
        for hit in (False, True):  # the first read fills the cache
            async with side.session() as session:
                side.sent.clear()
                found = await run(side.repo(folder_model, session), folder_model)
                (folder,) = found if isinstance(found, list) else [found]
                assert (side.selects(folders) == 0) is hit, (read, hit)
                assert inspect(folder).persistent
                loaded_with_it = "papers" not in inspect(folder).unloaded
                side.sent.clear()
                if strategy == "raise":
                    with pytest.raises(InvalidRequestError, match="lazy='raise'"):
                        await _papers(side, folder)
                    continue
                titles = [paper.title for paper in await _papers(side, folder)]
                if strategy == "noload":
                    assert titles == []
                    continue
                assert titles == ["a", "b"], (read, hit)
                # eager on a miss, lazy (one SELECT) on a hit
                assert loaded_with_it is not hit, (read, hit)
                assert side.selects(papers) == int(hit), (read, hit)


# -- CacheManager reads given a session ---------------------------------------------------------


@pytest.mark.parametrize("side", ["sync-sqlite", "async-sqlite"], indirect=True)
async def test_manager_reads_given_a_session_enter_it_and_without_one_are_detached(
    side: Side,
) -> None:
    manager = side.manager
    await side.seed(*MemberFactory.build_batch(2))
    await side.warm(Member, 1, 2)
    key = "members:all"

    def load_all(session: Session) -> list[Any]:
        return list(session.scalars(select(Member).order_by(Member.id)))

    async with side.session() as session:  # a miss: the loader's result is cached
        if side.mode == "sync":
            manager.load_list(Member, key, lambda: load_all(session))
        else:
            await manager.aload_list(Member, key, lambda: session.run_sync(load_all))

    detached = manager.get(Member, 1)
    assert inspect(detached).detached
    assert [inspect(m).detached for m in manager.get_many(Member, [1, 2])] == [True, True]

    async with side.session() as session:
        orm_session = session if side.mode == "sync" else session.sync_session
        side.sent.clear()
        twice = manager.get_many(Member, [1, {"email": "member1@example.com"}], session=session)
        assert twice[0] is twice[1]  # one row by two keys: one instance
        got = manager.get(Member, 1, session=session)
        assert got is twice[0]
        assert got in orm_session
        many = manager.get_many(Member, [1, 2], session=session)
        assert many[0] is got
        assert inspect(many[1]).persistent
        assert manager.probe_list(Member, key, session=session).result == many
        if side.mode == "sync":
            assert manager.load(Member, 2, pytest.fail, session=session) is many[1]
            assert manager.load_many(Member, [1, 2], pytest.fail, session=session) == many
            assert manager.load_list(Member, key, pytest.fail, session=session) == many
        else:
            assert await manager.aload(Member, 2, pytest.fail, session=session) is many[1]
            assert await manager.aload_many(Member, [1, 2], pytest.fail, session=session) == many
            assert await manager.aload_list(Member, key, pytest.fail, session=session) == many
        assert side.selects() == 0
