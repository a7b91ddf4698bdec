"""Reads by a ``key_fields`` set after a commit: one SELECT, then hits; no refused fill.

A commit writes a tombstone at every key of the rows it changed: the primary-key entry and
each ``key_fields`` key (the pointer to it). The tombstone at a ``key_fields`` key names the
row's primary key, so a read by that key looks the primary-key entry up too, in the probe's
second round trip (as it follows a live pointer), and its fill replaces what it saw at both
keys instead of meeting the commit's tombstone at the one it did not look at. Counted with
``before_cursor_execute`` on SQLite and PostgreSQL, on the memory backend, Redis and
Memcached; rows are made by a factory-boy factory. The fill guards still hold: a commit
between the look-up and the fill refuses it (the next read queries again and gets the row
as committed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import factory
import pytest
from sqlalchemy import String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from declcache.config import SQLAlchemySyncConfig
from declcache.repository import SQLAlchemySyncRepository

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from declcache import CacheConfig
    from tests.integration.conftest import StatementLog

TABLE = "nk_fills_members"
INSERTS = 20


class Base(DeclarativeBase):
    pass


class Member(Base):
    """Cached by primary key and by ``email``, a ``key_fields`` set."""

    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(120), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    visits: Mapped[int] = mapped_column(default=0)

    class CacheMeta:
        ttl = 300
        key_fields = ("email",)


class MemberRepo(SQLAlchemySyncRepository[Member]):
    model_type = Member


class MemberFactory(factory.Factory):
    class Meta:
        model = Member

    id = factory.Sequence(lambda n: n + 1)
    email = factory.Sequence(lambda n: f"member{n + 1}@example.com")
    name = factory.Faker("name")
    visits = 0


@pytest.fixture(params=["memory", "redis", "memcached"])
def cache_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(
    request: pytest.FixtureRequest, tmp_path: Any, cache_config: CacheConfig
) -> Iterator[SQLAlchemySyncConfig]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'natural_key_fills.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    config = SQLAlchemySyncConfig(connection_string=url, cache_config=cache_config)
    config.drop_all(Base.metadata)  # only this module's table
    config.create_all(Base.metadata)
    MemberFactory.reset_sequence(0)
    yield config
    config.drop_all(Base.metadata)
    config.dispose()


@pytest.fixture
def sent(db: SQLAlchemySyncConfig, statements: Callable[..., StatementLog]) -> StatementLog:
    return statements(db.engine)


def selects(sent: StatementLog) -> int:
    return sum(TABLE in sql for sql in sent.of_kind("SELECT"))


def refused(db: SQLAlchemySyncConfig) -> int:
    assert db.cache_manager is not None
    return db.cache_manager.stats()["Member"].fills_refused


def seed(db: SQLAlchemySyncConfig, *members: Member) -> None:
    with db.get_session() as session:
        session.add_all(members)
        session.commit()


def by_email(db: SQLAlchemySyncConfig, sent: StatementLog, email: str) -> tuple[int, Member]:
    """SELECTs of one read by email in a fresh session, and what it read."""
    before = selects(sent)
    with db.get_session() as session:
        found = MemberRepo(session=session, auto_expunge=True).get_one(email=email)
    return selects(sent) - before, found


def by_id(db: SQLAlchemySyncConfig, sent: StatementLog, ident: int) -> tuple[int, Member]:
    before = selects(sent)
    with db.get_session() as session:
        found = MemberRepo(session=session, auto_expunge=True).get(ident)
    return selects(sent) - before, found


def visit(db: SQLAlchemySyncConfig, ident: int) -> None:
    with db.get_session() as session:
        member = session.get(Member, ident)
        assert member is not None
        member.visits += 1
        session.commit()


def test_a_read_by_natural_key_after_a_commit_costs_one_select(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    rows = MemberFactory.build_batch(3)
    seed(db, *rows)
    for member in rows:
        assert [by_email(db, sent, member.email)[0] for _ in range(2)] == [1, 0]
        assert by_id(db, sent, member.id)[0] == 0
    refused_before = refused(db)
    for member in rows:
        visit(db, member.id)
        reads = [by_email(db, sent, member.email) for _ in range(3)]
        assert [count for count, _ in reads] == [1, 0, 0]
        assert [found.visits for _, found in reads] == [1, 1, 1]
        count, found = by_id(db, sent, member.id)
        assert (count, found.visits) == (0, 1)
    assert refused(db) == refused_before


def test_inserted_rows_leave_no_refused_fill(db: SQLAlchemySyncConfig, sent: StatementLog) -> None:
    seed(db, MemberFactory.build())
    by_email(db, sent, "member1@example.com")
    refused_before = refused(db)
    new = MemberFactory.build_batch(INSERTS)
    seed(db, *new)
    assert [by_email(db, sent, member.email)[0] for member in new] == [1] * INSERTS
    assert [by_email(db, sent, member.email)[0] for member in new] == [0] * INSERTS
    assert [by_id(db, sent, member.id)[0] for member in new] == [0] * INSERTS
    assert refused(db) == refused_before


def test_a_read_by_primary_key_first_then_by_natural_key(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    """Both keys miss once after the commit, and both are hits afterwards, never stale.

    (The read by primary key does not look at the ``email`` key: its pointer fill, expecting
    an empty key, meets the commit's tombstone there; the read by email then fills it.)
    """
    rows = MemberFactory.build_batch(3)
    seed(db, *rows)
    for member in rows:
        by_email(db, sent, member.email)
    for member in rows:
        visit(db, member.id)
        reads = [by_id(db, sent, member.id) for _ in range(2)]
        reads += [by_email(db, sent, member.email) for _ in range(2)]
        assert [(count, found.visits) for count, found in reads] == [(1, 1), (0, 1), (1, 1), (0, 1)]


def test_a_natural_key_moved_to_another_row_is_read_from_its_new_row(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    first, second = MemberFactory.build_batch(2)
    seed(db, first, second)
    shared = first.email
    assert by_email(db, sent, shared)[1].id == first.id
    with db.get_session() as session:
        moved = session.get(Member, first.id)
        assert moved is not None
        moved.email = "moved@example.com"
        session.commit()
    with db.get_session() as session:
        taker = session.get(Member, second.id)
        assert taker is not None
        taker.email = shared
        session.commit()
    reads = [by_email(db, sent, shared) for _ in range(2)]
    assert [(count, found.id) for count, found in reads] == [(1, second.id), (0, second.id)]
    count, found = by_email(db, sent, "moved@example.com")
    assert (count, found.id) == (1, first.id)
    assert by_id(db, sent, first.id)[1].email == "moved@example.com"


@pytest.mark.parametrize("by", ["email", "id"])
def test_a_commit_between_look_up_and_fill_still_refuses_both_keys(
    db: SQLAlchemySyncConfig, sent: StatementLog, by: str
) -> None:
    member = MemberFactory.build()
    seed(db, member)
    by_email(db, sent, member.email)
    visit(db, member.id)  # tombstones: the pointer one names the row
    manager = db.cache_manager
    assert manager is not None
    refused_before = refused(db)
    with db.get_session() as session:

        def loader() -> Member | None:
            found = session.scalars(select(Member).where(Member.email == member.email)).one()
            visit(db, member.id)  # commits after this read: its tombstones must win
            return found

        ident = {"email": member.email} if by == "email" else member.id
        stale = manager.load(Member, ident, loader, session=session)
        assert stale.visits == 1
    assert refused(db) - refused_before == 2  # the entry and the pointer
    reads = [by_email(db, sent, member.email) for _ in range(2)]
    assert [(count, found.visits) for count, found in reads] == [(1, 2), (0, 2)]
    assert by_id(db, sent, member.id)[0] == 0
