"""A hit gives exactly what a database read gives: custom types, pickles, computed columns.

Rows are made by factory-boy factories and inserted into SQLite and PostgreSQL; each is read
through the stock sync repository once (a miss, which fills the cache), then again (a hit:
no SELECT of the table, counted with ``before_cursor_execute``), and compared, value and type,
with a read that bypasses the cache (``use_cache=False``). The cache is real: memory, Redis and
memcached, with JSON and msgpack payloads.

What is compared: ``TypeDecorator`` columns (JSON kept as text, the GUID recipe, a decorator
returning objects of its own, a decorator of a decorator), a ``PickleType`` column (the model
opts in with ``allow_pickle``) and a ``column_property`` computed from the row's own columns.
A deferred column is not cached: after a hit it is loaded on access, like after any load.
"""

from __future__ import annotations

import uuid  # noqa: TC003 - SQLAlchemy evaluates the Mapped[...] annotations
from typing import TYPE_CHECKING, Any

import factory
import pytest
from sqlalchemy import PickleType, String, Text, inspect
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column

from declcache.config import SQLAlchemySyncConfig
from declcache.repository import SQLAlchemySyncRepository
from tests._codec_cases import GUID, JSONText, Money, MoneyType, TagSet, assert_same

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from declcache import CacheConfig
    from tests.integration.conftest import StatementLog

TABLE = "hit_values_people"


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    first: Mapped[str] = mapped_column(String(50))
    last: Mapped[str] = mapped_column(String(50))
    full_name: Mapped[str] = column_property(first + " " + last)
    prefs: Mapped[Any] = mapped_column(PickleType, nullable=True)
    doc: Mapped[Any] = mapped_column(JSONText, nullable=True)
    guid: Mapped[uuid.UUID | None] = mapped_column(GUID, nullable=True)
    money: Mapped[Money | None] = mapped_column(MoneyType, nullable=True)
    tags: Mapped[set[str] | None] = mapped_column(TagSet, nullable=True)
    bio: Mapped[str] = mapped_column(Text, deferred=True)

    class CacheMeta:
        allow_pickle = True  # only this test's processes write its keys


class PersonRepo(SQLAlchemySyncRepository[Person]):
    model_type = Person


#: What a payload carries: every attribute but the deferred ``bio``.
CACHED = ("id", "first", "last", "full_name", "prefs", "doc", "guid", "money", "tags")
PICKLED = {1: "gold", 2: ("a", "b")}


class PersonFactory(factory.Factory):
    """Typical values; the ``nulls`` trait leaves every nullable column NULL."""

    class Meta:
        model = Person

    id = factory.Sequence(lambda n: n + 1)
    first = factory.Faker("first_name")
    last = factory.Faker("last_name")
    prefs = factory.LazyFunction(lambda: dict(PICKLED))
    # Integer keys, as assigned: a database read of JSON text gives them back as strings.
    doc = factory.LazyFunction(lambda: {1: "gold", "nested": [1.5, None, {"ok": True}]})
    guid = factory.Faker("uuid4", cast_to=None)
    money = factory.LazyAttribute(lambda person: Money(person.amount, "EUR"))
    tags = factory.LazyFunction(lambda: {"sql", "cache", "é"})
    bio = factory.Faker("paragraph")

    class Params:
        amount = factory.Faker("pydecimal", left_digits=6, right_digits=2)
        nulls = factory.Trait(prefs=None, doc=None, guid=None, money=None, tags=None)


@pytest.fixture(params=["memory", "redis", "memcached"])
def cache_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["json", "msgpack"])
def serializer(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(
    request: pytest.FixtureRequest, tmp_path: Any, cache_config: CacheConfig, serializer: str
) -> Iterator[SQLAlchemySyncConfig]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'hit_values.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    config = SQLAlchemySyncConfig(
        connection_string=url, cache_config=cache_config.with_overrides(serializer=serializer)
    )
    config.drop_all(Base.metadata)  # only this module's table
    config.create_all(Base.metadata)
    PersonFactory.reset_sequence(0)
    yield config
    config.drop_all(Base.metadata)
    config.dispose()


@pytest.fixture
def sent(db: SQLAlchemySyncConfig, statements: Callable[..., StatementLog]) -> StatementLog:
    return statements(db.engine)


def seed(db: SQLAlchemySyncConfig, *people: Person) -> None:
    with db.get_session() as session:
        session.add_all(people)
        session.commit()


def get(db: SQLAlchemySyncConfig, ident: int, *, use_cache: bool = True) -> Person:
    with db.get_session() as session:
        return PersonRepo(session=session, auto_expunge=True).get(ident, use_cache=use_cache)


def selects(sent: StatementLog) -> int:
    return sum(TABLE in sql for sql in sent.of_kind("SELECT"))


def test_a_hit_gives_what_a_database_read_gives(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    people = [*PersonFactory.build_batch(2), PersonFactory.build(nulls=True)]
    seed(db, *people)

    for person in people:
        get(db, person.id)  # a miss: fills the cache
        sent.clear()
        hit = get(db, person.id)
        assert selects(sent) == 0, f"person {person.id} was not a hit"
        read = get(db, person.id, use_cache=False)
        assert selects(sent) == 1

        for key in CACHED:
            assert_same(getattr(read, key), getattr(hit, key), f"person {person.id}: {key}")


def test_pickled_and_decorated_values_keep_their_own_types(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    person = PersonFactory.build(first="Ada", last="Lovelace")
    seed(db, person)
    get(db, person.id)

    sent.clear()
    hit = get(db, person.id)

    assert selects(sent) == 0
    assert hit.prefs == PICKLED
    assert [type(key) for key in hit.prefs] == [int, int]
    assert type(hit.prefs[2]) is tuple
    assert hit.doc == {"1": "gold", "nested": [1.5, None, {"ok": True}]}  # as JSON text reads
    assert (hit.guid, hit.money, hit.tags) == (person.guid, person.money, person.tags)
    assert hit.full_name == "Ada Lovelace"


def test_a_deferred_column_is_not_cached_and_loads_on_access(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    person = PersonFactory.build()
    seed(db, person)
    get(db, person.id)

    with db.get_session() as session:
        sent.clear()
        hit = PersonRepo(session=session).get(person.id)
        assert selects(sent) == 0
        assert "bio" in inspect(hit).unloaded
        attached = session.merge(hit, load=False)  # the hit itself once a session holds hits

        assert attached.bio == person.bio
        assert selects(sent) == 1
