"""Issue 14 points 8, 9 and 12 through the stock repository, on SQLite and PostgreSQL.

* Point 8: a key is spelt as the column compares its value. ``Decimal("1.5")``, ``1.5`` and
  ``"1.50"`` name the ``Numeric`` row stored ``1.50``; a cached not-found under one spelling
  is reached by the insert of another; on SQLite's ``NOCASE`` and PostgreSQL's ``citext``,
  ``"Ada@Example.com"`` is the row ``"ada@example.com"``.
* Point 9: a statement holding a clock (``datetime('now')``, ``now()``) or raw SQL
  (``literal_column``) is never cached: each read queries.
* Point 12: two releases of one model (a column added) share keys and tokens: a commit by
  either invalidates what the other cached, and reading the other's payload is a silent miss.

Rows come from factory-boy; database reads are counted with ``before_cursor_execute``.
"""

from __future__ import annotations

import decimal
from typing import TYPE_CHECKING, Any

import factory
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from declcache import NotFoundError
from declcache.config import SQLAlchemySyncConfig
from declcache.repository import SQLAlchemySyncRepository
from tests.integration._repo_models import seed

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from declcache import CacheConfig
    from tests.integration.conftest import StatementLog


class Base(DeclarativeBase):
    pass


class Price(Base):
    __tablename__ = "i14_prices"

    code: Mapped[decimal.Decimal] = mapped_column(sa.Numeric(10, 2), primary_key=True)
    label: Mapped[str] = mapped_column(sa.String(50))

    class CacheMeta:
        cache_not_found = True


class Account(Base):
    __tablename__ = "i14_accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(
        sa.String(100, collation="NOCASE").with_variant(postgresql.CITEXT(), "postgresql"),
        unique=True,
    )

    class CacheMeta:
        key_fields = ("email",)
        cache_not_found = True


class Event(Base):
    __tablename__ = "i14_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))

    class CacheMeta:
        ttl = 600


class PriceRepo(SQLAlchemySyncRepository[Price]):
    model_type = Price


class AccountRepo(SQLAlchemySyncRepository[Account]):
    model_type = Account


class EventRepo(SQLAlchemySyncRepository[Event]):
    model_type = Event


class PriceFactory(factory.Factory):
    class Meta:
        model = Price

    code = factory.Sequence(lambda n: decimal.Decimal(f"{n + 1}.50"))
    label = factory.Sequence(lambda n: f"price {n}")


class AccountFactory(factory.Factory):
    class Meta:
        model = Account

    id = factory.Sequence(lambda n: n + 1)
    email = factory.Sequence(lambda n: f"user{n}@example.com")


class EventFactory(factory.Factory):
    class Meta:
        model = Event

    id = factory.Sequence(lambda n: n + 1)
    name = factory.Sequence(lambda n: f"event {n}")


@pytest.fixture(params=["memory", "redis"])
def cache_backend(request: pytest.FixtureRequest) -> str:
    """The in-process store and a shared server; every backend shares the key code."""
    return str(request.param)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/keys.db"
    url = str(request.getfixturevalue("postgres_url"))
    with sa.create_engine(url).begin() as connection:
        connection.execute(sa.text("CREATE EXTENSION IF NOT EXISTS citext"))
    return url


def _database(url: str, cache_config: CacheConfig, base: Any) -> SQLAlchemySyncConfig:
    config = SQLAlchemySyncConfig(connection_string=url, cache_config=cache_config)
    config.drop_all(base.metadata)
    config.create_all(base.metadata)
    return config


@pytest.fixture
def db(db_url: str, cache_config: CacheConfig) -> Iterator[SQLAlchemySyncConfig]:
    config = _database(db_url, cache_config, Base)
    for made in (PriceFactory, AccountFactory, EventFactory):
        made.reset_sequence(0)
    yield config
    config.drop_all(Base.metadata)
    config.dispose()


@pytest.fixture
def sent(db: SQLAlchemySyncConfig, statements: Callable[..., StatementLog]) -> StatementLog:
    return statements(db.engine)


def reads(
    db: SQLAlchemySyncConfig, sent: StatementLog, table: str, action: Callable[[Any], Any]
) -> tuple[Any, int]:
    """``action(session)`` in a fresh session, and how many SELECTs of ``table`` it sent."""
    sent.clear()
    with db.get_session() as session:
        result = action(session)
    return result, sum(table in sql for sql in sent.of_kind("SELECT"))


# -- point 8: key spelling ------------------------------------------------------------------


SPELLINGS = [decimal.Decimal("1.50"), decimal.Decimal("1.5"), 1.5, "1.50", decimal.Decimal("15E-1")]


def test_every_spelling_of_a_numeric_key_finds_the_row_and_shares_its_entry(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    seed(db, PriceFactory.build())  # code 1.50

    first, queries = reads(db, sent, "i14_prices", lambda s: PriceRepo(session=s).get(1.5))
    assert (first.code, queries) == (decimal.Decimal("1.50"), 1)
    for spelling in SPELLINGS:
        found, queries = reads(
            db, sent, "i14_prices", lambda s, code=spelling: PriceRepo(session=s).get(code)
        )
        assert (found.code, queries) == (decimal.Decimal("1.50"), 0), spelling


def test_an_insert_reaches_a_not_found_cached_under_another_spelling(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    def lookup(code: Any) -> Callable[[Any], Any]:
        return lambda s: PriceRepo(session=s).get_one_or_none(code=code)

    assert reads(db, sent, "i14_prices", lookup(decimal.Decimal("1.5")))[0] is None
    assert reads(db, sent, "i14_prices", lookup(decimal.Decimal("1.5"))) == (None, 0)  # cached

    seed(db, PriceFactory.build())  # code 1.50, invalidated under its own spelling

    for spelling in SPELLINGS:
        found = reads(db, sent, "i14_prices", lookup(spelling))[0]
        assert found is not None, spelling
        assert found.code == decimal.Decimal("1.50")
    with db.get_session() as session:
        assert PriceRepo(session=session).get(decimal.Decimal("1.5")).label == "price 0"


def test_a_case_insensitive_key_is_one_entry_for_every_case(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    def lookup(email: str) -> Callable[[Any], Any]:
        return lambda s: AccountRepo(session=s).get_one_or_none(email=email)

    # A not-found cached under one case, then an insert under another.
    assert reads(db, sent, "i14_accounts", lookup("USER0@Example.COM"))[0] is None
    seed(db, AccountFactory.build())  # user0@example.com

    for warming in ("User0@Example.com", "USER0@example.com"):  # the pointer, then the entity
        found, _ = reads(db, sent, "i14_accounts", lookup(warming))
        assert found is not None
        assert found.id == 1
    for spelling in ("user0@example.com", "USER0@EXAMPLE.COM", "uSeR0@exAMple.com"):
        found, queries = reads(db, sent, "i14_accounts", lookup(spelling))
        assert (found.id, queries) == (1, 0), spelling


def test_a_key_of_a_spelling_the_column_cannot_compare_is_read_from_the_database(
    db: SQLAlchemySyncConfig,
) -> None:
    seed(db, PriceFactory.build())
    with db.get_session() as session, pytest.raises(NotFoundError):
        PriceRepo(session=session).get(decimal.Decimal("1.505"))


# -- point 9: volatile statements -----------------------------------------------------------


def _clock(db: SQLAlchemySyncConfig) -> Any:
    if db.engine.dialect.name == "sqlite":
        return sa.func.datetime("now")
    return sa.func.now()


@pytest.mark.parametrize("volatile", ["clock", "literal_column", "unixepoch-or-random"])
def test_a_volatile_statement_is_never_cached(
    db: SQLAlchemySyncConfig, sent: StatementLog, volatile: str
) -> None:
    seed(db, *EventFactory.build_batch(3))
    condition = {
        "clock": sa.cast(_clock(db), sa.String) > "2000",
        "literal_column": sa.literal_column("1") == 1,
        "unixepoch-or-random": sa.func.random() != 0.5,
    }[volatile]

    for _ in range(3):
        listed, queries = reads(
            db, sent, "i14_events", lambda s: EventRepo(session=s).list(condition)
        )
        assert (len(listed), queries) == (3, 1)


def test_a_deterministic_statement_is_cached(db: SQLAlchemySyncConfig, sent: StatementLog) -> None:
    seed(db, *EventFactory.build_batch(3))
    condition = sa.func.lower(Event.name).like("event%")

    assert reads(db, sent, "i14_events", lambda s: len(EventRepo(session=s).list(condition))) == (
        3,
        1,
    )
    assert reads(db, sent, "i14_events", lambda s: len(EventRepo(session=s).list(condition))) == (
        3,
        0,
    )


# -- point 12: two releases side by side ----------------------------------------------------


def _widget(base: type[DeclarativeBase], *, with_note: bool) -> type:
    """``Widget`` as one release maps it; the next release adds ``note``."""
    columns: dict[str, Any] = {
        "__tablename__": "i14_widgets",
        "id": mapped_column(sa.Integer, primary_key=True),
        "name": mapped_column(sa.String(50)),
        "CacheMeta": type("CacheMeta", (), {"ttl": 600}),
        "__annotations__": {},
    }
    if with_note:
        columns["note"] = mapped_column(sa.String(50), nullable=True)
    return type("Widget", (base,), columns)


class OldBase(DeclarativeBase):
    pass


class NewBase(DeclarativeBase):
    pass


OldWidget = _widget(OldBase, with_note=False)
NewWidget = _widget(NewBase, with_note=True)


class OldRepo(SQLAlchemySyncRepository[Any]):
    model_type = OldWidget


class NewRepo(SQLAlchemySyncRepository[Any]):
    model_type = NewWidget


@pytest.fixture
def releases(
    db_url: str, cache_config: CacheConfig
) -> Iterator[tuple[SQLAlchemySyncConfig, SQLAlchemySyncConfig]]:
    new = _database(db_url, cache_config, NewBase)  # the table as the new release has it
    old = SQLAlchemySyncConfig(connection_string=db_url, cache_config=cache_config)
    with new.get_session() as session:
        session.add_all([NewWidget(id=1, name="one"), NewWidget(id=2, name="two")])
        session.commit()
    yield old, new
    new.drop_all(NewBase.metadata)
    old.dispose()
    new.dispose()


def _name(config: SQLAlchemySyncConfig, repo: type, ident: int) -> str:
    with config.get_session() as session:
        return str(repo(session=session).get(ident).name)


def _rename(config: SQLAlchemySyncConfig, repo: type, ident: int, name: str) -> None:
    with config.get_session() as session:
        widget = repo(session=session).get(ident, use_cache=False)
        widget.name = name
        repo(session=session).update(widget)
        session.commit()


def _errors(config: SQLAlchemySyncConfig) -> int:
    manager = config.cache_manager
    assert manager is not None
    return sum(stats.errors for stats in manager.stats().values())


@pytest.mark.parametrize("writer", ["old", "new"])
def test_a_commit_by_either_release_invalidates_what_the_other_cached(
    releases: tuple[SQLAlchemySyncConfig, SQLAlchemySyncConfig], writer: str
) -> None:
    old, new = releases
    assert (_name(old, OldRepo, 1), _name(new, NewRepo, 2)) == ("one", "two")
    assert (_name(old, OldRepo, 2), _name(new, NewRepo, 1)) == ("two", "one")  # foreign: misses
    assert (_name(old, OldRepo, 1), _name(new, NewRepo, 1)) == ("one", "one")  # each fills

    config, repo = (old, OldRepo) if writer == "old" else (new, NewRepo)
    _rename(config, repo, 1, "renamed")
    _rename(config, repo, 2, "renamed too")

    assert (_name(old, OldRepo, 1), _name(new, NewRepo, 1)) == ("renamed", "renamed")
    assert (_name(old, OldRepo, 2), _name(new, NewRepo, 2)) == ("renamed too", "renamed too")
    assert (_errors(old), _errors(new)) == (0, 0)  # another release's payload is no error


def test_a_list_cached_by_one_release_is_invalidated_by_the_other(
    releases: tuple[SQLAlchemySyncConfig, SQLAlchemySyncConfig],
) -> None:
    old, new = releases
    with old.get_session() as session:
        assert len(OldRepo(session=session).list()) == 2
    with new.get_session() as session:
        NewRepo(session=session).add(NewWidget(id=3, name="three", note="n"))
        session.commit()
    with old.get_session() as session:
        assert len(OldRepo(session=session).list()) == 3


def test_each_release_hits_its_own_fill(
    releases: tuple[SQLAlchemySyncConfig, SQLAlchemySyncConfig],
    statements: Callable[..., StatementLog],
) -> None:
    _old, new = releases
    log = statements(new.engine)
    _name(new, NewRepo, 1)
    log.clear()
    assert _name(new, NewRepo, 1) == "one"
    assert sum("i14_widgets" in sql for sql in log.of_kind("SELECT")) == 0
