"""Rows of every column type, loaded from SQLite and PostgreSQL, come back from the cache exactly.

Each test inserts rows made by factory-boy factories, loads them in a fresh session, caches
them, and reads them back in another fresh session: every column equals the database's value
and has its type, and the cache answered alone (zero SQL statements, counted with the
``before_cursor_execute`` event). A cached entity is detached with its identity key:
``session.merge(obj, load=False)`` and ``session.add(obj)`` never query or INSERT.

The databases themselves change some values on the way in (SQLite drops time zones, turns NaN
into NULL and stores Numeric as a float; PostgreSQL converts ``timestamptz`` to the session's
zone): ``test_what_each_database_gives_back`` pins those down, so that the cache is compared
with what the database really returns.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import math
import zoneinfo
from typing import TYPE_CHECKING, Any

import factory
import pytest
import sqlalchemy as sa
from factory.alchemy import SQLAlchemyModelFactory
from factory.random import randgen, reseed_random
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    String,
    Text,
    Time,
    Uuid,
    inspect,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.orm.exc import DetachedInstanceError

from declcache import CacheConfig, CacheManager, Lookup
from tests._codec_cases import assert_same

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine

    from declcache import CacheConfig as Config
    from tests.integration.conftest import StatementLog

# -- models ---------------------------------------------------------------------------------


class Color(enum.Enum):
    RED = "r"
    GREEN = 2
    BLUE = "blue-ish"


MOODS = ("happy", "sad", "so-so")


class Base(DeclarativeBase):
    pass


class ExactOwner(Base):
    """Target of the rows' relationship, which the cache never carries."""

    __tablename__ = "exact_owners"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class _Columns:
    """The columns both databases have (as a mixin, copied into each model)."""

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("exact_owners.id"))
    ts_naive: Mapped[Any] = mapped_column(DateTime(timezone=False), nullable=True)
    ts_aware: Mapped[Any] = mapped_column(DateTime(timezone=True), nullable=True)
    day: Mapped[Any] = mapped_column(Date, nullable=True)
    clock: Mapped[Any] = mapped_column(Time, nullable=True)
    span: Mapped[Any] = mapped_column(Interval, nullable=True)
    amount: Mapped[Any] = mapped_column(Numeric, nullable=True)
    money: Mapped[Any] = mapped_column(Numeric(20, 6), nullable=True)
    ratio: Mapped[Any] = mapped_column(Float, nullable=True)
    small: Mapped[Any] = mapped_column(Integer, nullable=True)
    big: Mapped[Any] = mapped_column(BigInteger, nullable=True)
    flag: Mapped[Any] = mapped_column(Boolean, nullable=True)
    name: Mapped[Any] = mapped_column(String(200), nullable=True)
    body: Mapped[Any] = mapped_column(Text, nullable=True)
    uid: Mapped[Any] = mapped_column(Uuid(as_uuid=True), nullable=True)
    uid_text: Mapped[Any] = mapped_column(Uuid(as_uuid=False), nullable=True)
    color: Mapped[Any] = mapped_column(Enum(Color, name="exact_color"), nullable=True)
    mood: Mapped[Any] = mapped_column(Enum(*MOODS, name="exact_mood"), nullable=True)
    doc: Mapped[Any] = mapped_column(JSON, nullable=True)
    blob: Mapped[Any] = mapped_column(LargeBinary, nullable=True)

    class CacheMeta:
        ttl = 600


class SqliteRow(_Columns, Base):
    __tablename__ = "exact_sqlite_rows"

    owner: Mapped[ExactOwner | None] = relationship()


class PgRow(_Columns, Base):
    """Adds what only PostgreSQL has: arrays, JSONB, ``time with time zone``."""

    __tablename__ = "exact_pg_rows"

    clock_tz: Mapped[Any] = mapped_column(Time(timezone=True), nullable=True)
    docb: Mapped[Any] = mapped_column(postgresql.JSONB, nullable=True)
    numbers: Mapped[Any] = mapped_column(postgresql.ARRAY(Integer), nullable=True)
    words: Mapped[Any] = mapped_column(postgresql.ARRAY(String), nullable=True)
    grid: Mapped[Any] = mapped_column(postgresql.ARRAY(Integer, dimensions=2), nullable=True)

    owner: Mapped[ExactOwner | None] = relationship()


Base.registry.configure()


def column_keys(model: type) -> list[str]:
    return [prop.key for prop in inspect(model).column_attrs]


# -- factories ------------------------------------------------------------------------------


def _json_document() -> Any:
    rng = randgen
    leaf = rng.choice([None, True, False, rng.randint(-(2**53), 2**53), rng.random() * 1e6, "é ☃"])
    return {"leaf": leaf, "list": [leaf, [leaf, {"deep": leaf}]], "ünïcode": "日本語 🎉"}


class OwnerFactory(SQLAlchemyModelFactory):
    class Meta:
        model = ExactOwner
        sqlalchemy_session_persistence = "flush"

    name = factory.Faker("name")


class _RowFactory(SQLAlchemyModelFactory):
    """Typical values, plus two traits: ``nulls`` (every nullable column NULL) and ``edges``."""

    class Meta:
        abstract = True
        sqlalchemy_session_persistence = "flush"

    owner = factory.SubFactory(OwnerFactory)
    ts_naive = factory.Faker("date_time")
    ts_aware = factory.Faker("date_time", tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))
    day = factory.Faker("date_object")
    clock = factory.Faker("time_object")
    span = factory.Faker("time_delta", end_datetime="+400d")
    amount = factory.Faker("pydecimal", left_digits=12, right_digits=6)
    money = factory.Faker("pydecimal", left_digits=10, right_digits=6)
    ratio = factory.Faker("pyfloat")
    small = factory.Faker("pyint", min_value=-(2**31), max_value=2**31 - 1)
    big = factory.Faker("pyint", min_value=-(2**63), max_value=2**63 - 1)
    flag = factory.Faker("pybool")
    name = factory.Faker("name")
    body = factory.Faker("text")
    uid = factory.Faker("uuid4", cast_to=None)
    uid_text = factory.Faker("uuid4")
    color = factory.Faker("enum", enum_cls=Color)
    mood = factory.Faker("random_element", elements=MOODS)
    doc = factory.LazyFunction(_json_document)
    blob = factory.Faker("binary", length=48)

    class Params:
        nulls = factory.Trait(
            owner=None,
            **dict.fromkeys(
                [key for key in column_keys(SqliteRow) if key not in {"id", "owner_id"}]
            ),
        )
        edges = factory.Trait(
            ts_naive=dt.datetime(1900, 1, 1, 0, 0, 0, 1),
            ts_aware=dt.datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=dt.UTC),
            day=dt.date(1, 1, 1),
            clock=dt.time(23, 59, 59, 999999),
            span=dt.timedelta(days=-10_000, microseconds=1),
            amount=decimal.Decimal("-98765432109876.000001"),
            money=decimal.Decimal("0.000001"),
            ratio=-math.inf,
            small=-(2**31),
            big=2**63 - 1,
            flag=False,
            name="\t\n\r\x1b\x7f \u2028 日本語 🎉 e\u0301",
            body="",
            uid_text="00000000-0000-0000-0000-000000000000",
            color=Color.GREEN,
            mood="so-so",
            doc=[],
            blob=bytes(range(256)),
        )


class SqliteRowFactory(_RowFactory):
    class Meta:
        model = SqliteRow


def _pg_text() -> list[str | None]:
    return ["", None, "NULL", "a,b", "{}", 'q"uote', "back\\slash", "日本語"]


class PgRowFactory(_RowFactory):
    class Meta:
        model = PgRow

    docb = factory.LazyFunction(_json_document)
    numbers = factory.LazyFunction(lambda: [randgen.randint(-5, 5) for _ in "abc"])
    words = factory.Faker("words", nb=4)
    grid = factory.LazyFunction(lambda: [[1, 2], [3, 4]])

    class Params:
        nulls = factory.Trait(
            owner=None,
            **dict.fromkeys([key for key in column_keys(PgRow) if key not in {"id", "owner_id"}]),
        )
        edges = factory.Trait(
            ts_aware=dt.datetime(1900, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=-9))),
            clock_tz=dt.time(0, 0, tzinfo=dt.timezone(dt.timedelta(hours=14))),
            amount=decimal.Decimal("NaN"),
            money=decimal.Decimal("-99999999999999.999999"),
            ratio=math.nan,
            name="\t\n\r\x1b\x7f \u2028 日本語 🎉 e\u0301",
            docb={"": {"nested": [None, True, 1.5, "é"]}, "n": None},
            numbers=[None, 0, -(2**31), 2**31 - 1],
            words=_pg_text(),
            grid=[],
            blob=b"",
        )

    @factory.lazy_attribute
    def clock_tz(self) -> dt.time:
        """Faker's times are naive; ``time with time zone`` keeps an offset."""
        offset = dt.timedelta(minutes=randgen.randrange(-12 * 60, 14 * 60, 15))
        return dt.time(12, 34, 56, 789, tzinfo=dt.timezone(offset))


# -- fixtures --------------------------------------------------------------------------------


class Database:
    """One database under test: its engine, its row model and factory."""

    def __init__(
        self, name: str, engine: Engine, model: type, row_factory: type[_RowFactory]
    ) -> None:
        self.name = name
        self.engine = engine
        self.model = model
        self.factory = row_factory

    def session(self) -> Session:
        return Session(self.engine)

    def insert(self, count: int = 3, **traits: bool) -> list[int]:
        """Insert ``count`` rows plus one ``nulls`` and one ``edges`` row; their ids."""
        with self.session() as session:
            OwnerFactory._meta.sqlalchemy_session = session
            self.factory._meta.sqlalchemy_session = session
            try:
                rows = self.factory.create_batch(count, **traits)
                rows.append(self.factory.create(nulls=True))
                rows.append(self.factory.create(edges=True))
                ids = [row.id for row in rows]
                session.commit()
            finally:
                OwnerFactory._meta.sqlalchemy_session = None
                self.factory._meta.sqlalchemy_session = None
        return ids


@pytest.fixture(autouse=True)
def _seeded() -> None:
    reseed_random(20240601)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'exact.db'}")
        model, row_factory = SqliteRow, SqliteRowFactory
    else:
        engine = sa.create_engine(request.getfixturevalue("postgres_url"))
        model, row_factory = PgRow, PgRowFactory
    tables = [ExactOwner.__table__, model.__table__]
    Base.metadata.drop_all(engine, tables=tables)
    Base.metadata.create_all(engine, tables=tables)
    try:
        yield Database(request.param, engine, model, row_factory)
    finally:
        Base.metadata.drop_all(engine, tables=tables)
        engine.dispose()


@pytest.fixture
def memory_manager(key_prefix: str) -> CacheManager:
    return CacheManager(CacheConfig(key_prefix=key_prefix))


def load_and_cache(database: Database, manager: CacheManager, ids: list[int]) -> dict[int, Any]:
    """Load the rows in a fresh session, cache them, and return their values by id."""
    keys = column_keys(database.model)
    with database.session() as session:
        rows = session.scalars(sa.select(database.model).where(database.model.id.in_(ids))).all()
        assert sorted(row.id for row in rows) == sorted(ids)
        for row in rows:
            assert manager.set(database.model, row), f"row {row.id} was not cached"
        return {row.id: {key: getattr(row, key) for key in keys} for row in rows}


# -- the cached entity equals the database's --------------------------------------------------


def test_cached_rows_equal_the_database_rows_and_need_no_query(
    database: Database,
    cache_config: Config,
    statements: Callable[[Engine], StatementLog],
) -> None:
    manager = CacheManager(cache_config)
    ids = database.insert()
    loaded = load_and_cache(database, manager, ids)
    log = statements(database.engine)

    with database.session() as session, log.fresh() as sent:
        merged = []
        for ident in ids:
            cached = manager.get(database.model, ident)
            assert cached is not Lookup.MISS
            merged.append(session.merge(cached, load=False))
        many = manager.get_many(database.model, ids)
        assert Lookup.MISS not in many
        values = [{key: getattr(obj, key) for key in loaded[obj.id]} for obj in merged + many]

        assert sent == []  # the cache answered every read, merge and attribute access
    for row in values:
        for key, value in row.items():
            assert_same(loaded[row["id"]][key], value, f"{database.name} row {row['id']}.{key}")


def test_merge_without_load_attaches_without_a_query(
    database: Database,
    memory_manager: CacheManager,
    statements: Callable[[Engine], StatementLog],
) -> None:
    [ident, *_] = ids = database.insert(count=1)
    loaded = load_and_cache(database, memory_manager, ids)
    log = statements(database.engine)
    cached = memory_manager.get(database.model, ident)

    with database.session() as session, log.fresh() as sent:
        merged = session.merge(cached, load=False)

        assert inspect(merged).persistent
        assert session.get(database.model, ident) is merged  # from the identity map
        assert merged.name == loaded[ident]["name"]
        assert sent == []


def test_adding_a_cached_entity_never_inserts_it(
    database: Database,
    memory_manager: CacheManager,
    statements: Callable[[Engine], StatementLog],
) -> None:
    ids = database.insert(count=1)
    load_and_cache(database, memory_manager, ids)
    log = statements(database.engine)
    cached = memory_manager.get(database.model, ids[0])
    state = inspect(cached)
    assert state.detached
    assert state.key is not None

    with database.session() as session, log.fresh() as sent:
        session.add(cached)
        assert inspect(cached).persistent
        assert session.get(database.model, ids[0]) is cached
        session.commit()

        assert sent == []  # nothing to flush: no INSERT, no UPDATE, no SELECT

    with database.session() as session, log.fresh() as sent:
        session.add(cached)
        cached.body = "changed through a cached entity"
        session.commit()

        assert log.of_kind("INSERT") == []
        assert len(log.of_kind("UPDATE")) == 1
    with database.session() as session:
        count = session.scalar(sa.select(sa.func.count()).select_from(database.model))
        body = session.get(database.model, ids[0]).body
    assert count == len(ids)  # the rows insert() made, no more
    assert body == "changed through a cached entity"


def test_relationships_of_a_cached_entity_are_not_loaded(
    database: Database, memory_manager: CacheManager
) -> None:
    ids = database.insert(count=1)
    loaded = load_and_cache(database, memory_manager, ids)
    cached = memory_manager.get(database.model, ids[0])

    assert cached.owner_id == loaded[ids[0]]["owner_id"] is not None  # columns are cached
    assert "owner" in inspect(cached).unloaded
    with pytest.raises(DetachedInstanceError):
        _ = cached.owner


# -- what the databases themselves do ---------------------------------------------------------


def test_what_each_database_gives_back(database: Database) -> None:
    """Values the database changes on the way in: the cache must reproduce these, not inputs."""
    nine_am_tokyo = dt.datetime(2024, 7, 1, 9, 0, tzinfo=zoneinfo.ZoneInfo("Asia/Tokyo"))
    values: dict[str, Any] = {
        "ts_aware": nine_am_tokyo,
        "amount": decimal.Decimal("12345678901234567890.123456789"),
        "money": decimal.Decimal("1.5"),
        "ratio": math.nan,
        "uid_text": "12345678-1234-5678-1234-567812345678",
    }
    with database.session() as session:
        session.add(database.model(id=1, **values))
        session.commit()
    with database.session() as session:
        row = session.get(database.model, 1)
        assert row is not None

    assert row.money == decimal.Decimal("1.500000")  # both: padded to the column's scale
    assert row.uid_text == values["uid_text"]
    if database.name == "sqlite":
        # The wall clock is stored without its zone and read back naive, not converted.
        assert row.ts_aware == dt.datetime(2024, 7, 1, 9, 0)
        assert row.ratio is None  # SQLite stores NaN as NULL
        assert row.amount != values["amount"]  # Numeric goes through a float
        assert type(row.amount) is decimal.Decimal
    else:
        # Converted to the session's TimeZone, as a ZoneInfo (the server's is UTC here).
        assert row.ts_aware == nine_am_tokyo
        assert isinstance(row.ts_aware.tzinfo, zoneinfo.ZoneInfo)
        assert row.ts_aware.utcoffset() == dt.timedelta(0)
        assert math.isnan(row.ratio)
        assert row.amount == values["amount"]


def test_timestamptz_keeps_the_sessions_zone(
    postgres_url: str, memory_manager: CacheManager
) -> None:
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    engine = sa.create_engine(postgres_url, connect_args={"options": "-c timezone=Europe/Berlin"})
    tables = [ExactOwner.__table__, PgRow.__table__]
    Base.metadata.drop_all(engine, tables=tables)
    Base.metadata.create_all(engine, tables=tables)
    try:
        # 02:30 happens twice in Berlin that night; this is the second one (CET, fold=1).
        second = dt.datetime(2023, 10, 29, 1, 30, tzinfo=dt.UTC)
        with Session(engine) as session:
            session.add(PgRow(id=1, ts_aware=second))
            session.commit()
        with Session(engine) as session:
            row = session.get(PgRow, 1)
            assert row is not None
            assert row.ts_aware.tzinfo == berlin
            assert row.ts_aware.fold == 1
            assert memory_manager.set(PgRow, row)
            loaded = row.ts_aware
        cached = memory_manager.get(PgRow, 1).ts_aware

        assert cached.utcoffset() == loaded.utcoffset()
        assert cached == loaded
        assert cached.tzinfo == loaded.tzinfo
    finally:
        Base.metadata.drop_all(engine, tables=tables)
        engine.dispose()


def test_sqlite_keeps_text_with_nul_characters(
    tmp_path: Path, memory_manager: CacheManager
) -> None:
    """SQLite (unlike PostgreSQL) stores NUL in text; the cache keeps it too."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'nul.db'}")
    Base.metadata.create_all(engine, tables=[ExactOwner.__table__, SqliteRow.__table__])
    text = "before\x00after"
    with Session(engine) as session:
        session.add(SqliteRow(id=1, name=text))
        session.commit()
    with Session(engine) as session:
        row = session.get(SqliteRow, 1)
        assert row is not None
        assert row.name == text
        assert memory_manager.set(SqliteRow, row)

    assert memory_manager.get(SqliteRow, 1).name == text
    engine.dispose()


@pytest.mark.parametrize("row_factory", [SqliteRowFactory, PgRowFactory])
@pytest.mark.parametrize("traits", [{}, {"edges": True}])
def test_factories_fill_every_column(
    row_factory: type[_RowFactory], traits: dict[str, bool]
) -> None:
    """So that the round trip above sees a value, not NULL, of every type."""
    row = row_factory.build(**traits)
    keys = column_keys(row_factory._meta.model)

    assert [key for key in keys if getattr(row, key) is None] == ["id", "owner_id"]
