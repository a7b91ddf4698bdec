"""The column codec round-trips every common column type exactly, through JSON and msgpack.

Exactly means: the same value *and* the same Python ``type()`` (for aware datetimes and times
also the same wall clock and ``utcoffset()``), nested values included. Instances are built
detached, as if loaded and expunged, without a database and without calling ``__init__``.
A ``TypeDecorator`` comes back as a database read gives it: through its own processing.

The model, the strategies and :func:`assert_same` live in ``tests/_codec_cases.py``, shared
with ``tests/integration/test_roundtrip_backends.py`` and ``test_exact_types_db.py``.
Further sections: which attributes a payload carries (``column_property``, deferred,
``query_expression``), ``PickleType`` and its opt-in, and the primary-key helpers.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import uuid
import zoneinfo
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    ForeignKey,
    Integer,
    PickleType,
    String,
    TypeDecorator,
    case,
    cast,
    func,
    inspect,
    literal,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    column_property,
    deferred,
    mapped_column,
    query_expression,
)

from declcache._codec import (
    ModelCodec,
    UnencodableValueError,
    cached_columns,
    fingerprint,
    pickled_columns,
)
from declcache.serializers import SerializationFormat, resolve_format
from tests._codec_cases import (
    COLUMNS,
    FORMATS,
    GUID,
    VALUES,
    Color,
    Everything,
    JSONText,
    Money,
    assert_same,
    assert_same_instance,
    loaded,
    rows,
)

if TYPE_CHECKING:
    from collections.abc import Callable


def fmt(name: str) -> SerializationFormat:
    return resolve_format(name)[1]


def round_trip(codec: ModelCodec, instance: Any, format_name: str) -> Any:
    """Encode, serialize to bytes, deserialize and decode, as the manager does."""
    format_ = fmt(format_name)
    payload = format_.dumps(codec.encode(instance))
    data = format_.loads(payload.encode() if isinstance(payload, str) else payload)
    return codec.decode(data)


CODEC = ModelCodec(inspect(Everything))


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("format_name", FORMATS)
@pytest.mark.parametrize("column", COLUMNS)
@given(data=st.data())
def test_each_column_type_round_trips_exactly(
    column: str, format_name: str, data: st.DataObject
) -> None:
    value = data.draw(VALUES[column], label=column)
    values = {"id": 1, column: value}
    original = loaded(Everything, **values)

    decoded = round_trip(CODEC, original, format_name)

    assert_same(value, getattr(decoded, column), column)


@pytest.mark.parametrize("format_name", FORMATS)
@settings(max_examples=200)
@given(values=rows())
def test_whole_rows_with_nulls_round_trip_exactly(format_name: str, values: dict[str, Any]) -> None:
    original = loaded(Everything, **values)

    decoded = round_trip(CODEC, original, format_name)

    assert_same_instance(original, decoded)


@pytest.mark.parametrize("format_name", FORMATS)
def test_all_null_row_round_trips(format_name: str) -> None:
    decoded = round_trip(CODEC, loaded(Everything, id=7), format_name)

    assert decoded.id == 7
    assert all(getattr(decoded, key) is None for key in COLUMNS if key != "id")


@pytest.mark.parametrize("format_name", FORMATS)
@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("ratio", math.inf),
        ("ratio", -math.inf),
        ("ratio", math.nan),
        ("ratio", -0.0),
        ("ratio", 5e-324),
        ("amount", decimal.Decimal("-0.000")),
        ("amount", decimal.Decimal("1E+999999")),
        ("amount", decimal.Decimal("-1.2345678901234567890123456789012345678901234567890E-300")),
        ("amount", decimal.Decimal("-sNaN42")),
        ("amount", decimal.Decimal("-Infinity")),
        ("big", -(2**63)),
        ("big", 2**63 - 1),
        ("name", "\x00\x01\t\n\r\x1b\x7f\u2028\ufeff"),
        ("body", "日本語 🎉 e\u0301 \U0010ffff"),
        ("blob", b""),
        ("blob", bytes(range(256))),
        ("doc", {"": [None, {"nested": [1, 2.5, "x", False]}]}),
        ("doc", []),
        ("doc", 0),
        ("numbers", []),
        ("numbers", [None, 1, None]),
        ("words", ["", None, "a,b", "{}", 'q"uote']),
        ("ts_aware", dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5)))),
        ("ts_aware", dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)),
        ("ts_aware", dt.datetime(2020, 1, 1, tzinfo=dt.timezone(dt.timedelta(seconds=-1)))),
        ("clock_tz", dt.time(0, 0, tzinfo=dt.timezone(dt.timedelta(hours=-12)))),
        ("span", dt.timedelta(microseconds=-1)),
        ("span", dt.timedelta.max),
        ("span", dt.timedelta.min),
        ("color", Color.CRIMSON),
        ("color", Color.GREEN),
    ],
)
def test_edge_values_round_trip_exactly(format_name: str, column: str, value: Any) -> None:
    decoded = round_trip(CODEC, loaded(Everything, id=1, **{column: value}), format_name)

    assert_same(value, getattr(decoded, column), column)


@pytest.mark.parametrize("format_name", FORMATS)
def test_zoneinfo_datetimes_keep_their_zone(format_name: str) -> None:
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    in_fold = dt.datetime(2023, 10, 29, 2, 30, tzinfo=berlin, fold=1)
    summer = dt.datetime(2023, 6, 1, 12, 0, tzinfo=berlin)
    decoded_fold = round_trip(CODEC, loaded(Everything, id=1, ts_aware=in_fold), format_name)
    decoded_summer = round_trip(CODEC, loaded(Everything, id=1, ts_aware=summer), format_name)

    # The zone survives, not just the offset: the fold and DST arithmetic still hold.
    assert decoded_fold.ts_aware.utcoffset() == in_fold.utcoffset()
    assert decoded_summer.ts_aware.tzinfo == berlin
    assert decoded_fold.ts_aware == in_fold
    half_year = dt.timedelta(days=180)
    assert (decoded_summer.ts_aware + half_year).utcoffset() == (summer + half_year).utcoffset()


# -- the decoded instance ---------------------------------------------------------------------


@pytest.mark.parametrize("format_name", FORMATS)
@settings(max_examples=25)
@given(values=rows())
def test_decoded_instance_is_detached_with_its_identity_and_all_columns(
    format_name: str, values: dict[str, Any]
) -> None:
    decoded = round_trip(CODEC, loaded(Everything, **values), format_name)

    state = inspect(decoded)
    assert type(decoded) is Everything
    assert state.detached
    assert not state.transient
    assert not state.pending
    assert state.key == (Everything, (values["id"],), None)
    assert state.identity == (values["id"],)
    assert state.unloaded == set()
    assert not state.modified
    assert state.committed_state == {}


def test_decode_never_calls_init() -> None:
    with pytest.raises(AssertionError, match="never call"):
        Everything(id=1)  # the guard is armed

    decoded = round_trip(CODEC, loaded(Everything, id=3, name="x"), "json")

    assert decoded.name == "x"


def test_decode_never_calls_init_of_a_counting_model() -> None:
    class CountingBase(DeclarativeBase):
        pass

    class Counting(CountingBase):
        __tablename__ = "counting"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]
        calls = 0

        def __init__(self, **values: Any) -> None:
            type(self).calls += 1
            super().__init__(**values)

    codec = ModelCodec(inspect(Counting))
    built = Counting(id=1, name="a")
    assert Counting.calls == 1

    decoded = codec.decode(codec.encode(built))

    assert Counting.calls == 1
    assert (decoded.id, decoded.name) == (1, "a")


def test_encode_refuses_an_unloaded_column() -> None:
    instance = loaded(Everything, id=1)
    del inspect(instance).dict["name"]  # as if deferred or expired

    with pytest.raises(UnencodableValueError, match="name"):
        CODEC.encode(instance)


# -- bad payloads -----------------------------------------------------------------------------

#: What ``codec.decode`` documents it raises for data that does not fit the model.
DOCUMENTED = ValueError


def _payload(**changes: Any) -> list[Any]:
    payload = CODEC.encode(loaded(Everything, id=1))
    for key, value in changes.items():
        payload[COLUMNS.index(key)] = value
    return payload


@pytest.mark.parametrize("length", [0, 1, len(COLUMNS) - 1, len(COLUMNS) + 1, 3 * len(COLUMNS)])
def test_payload_of_wrong_length_raises(length: int) -> None:
    payload = (_payload() * 3)[:length]

    with pytest.raises(ValueError, match=f"expected {len(COLUMNS)} values"):
        CODEC.decode(payload)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("id", "1"),
        ("id", True),
        ("id", 1.0),
        ("id", None),
        ("small", "1"),
        ("big", [1]),
        ("flag", 1),
        ("flag", "true"),
        ("ratio", "1.5"),
        ("ratio", True),
        ("amount", [1]),
        ("amount", "abc"),
        ("amount", True),
        ("amount", 1.5),
        ("name", 5),
        ("name", b"bytes"),
        ("body", ["a"]),
        ("ts_naive", 5),
        ("ts_naive", "not a date"),
        ("ts_aware", {"a": 1}),
        ("day", "2020-01-01T00:00:00"),
        ("day", 20200101),
        ("clock", "25:00"),
        ("span", [1, 2]),
        ("span", "xyz"),
        ("span", 5),
        ("uid", "not-a-uuid"),
        ("uid", 5),
        ("uid_text", 5),
        ("color", "PURPLE"),
        ("color", "r"),  # a value, not a name
        ("color", 2),
        ("mood", 1),
        ("mood", "furious"),
        ("blob", "!!not base64!!"),
        ("blob", 5),
        ("numbers", ["1"]),
        ("numbers", 5),
        ("words", [1]),
        ("tagged", ["zz", 1]),
        ("tagged", ["i", "1"]),
        ("tagged", "s"),
        ("json_text", 5),
        ("json_text", "{not json"),
        ("guid", "not-hex"),
        ("guid", 5),
        ("money", "EUR"),
        ("money", "EUR x"),
        ("tags", "[unterminated"),
    ],
)
def test_payload_with_a_wrongly_typed_value_raises(column: str, value: Any) -> None:
    with pytest.raises(DOCUMENTED):
        CODEC.decode(_payload(**{column: value}))


# -- TypeDecorators: stored as their underlying type, read back through their own processing --


def _encoded(column: str, value: Any) -> Any:
    return CODEC.encode(loaded(Everything, id=1, **{column: value}))[CODEC.keys.index(column)]


def test_a_decorator_is_stored_as_what_it_binds() -> None:
    guid = uuid.UUID("12345678-1234-5678-1234-567812345678")

    assert _encoded("json_text", {"a": [1, 2]}) == '{"a": [1, 2]}'
    assert _encoded("guid", guid) == "12345678123456781234567812345678"  # generic branch
    assert _encoded("money", Money(decimal.Decimal("12.50"), "EUR")) == "EUR 12.50"
    assert _encoded("tags", {"b", "a"}) == '["a", "b"]'  # both decorators ran


@pytest.mark.parametrize("format_name", FORMATS)
def test_a_decorator_comes_back_as_a_database_read_gives_it(format_name: str) -> None:
    # JSON has no integer keys: a database read of JSONText gives string keys back, so does
    # the cache, where the value as assigned had integer keys.
    original = loaded(Everything, id=1, json_text={1: "gold", 2: ("a", "b")})

    decoded = round_trip(CODEC, original, format_name)

    assert_same({"1": "gold", "2": ["a", "b"]}, decoded.json_text, "json_text")


@pytest.mark.parametrize("format_name", FORMATS)
def test_decorators_with_their_own_objects_round_trip(format_name: str) -> None:
    guid = uuid.uuid4()
    money = Money(decimal.Decimal("-0.001"), "JPY")
    original = loaded(Everything, id=1, guid=guid, money=money, tags={"x", "é"})

    decoded = round_trip(CODEC, original, format_name)

    assert_same(guid, decoded.guid, "guid")
    assert_same(money, decoded.money, "money")
    assert_same({"x", "é"}, decoded.tags, "tags")


def test_each_instance_gets_its_own_copy_of_a_decorators_objects() -> None:
    row = CODEC.decode_row(CODEC.encode(loaded(Everything, id=1, tags={"a"}, json_text=[1])))

    first, second = CODEC.build(row), CODEC.build(row)
    first.tags.add("b")
    first.json_text.append(2)

    assert (second.tags, second.json_text) == ({"a"}, [1])


def test_a_value_a_decorator_cannot_store_is_not_cached_and_not_shown() -> None:
    instance = loaded(Everything, id=1, money="s3cret-token")  # not a Money: no .currency

    with pytest.raises(UnencodableValueError, match="MoneyType could not store") as excinfo:
        CODEC.encode(instance)

    assert "s3cret" not in str(excinfo.value)


def test_sqlalchemys_own_types_keep_their_encodings() -> None:
    # Interval is a TypeDecorator in SQLAlchemy; Enum and Uuid have codecs of their own.
    assert _encoded("span", dt.timedelta(days=1, seconds=2, microseconds=3)) == [1, 2, 3]
    assert _encoded("color", Color.GREEN) == "GREEN"
    assert _encoded("uid", uuid.UUID(int=1)) == "00000000-0000-0000-0000-000000000001"


class EmptyWhenNull(TypeDecorator[Any]):
    """Turns NULL into ``[]`` when read, and ``[]`` into NULL when written."""

    impl = JSONText
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return value or None

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return value or []


@pytest.mark.parametrize(("assigned", "read"), [(None, []), ([], []), ([1], [1])])
def test_null_goes_through_a_decorators_processing_too(
    base: type[DeclarativeBase], assigned: Any, read: Any
) -> None:
    class Listing(base):  # type: ignore[misc,valid-type]
        __tablename__ = "listings"
        id: Mapped[int] = mapped_column(primary_key=True)
        items: Mapped[Any] = mapped_column(EmptyWhenNull)

    codec = ModelCodec(inspect(Listing))

    decoded = round_trip(codec, loaded(Listing, id=1, items=assigned), "json")

    assert_same(read, decoded.items, "items")


# -- PickleType: refused unless the model opts in ----------------------------------------------


class PickledInside(TypeDecorator[Any]):
    """A decorator whose impl chain ends in PickleType."""

    impl = PickleType
    cache_ok = True


class PickledDeeper(TypeDecorator[Any]):
    impl = PickledInside
    cache_ok = True


PICKLED = {1: "gold", 2: ("a", "b")}


def _thing(base: type[DeclarativeBase], type_: Any, **options: Any) -> type:
    """``Thing(id, payload: type_)``; no CacheMeta: only the codec is under test here."""
    namespace = {
        "__tablename__": "things",
        "id": mapped_column(Integer, primary_key=True),
        "payload": mapped_column(type_, **options),
    }
    return type("Thing", (base,), namespace)


@pytest.mark.parametrize(
    "type_",
    [PickleType(), PickledInside(), PickledDeeper(), postgresql.ARRAY(PickleType())],
    ids=["PickleType", "decorator", "nested", "array"],
)
def test_a_pickled_column_is_refused_without_allow_pickle(
    base: type[DeclarativeBase], type_: Any
) -> None:
    thing = _thing(base, type_)

    assert pickled_columns(inspect(thing)) == ["Thing.payload (column things.payload)"]
    with pytest.raises(ValueError, match=r"unpickle Thing\.payload \(column things\.payload\)"):
        ModelCodec(inspect(thing))


@pytest.mark.parametrize("format_name", FORMATS)
@pytest.mark.parametrize("type_", [PickleType(), PickledDeeper()], ids=["PickleType", "nested"])
def test_a_pickled_value_round_trips_exactly_once_allowed(
    base: type[DeclarativeBase], type_: Any, format_name: str
) -> None:
    thing = _thing(base, type_)
    codec = ModelCodec(inspect(thing), allow_pickle=True)

    decoded = round_trip(codec, loaded(thing, id=1, payload=PICKLED), format_name)

    assert_same(PICKLED, decoded.payload, "payload")
    assert type(decoded.payload[2]) is tuple  # assert_same compares a tuple as a value


def test_a_model_pair_format_binds_to_a_pickled_model(base: type[DeclarativeBase]) -> None:
    # Its codec only decodes rows this process just encoded; the model cache's codec decodes
    # what the cache holds, and that one follows allow_pickle.
    thing = _thing(base, PickleType())

    def dump(instance: Any) -> bytes:
        return repr(instance.id).encode()

    def load(data: bytes, model_class: type) -> Any:
        return loaded(model_class, id=int(data))

    _name, format_ = resolve_format((dump, load), inspect(thing))

    assert getattr(format_, "mapper", None) is inspect(thing)


def test_a_deferred_pickled_column_is_not_cached_so_not_refused(
    base: type[DeclarativeBase],
) -> None:
    thing = _thing(base, PickleType(), deferred=True)

    assert pickled_columns(inspect(thing)) == []
    assert ModelCodec(inspect(thing)).keys == ("id",)


# -- which attributes a payload carries ------------------------------------------------------


def _person(base: type[DeclarativeBase], **attributes: Callable[[Any], Any]) -> type:
    """``Person(id, first, last, org_id)`` plus ``name = make(table)`` for each attribute."""

    class Org(base):  # type: ignore[misc,valid-type]
        __tablename__ = "orgs"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(50))

    class Person(base):  # type: ignore[misc,valid-type]
        __tablename__ = "people"
        id: Mapped[int] = mapped_column(primary_key=True)
        first: Mapped[str] = mapped_column(String(50))
        last: Mapped[str] = mapped_column(String(50))
        org_id: Mapped[int] = mapped_column(ForeignKey("orgs.id"))

    people, orgs = Person.__table__.c, Org.__table__.c
    for name, make in attributes.items():
        setattr(Person, name, make((people, orgs)))
    return Person


CACHED_EXPRESSIONS: dict[str, Callable[[Any], Any]] = {
    "full_name": lambda c: column_property(c[0].first + " " + c[0].last),
    "lowered": lambda c: column_property(func.lower(c[0].last)),
    "label": lambda c: column_property(case((c[0].id > 10, "big"), else_="small")),
    "as_text": lambda c: column_property(cast(c[0].id, String)),
}
UNCACHED_EXPRESSIONS: dict[str, Callable[[Any], Any]] = {
    "deferred_column": lambda c: deferred(c[0].first + "!"),
    "same_table_count": lambda c: column_property(
        select(func.count()).select_from(c[0].id.table).scalar_subquery()
    ),
    "org_name": lambda c: column_property(
        select(c[1].name).where(c[1].id == c[0].org_id).scalar_subquery()
    ),
    "clock": lambda c: column_property(func.now()),
    "dice": lambda c: column_property(c[0].id + func.random()),
    "raw": lambda c: column_property(literal_column("'x'")),
    "expression": lambda _c: query_expression(),
}


def test_columns_and_own_row_expressions_are_cached_the_rest_left_out(
    base: type[DeclarativeBase],
) -> None:
    person = _person(base, **CACHED_EXPRESSIONS, **UNCACHED_EXPRESSIONS)
    codec = ModelCodec(inspect(person))

    assert set(codec.keys) == {"id", "first", "last", "org_id", *CACHED_EXPRESSIONS}
    assert codec.keys == tuple(key for key, _type in cached_columns(inspect(person)))


def test_a_deferred_column_is_left_out_and_unloaded_on_a_hit(
    base: type[DeclarativeBase],
) -> None:
    person = _person(base)
    person.bio = deferred(person.__table__.c.last)  # a second, deferred attribute
    codec = ModelCodec(inspect(person))
    values = {"id": 1, "first": "Ada", "last": "Lovelace", "org_id": 2}

    decoded = codec.decode(codec.encode(loaded(person, **values)))

    assert "bio" not in codec.keys
    assert inspect(decoded).unloaded == {"bio"}
    assert {key: getattr(decoded, key) for key in values} == values


def test_an_own_row_expression_round_trips_and_the_others_stay_unloaded(
    base: type[DeclarativeBase],
) -> None:
    person = _person(
        base,
        full_name=CACHED_EXPRESSIONS["full_name"],
        org_name=UNCACHED_EXPRESSIONS["org_name"],
    )
    codec = ModelCodec(inspect(person))
    original = loaded(person, id=1, first="Ada", last="Lovelace", org_id=2, full_name="Ada L")

    decoded = round_trip(codec, original, "json")

    assert decoded.full_name == "Ada L"
    assert inspect(decoded).unloaded == {"org_name"}


def test_the_fingerprint_follows_an_expressions_sql_and_what_is_cached(
    make_base: Callable[[], type[DeclarativeBase]],
) -> None:
    def print_of(**attributes: Callable[[Any], Any]) -> str:
        return fingerprint(inspect(_person(make_base(), **attributes)), "json")

    space = print_of(full_name=lambda c: column_property(c[0].first + " " + c[0].last))
    comma = print_of(full_name=lambda c: column_property(c[0].first + ", " + c[0].last))
    left_out = print_of(full_name=lambda c: deferred(c[0].first + " " + c[0].last))
    no_literal = print_of(
        weird=lambda c: column_property(c[0].first == literal({1: 2}, PickleType))
    )

    assert len({space, comma, left_out, no_literal}) == 4
    assert left_out == print_of()  # a deferred attribute is not part of the payload
    assert space == print_of(full_name=lambda c: column_property(c[0].first + " " + c[0].last))


# -- primary keys ------------------------------------------------------------------------------


def test_primary_key_helpers_encode_as_encode_does_and_decode_typed(
    base: type[DeclarativeBase],
) -> None:
    class Shelf(base):  # type: ignore[misc,valid-type]
        __tablename__ = "shelves"
        label: Mapped[str] = mapped_column(String(20))
        room: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True)
        spot: Mapped[int] = mapped_column(primary_key=True)

    codec = ModelCodec(inspect(Shelf))
    room = uuid.uuid4()
    shelf = loaded(Shelf, label="top", room=room, spot=3)
    encoded = codec.encode(shelf)

    primary_key = codec.encode_primary_key(shelf)

    assert primary_key == [encoded[codec.keys.index("room")], encoded[codec.keys.index("spot")]]
    assert primary_key == [f"{room.int:032x}", 3]
    assert codec.decode_primary_key(primary_key) == (room, 3)
    assert inspect(codec.decode(encoded)).identity == (room, 3)


def test_a_primary_key_without_a_value_is_not_encoded() -> None:
    with pytest.raises(UnencodableValueError, match="'id'"):
        CODEC.encode_primary_key(loaded(Everything))


@pytest.mark.parametrize(
    "values",
    [[], [1, 2], [None], ["1"], [True], [1.0], "1", 1, None, {"id": 1}],
)
def test_a_bad_primary_key_raises_value_error(values: Any) -> None:
    assert CODEC.decode_primary_key([5]) == (5,)
    with pytest.raises(ValueError, match=r"value|column"):
        CODEC.decode_primary_key(values)
