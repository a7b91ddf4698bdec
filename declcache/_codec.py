"""Column values to plain data and back, with their exact Python types.

JSON and msgpack know only ``None``, ``bool``, numbers, strings, lists and maps. A model's
columns hold ``Decimal``, aware and naive ``datetime``, ``UUID``, enum members, ``bytes``…
Each column gets an ``(encode, decode)`` pair chosen once from its SQLAlchemy type, so a
cached entity comes back with the same values of the same types the database gave. A type
the codec does not know (a ``TypeDecorator`` returning its own objects) falls back to a
tagged encoding by the value's runtime type; a value even that cannot express is not cached.

Decoding builds a *detached* instance with its identity key, as if loaded and expunged, without
calling the model's ``__init__``: ``session.merge(obj, load=False)`` re-attaches it and
``session.add(obj)`` never INSERTs it again.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import decimal
import enum
import hashlib
import uuid
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import types as sqltypes
from sqlalchemy.orm.attributes import instance_state

from declcache._keys import primary_key_names

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper
    from sqlalchemy.sql.type_api import TypeEngine

__all__ = [
    "CODEC_VERSION",
    "ModelCodec",
    "Row",
    "UnencodableValueError",
    "cached_columns",
    "fingerprint",
]

#: Bumped whenever an encoding below changes, so old payloads are never decoded.
CODEC_VERSION = 2

Encode = Callable[[Any], Any]
Decode = Callable[[Any], Any]


class UnencodableValueError(ValueError):
    """A column value the codec cannot represent; the entity is simply not cached."""


def _identity(value: Any) -> Any:
    return value


def _iso(value: dt.date | dt.time) -> str:
    return value.isoformat()


def _encode_datetime(value: dt.datetime) -> str | list[str]:
    """ISO 8601; an IANA zone also keeps its name, so DST arithmetic works after decoding."""
    zone = value.tzinfo
    if isinstance(zone, zoneinfo.ZoneInfo) and zone.key:
        return [value.isoformat(), zone.key]
    return value.isoformat()


def _decode_datetime(value: str | list[str]) -> dt.datetime:
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    text, key = value
    parsed = dt.datetime.fromisoformat(text)
    wall = parsed.replace(tzinfo=None)
    zone = zoneinfo.ZoneInfo(key)
    for fold in (0, 1):  # the fold whose offset is the one stored: exact even in a DST overlap
        candidate = wall.replace(tzinfo=zone, fold=fold)
        if candidate.utcoffset() == parsed.utcoffset():
            return candidate
    raise ValueError(f"{text} does not exist in time zone {key}")


def _encode_interval(value: dt.timedelta) -> list[int]:
    return [value.days, value.seconds, value.microseconds]


def _decode_interval(value: list[int]) -> dt.timedelta:
    days, seconds, microseconds = value
    return dt.timedelta(days=days, seconds=seconds, microseconds=microseconds)


def _encode_bytes(value: bytes) -> str:
    return base64.b64encode(bytes(value)).decode("ascii")


def _decode_bytes(value: str) -> bytes:
    return base64.b64decode(value.encode("ascii"), validate=True)


class _Strict:
    """A decoder that accepts only ``kind`` (and not ``bool`` for numbers).

    A class rather than a closure so :class:`ModelCodec` can see the ``kind`` and inline the
    check: most columns of most rows are ints, strings and booleans.
    """

    __slots__ = ("kind",)

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def __call__(self, value: Any) -> Any:
        if type(value) is not self.kind:
            raise TypeError(f"expected {self.kind.__name__}, got {type(value).__name__}")
        return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _decimal(value: str) -> decimal.Decimal:
    if type(value) is not str:
        raise TypeError(f"expected a decimal string, got {type(value).__name__}")
    return decimal.Decimal(value)


def _uuid(value: str) -> uuid.UUID:
    return uuid.UUID(value)


def _str_of(value: Any) -> str:
    return str(value)


# Tagged encoding for values whose column type says nothing useful about them.
_TAGGED: dict[type, tuple[str, Encode]] = {
    bool: ("b", _identity),
    int: ("i", _identity),
    float: ("f", _identity),
    str: ("s", _identity),
    decimal.Decimal: ("d", _str_of),
    dt.datetime: ("dt", _encode_datetime),
    dt.date: ("da", _iso),
    dt.time: ("t", _iso),
    dt.timedelta: ("td", _encode_interval),
    uuid.UUID: ("u", _str_of),
    bytes: ("y", _encode_bytes),
    list: ("j", _identity),
    dict: ("j", _identity),
}
_UNTAG: dict[str, Decode] = {
    "b": _Strict(bool),
    "i": _Strict(int),
    "f": _float,
    "s": _Strict(str),
    "d": _decimal,
    "dt": _decode_datetime,
    "da": dt.date.fromisoformat,
    "t": dt.time.fromisoformat,
    "td": _decode_interval,
    "u": _uuid,
    "y": _decode_bytes,
    "j": _identity,
}


def _encode_tagged(value: Any) -> list[Any]:
    entry = _TAGGED.get(type(value))
    if entry is None:
        raise UnencodableValueError(f"no encoding for a value of type {type(value).__qualname__}")
    tag, encode = entry
    return [tag, encode(value)]


def _decode_tagged(value: list[Any]) -> Any:
    tag, payload = value
    return _UNTAG[tag](payload)


def _enum_codec(type_: sqltypes.Enum) -> tuple[Encode, Decode]:
    enum_class = type_.enum_class
    if enum_class is None:
        allowed = frozenset(type_.enums)

        def decode_member(value: Any) -> str:
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {sorted(allowed)}")
            return str(value)

        return _identity, decode_member
    members: type[enum.Enum] = enum_class

    def encode(value: Any) -> str:
        return value.name if isinstance(value, enum.Enum) else str(value)

    def decode(value: str) -> enum.Enum:
        return members[value]

    return encode, decode


def _array_codec(type_: sqltypes.ARRAY[Any]) -> tuple[Encode, Decode]:
    item_encode, item_decode = _codec_for(type_.item_type)

    def encode(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [encode(item) for item in value]
        return None if value is None else item_encode(value)

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(item) for item in value]
        return None if value is None else item_decode(value)

    def decode_array(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise TypeError(f"expected an array, got {type(value).__name__}")
        return decode(value)  # type: ignore[no-any-return]

    return encode, decode_array


def _numeric_codec(type_: sqltypes.Numeric[Any]) -> tuple[Encode, Decode]:
    # ``Float`` is a ``Numeric`` too; ``asdecimal`` alone says what the driver hands back.
    return (_str_of, _decimal) if type_.asdecimal else (_identity, _float)


def _python_type(type_: TypeEngine[Any]) -> type | None:
    """The Python type a column type hands back, when the type says (most do)."""
    try:
        return type_.python_type
    except NotImplementedError:
        return None


def _codec_for(type_: TypeEngine[Any]) -> tuple[Encode, Decode]:  # noqa: PLR0912 - one flat dispatch reads best
    """Choose the encoding of one column from its SQLAlchemy type, once per model."""
    if isinstance(type_, sqltypes.Boolean):
        return _identity, _Strict(bool)
    if isinstance(type_, sqltypes.Integer):
        return _identity, _Strict(int)
    if isinstance(type_, sqltypes.Numeric):
        return _numeric_codec(type_)
    if isinstance(type_, sqltypes.Enum):
        return _enum_codec(type_)
    if isinstance(type_, sqltypes.String):
        return _identity, _Strict(str)
    if isinstance(type_, sqltypes.DateTime):
        return _encode_datetime, _decode_datetime
    if isinstance(type_, sqltypes.Date):
        return _iso, dt.date.fromisoformat
    if isinstance(type_, sqltypes.Time):
        return _iso, dt.time.fromisoformat
    if _python_type(type_) is dt.timedelta:  # Interval, and each dialect's INTERVAL
        return _encode_interval, _decode_interval
    if isinstance(type_, sqltypes.Uuid):
        return (_str_of, _uuid) if type_.as_uuid else (_identity, _Strict(str))
    if isinstance(type_, sqltypes.ARRAY):
        return _array_codec(type_)
    if isinstance(type_, sqltypes.JSON):
        return _identity, _identity
    if _python_type(type_) is bytes:  # LargeBinary, BINARY, BYTEA, BLOB…
        return _encode_bytes, _decode_bytes
    # TypeDecorators and types of other packages: trust only the value's runtime type.
    return _encode_tagged, _decode_tagged


@dataclass(frozen=True, slots=True)
class _Column:
    key: str
    encode: Encode
    decode: Decode


def cached_columns(mapper: Mapper[Any]) -> list[tuple[str, TypeEngine[Any]]]:
    """The ``(attribute key, type)`` of every table column the entity payload carries.

    SQL-expression ``column_property`` attributes are left out: they are not stored, and
    a cached entity must hold only what a plain load of the row holds.
    """
    from sqlalchemy import Column  # noqa: PLC0415 - keeps the module's import surface small

    return [
        (prop.key, prop.columns[0].type)
        for prop in mapper.column_attrs
        if all(isinstance(column, Column) for column in prop.columns)
    ]


def fingerprint(mapper: Mapper[Any], format_name: str) -> str:
    """Twelve hex characters: the model's lineage (4), then a hash of its payloads' shape (8).

    The *shape* is everything that decides how a cached row of this model is written: its
    columns and their types, the format, the codec. The *lineage* is what a release that
    changes the shape keeps: the class name and the tables. Payloads carry the fingerprint
    (keys do not): a payload of the same lineage and another shape is another release's,
    a silent miss during a deploy; one of another lineage is a foreign value, an error.
    """
    cls = mapper.class_
    tables = ",".join(table.fullname for table in mapper.tables)
    shape = [
        f"{cls.__module__}.{cls.__qualname__}",
        tables,
        *(f"{key}:{type_!r}" for key, type_ in cached_columns(mapper)),
        f"format={format_name}",
        f"codec={CODEC_VERSION}",
    ]
    lineage = hashlib.sha256(f"{cls.__qualname__}\n{tables}".encode()).hexdigest()
    return lineage[:4] + hashlib.sha256("\n".join(shape).encode()).hexdigest()[:8]


class ModelCodec:
    """Encode one model's instances to a plain list and decode them back, detached."""

    __slots__ = (
        "_columns",
        "_mapper",
        "_new_instance",
        "_plan",
        "_primary_key",
        "keys",
    )

    def __init__(self, mapper: Mapper[Any]) -> None:
        self._columns = tuple(
            _Column(key, *_codec_for(type_)) for key, type_ in cached_columns(mapper)
        )
        self.keys = tuple(column.key for column in self._columns)
        self._new_instance = mapper.class_manager.new_instance
        self._mapper = mapper
        self._primary_key = primary_key_names(mapper)
        # Per column: (key, a type taken as it is, converter for anything else); a strict
        # column's converter raises, and a JSON column has no converter at all.
        self._plan = tuple(
            (
                column.key,
                column.decode.kind if isinstance(column.decode, _Strict) else None,
                None if column.decode is _identity else column.decode,
            )
            for column in self._columns
        )

    def encode(self, instance: object) -> list[Any]:
        """Return the instance's column values as plain data, in column order.

        Raises:
            UnencodableValueError: a column is not loaded (deferred or expired) or holds a
                value no encoding covers; such an entity is not cached.
        """
        loaded = instance_state(instance).dict
        values: list[Any] = []
        for column in self._columns:
            try:
                value = loaded[column.key]
            except KeyError:
                raise UnencodableValueError(f"column {column.key!r} is not loaded") from None
            values.append(None if value is None else column.encode(value))
        return values

    def decode(self, values: list[Any]) -> Any:
        """Build a detached instance with its identity key from :meth:`encode`'s output.

        Raises:
            ValueError: the data does not fit this model.
        """
        return self.build(self.decode_row(values))

    def decode_row(self, values: list[Any]) -> Row:
        """The typed column values of :meth:`encode`'s output, ready for :meth:`build`.

        A row can be kept and built again and again: it is decoded once per cached payload.

        Raises:
            ValueError: the data does not fit this model.
        """
        if len(values) != len(self._plan):
            raise ValueError(f"expected {len(self._plan)} values, got {len(values)}")
        loaded: dict[str, Any] = {}
        key = None
        try:
            for (key, kind, convert), value in zip(self._plan, values):  # noqa: B905 - checked
                if value is None or convert is None or type(value) is kind:
                    loaded[key] = value
                else:
                    loaded[key] = convert(value)
        except Exception as error:
            raise ValueError(f"column {key!r}: {error!r}") from error
        primary_key = tuple([loaded[name] for name in self._primary_key])
        if None in primary_key:
            raise ValueError("a payload without a primary key")
        mutable = tuple(name for name, value in loaded.items() if type(value) in (list, dict))
        return Row(loaded, self._mapper.identity_key_from_primary_key(primary_key), mutable)

    def build(self, row: Row) -> Any:
        """A detached instance holding ``row``: its own copy of every list and dict in it.

        The instance is built the way SQLAlchemy's own loader builds one from a row: a new
        state, the column values put in its dict (so nothing counts as changed), and its
        identity key set; relationships stay unloaded, to be lazy-loaded once attached.
        """
        instance = self._new_instance()
        state = instance_state(instance)
        loaded = state.dict
        loaded.update(row.values)
        for name in row.mutable:
            loaded[name] = copy.deepcopy(loaded[name])
        state.key = row.identity_key
        return instance


class Row(NamedTuple):
    """One cached row, decoded: what :meth:`ModelCodec.build` makes instances of.

    Attributes:
        values: attribute key → typed value.
        identity_key: the instance's SQLAlchemy identity key.
        mutable: keys whose values are lists or dicts (JSON, ARRAY): copied for each instance.
    """

    values: dict[str, Any]
    identity_key: tuple[Any, ...]
    mutable: tuple[str, ...]
