"""The column codec round-trips every common column type exactly, through JSON and msgpack.

Exactly means: the same value *and* the same Python ``type()`` (for aware datetimes and times
also the same wall clock and ``utcoffset()``), nested values included. Instances are built
detached, as if loaded and expunged, without a database and without calling ``__init__``.

The model, the strategies and :func:`assert_same` live in ``tests/_codec_cases.py``, shared
with ``tests/integration/test_roundtrip_backends.py`` and ``test_exact_types_db.py``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import zoneinfo
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from declcache._codec import ModelCodec
from declcache.serializers import SerializationFormat, resolve_format
from tests._codec_cases import (
    COLUMNS,
    FORMATS,
    VALUES,
    Color,
    Everything,
    assert_same,
    assert_same_instance,
    loaded,
    rows,
)


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
    from declcache._codec import UnencodableValueError

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
    ],
)
def test_payload_with_a_wrongly_typed_value_raises(column: str, value: Any) -> None:
    with pytest.raises(DOCUMENTED):
        CODEC.decode(_payload(**{column: value}))
