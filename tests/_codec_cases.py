"""The model, strategies and exact comparison of the codec round-trip tests.

Shared by ``tests/unit/test_codec.py`` (the codec alone),
``tests/integration/test_roundtrip_backends.py`` (through ``CacheManager`` and each backend)
and ``tests/integration/test_exact_types_db.py`` (rows loaded from SQLite and PostgreSQL).

Exactly means: the same value *and* the same Python ``type()`` (for aware datetimes and times
also the same wall clock and ``utcoffset()``), nested values included. Instances are built
detached, as if loaded and expunged, without a database and without calling ``__init__``.

This is not a test module, so pytest does not rewrite its ``assert`` statements: each one
carries its own message with the values compared.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    Float,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    String,
    Text,
    Time,
    TypeDecorator,
    Uuid,
    inspect,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, make_transient_to_detached, mapped_column
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.types import CHAR, UserDefinedType

# -- the model -----------------------------------------------------------------------------


class Color(enum.Enum):
    """Values unlike the names, of mixed types, and an alias: the codec must use names."""

    RED = "r"
    GREEN = 2
    BLUE = "blue-ish"
    CRIMSON = "r"  # an alias of RED


class Tagged(UserDefinedType[Any]):
    """Another package's type, no decorator: falls back to the tagged encoding by runtime type."""

    cache_ok = True

    def get_col_spec(self, **_kw: Any) -> str:
        return "TAGGED"


class JSONText(TypeDecorator[Any]):
    """JSON kept as TEXT: the value is the document, the database holds its text."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else json.dumps(value)

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else json.loads(value)


class GUID(TypeDecorator[uuid.UUID]):
    """SQLAlchemy's backend-agnostic GUID recipe: a native UUID on PostgreSQL, else CHAR(32)."""

    impl = CHAR
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.UUID())
        return dialect.type_descriptor(CHAR(32))

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        if value is None:
            return None
        if dialect.name == "postgresql":
            return str(value)
        return f"{value.int:032x}"

    def process_result_value(self, value: Any, dialect: Any) -> uuid.UUID | None:
        if value is None or isinstance(value, uuid.UUID):
            return value
        return uuid.UUID(value)


@dataclass(frozen=True)
class Money:
    amount: decimal.Decimal
    currency: str


class MoneyType(TypeDecorator[Money]):
    """A decorator returning objects of its own: ``Money`` stored as ``"EUR 12.50"``."""

    impl = String(64)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else f"{value.currency} {value.amount}"

    def process_result_value(self, value: Any, dialect: Any) -> Money | None:
        if value is None:
            return None
        currency, amount = value.split(" ")
        return Money(decimal.Decimal(amount), currency)


class TagSet(TypeDecorator[set[str]]):
    """A decorator of a decorator: a set, bound as a sorted list, which JSONText stores."""

    impl = JSONText
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> list[str] | None:
        return None if value is None else sorted(value)

    def process_result_value(self, value: Any, dialect: Any) -> set[str] | None:
        return None if value is None else set(value)


class Base(DeclarativeBase):
    pass


class Everything(Base):
    """One nullable column of every type the codec has an encoding for."""

    __tablename__ = "everything"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ts_naive: Mapped[Any] = mapped_column(DateTime(timezone=False))
    ts_aware: Mapped[Any] = mapped_column(DateTime(timezone=True))
    ts_pg: Mapped[Any] = mapped_column(postgresql.TIMESTAMP(timezone=True))
    day: Mapped[Any] = mapped_column(Date)
    clock: Mapped[Any] = mapped_column(Time)
    clock_tz: Mapped[Any] = mapped_column(Time(timezone=True))
    span: Mapped[Any] = mapped_column(Interval)
    span_pg: Mapped[Any] = mapped_column(postgresql.INTERVAL)
    amount: Mapped[Any] = mapped_column(Numeric(asdecimal=True))
    amount_float: Mapped[Any] = mapped_column(Numeric(asdecimal=False))
    ratio: Mapped[Any] = mapped_column(Float)
    ratio_decimal: Mapped[Any] = mapped_column(Float(asdecimal=True))
    small: Mapped[Any] = mapped_column(Integer)
    big: Mapped[Any] = mapped_column(BigInteger)
    flag: Mapped[Any] = mapped_column(Boolean)
    name: Mapped[Any] = mapped_column(String(50))
    body: Mapped[Any] = mapped_column(Text)
    uid: Mapped[Any] = mapped_column(Uuid(as_uuid=True))
    uid_text: Mapped[Any] = mapped_column(Uuid(as_uuid=False))
    uid_pg: Mapped[Any] = mapped_column(postgresql.UUID(as_uuid=True))
    color: Mapped[Any] = mapped_column(Enum(Color))
    mood: Mapped[Any] = mapped_column(Enum("happy", "sad", "so-so", name="mood"))
    doc: Mapped[Any] = mapped_column(JSON)
    docb: Mapped[Any] = mapped_column(postgresql.JSONB)
    blob: Mapped[Any] = mapped_column(LargeBinary)
    numbers: Mapped[Any] = mapped_column(postgresql.ARRAY(Integer))
    words: Mapped[Any] = mapped_column(postgresql.ARRAY(String))
    grid: Mapped[Any] = mapped_column(postgresql.ARRAY(Integer, dimensions=2))
    tagged: Mapped[Any] = mapped_column(Tagged)
    json_text: Mapped[Any] = mapped_column(JSONText)
    guid: Mapped[Any] = mapped_column(GUID)
    money: Mapped[Any] = mapped_column(MoneyType)
    tags: Mapped[Any] = mapped_column(TagSet)

    class CacheMeta:
        ttl = 600

    def __init__(self, **_values: Any) -> None:
        raise AssertionError("declcache must never call a model's __init__")


Base.registry.configure()

COLUMNS = tuple(prop.key for prop in inspect(Everything).column_attrs)
FORMATS = ("json", "msgpack")


def loaded(model: type, **values: Any) -> Any:
    """An instance as if loaded from the database and expunged; ``__init__`` is not called.

    Columns not given are NULL.
    """
    mapper = inspect(model)
    instance = mapper.class_manager.new_instance()
    for prop in mapper.column_attrs:
        set_committed_value(instance, prop.key, values.get(prop.key))
    make_transient_to_detached(instance)
    return instance


# -- exact comparison ------------------------------------------------------------------------


def assert_same(expected: Any, actual: Any, where: str = "value") -> None:
    """Same value and same ``type()``, recursively; NaN equals NaN, ``-0.0`` is not ``0.0``."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} is not {type(expected)}"
    if isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), f"{where}: {actual!r} is not NaN"
        else:
            assert actual == expected, f"{where}: {actual!r} != {expected!r}"
            assert math.copysign(1, actual) == math.copysign(1, expected), (
                f"{where}: {actual!r} != {expected!r}"
            )
    elif isinstance(expected, decimal.Decimal):
        # str() is exact: sign, digits, exponent, NaN/sNaN and their payloads.
        assert str(actual) == str(expected), f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, dt.datetime | dt.time):
        _assert_same_clock(expected, actual, where)
    elif isinstance(expected, enum.Enum):
        assert actual is expected, f"{where}: {actual!r} is not {expected!r}"
    elif isinstance(expected, list):
        assert len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for index, (left, right) in enumerate(zip(expected, actual, strict=True)):
            assert_same(left, right, f"{where}[{index}]")
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}[{key!r}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def _assert_same_clock(expected: dt.datetime | dt.time, actual: Any, where: str) -> None:
    # Aware values in a zone's fold or gap never == a fixed-offset copy (PEP 495), so compare
    # the wall clock and the offset, which together fix the instant; == where it is meaningful.
    differ = f"{where}: {actual!r} != {expected!r}"
    assert actual.replace(tzinfo=None) == expected.replace(tzinfo=None), differ
    assert (actual.tzinfo is None) == (expected.tzinfo is None), differ
    assert actual.utcoffset() == expected.utcoffset(), differ
    if expected.tzinfo is None or isinstance(expected.tzinfo, dt.timezone):
        assert actual == expected, differ
        assert actual.tzinfo == expected.tzinfo, differ


def assert_same_instance(expected: Any, actual: Any) -> None:
    for key in COLUMNS:
        assert_same(getattr(expected, key), getattr(actual, key), key)


# -- strategies -------------------------------------------------------------------------------

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
#: Any unicode text but lone surrogates (which no database stores); control characters included.
TEXT = st.text(st.characters(blacklist_categories=["Cs"]))
#: Whole-second offsets: CPython 3.11's ``fromisoformat`` drops an offset's microseconds
#: (``+00:00:00.000001`` parses as UTC); no real zone or database has such offsets.
FIXED_OFFSETS = st.integers(-86399, 86399).map(lambda s: dt.timezone(dt.timedelta(seconds=s)))
ZONES = st.one_of(FIXED_OFFSETS, st.just(dt.UTC), st.timezones())
AWARE = st.datetimes(timezones=ZONES)
DECIMALS = st.one_of(
    st.decimals(),  # NaN, sNaN, ±Infinity, any exponent
    st.decimals(places=30, min_value=-(10**20), max_value=10**20),
    st.builds(
        lambda sign, digits, exponent: decimal.Decimal((sign, digits, exponent)),
        st.integers(0, 1),
        st.lists(st.integers(0, 9), min_size=1, max_size=80).map(tuple),
        st.integers(-400, 400),
    ),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats() | TEXT,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(TEXT, children, max_size=5),
    max_leaves=20,
)
TAGGED_VALUES = st.one_of(
    st.booleans(),
    INT64,
    st.floats(),
    TEXT,
    DECIMALS,
    st.datetimes(timezones=st.none() | FIXED_OFFSETS),
    st.dates(),
    st.times(timezones=st.none() | FIXED_OFFSETS),
    st.timedeltas(),
    st.uuids(),
    st.binary(),
    st.lists(JSON_VALUES, max_size=4),
    st.dictionaries(TEXT, JSON_VALUES, max_size=4),
)

#: A strategy of non-NULL values for each column, as the database driver would return them.
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "id": INT64,
    "ts_naive": st.datetimes(),
    "ts_aware": AWARE,
    "ts_pg": AWARE,
    "day": st.dates(),
    "clock": st.times(),
    "clock_tz": st.times(timezones=FIXED_OFFSETS),
    "span": st.timedeltas(),
    "span_pg": st.timedeltas(),
    "amount": DECIMALS,
    "amount_float": st.floats(),
    "ratio": st.floats(),
    "ratio_decimal": DECIMALS,
    "small": INT32,
    "big": INT64,
    "flag": st.booleans(),
    "name": TEXT,
    "body": TEXT,
    "uid": st.uuids(),
    "uid_text": st.uuids().map(str),
    "uid_pg": st.uuids(),
    "color": st.sampled_from(Color),
    "mood": st.sampled_from(["happy", "sad", "so-so"]),
    "doc": JSON_VALUES.filter(lambda value: value is not None),
    "docb": JSON_VALUES.filter(lambda value: value is not None),
    "blob": st.binary(max_size=256),
    "numbers": st.lists(st.none() | INT32, max_size=8),
    "words": st.lists(st.none() | TEXT, max_size=8),
    "grid": st.integers(0, 3).flatmap(
        lambda width: st.lists(st.lists(INT32, min_size=width, max_size=width), max_size=4)
    ),
    "tagged": TAGGED_VALUES,
    # What the decorators give back after a database read: JSON object keys are strings.
    "json_text": JSON_VALUES.filter(lambda value: value is not None),
    "guid": st.uuids(),
    "money": st.builds(
        Money,
        st.decimals(allow_nan=False, allow_infinity=False),
        st.sampled_from(["EUR", "USD", "JPY"]),
    ),
    "tags": st.sets(TEXT, max_size=5),
}
assert set(VALUES) == set(COLUMNS), "every column of Everything needs a strategy"


@st.composite
def rows(draw: st.DrawFn, ident: st.SearchStrategy[int] = INT64) -> dict[str, Any]:
    """Column values of one ``Everything`` row; any column but ``id`` may be NULL."""
    values = {"id": draw(ident)}
    for key in COLUMNS:
        if key != "id":
            values[key] = draw(st.none() | VALUES[key])
    return values
