"""Column values to plain data and back, with their exact Python types.

JSON and msgpack know only ``None``, ``bool``, numbers, strings, lists and maps. A model's
columns hold ``Decimal``, aware and naive ``datetime``, ``UUID``, enum members, ``bytes``…
Each column gets an ``(encode, decode)`` pair chosen once from its SQLAlchemy type, so a
cached entity comes back with the same values of the same types the database gave. A
``TypeDecorator`` is stored as the value its own bind processing gives its underlying type, and
read back through its own result processing, as a database read does (see
:data:`PROCESSING_DIALECT`); a ``PickleType`` among them is refused unless the model opts in.
A type of another package that is no decorator falls back to a tagged encoding by the value's
runtime type; a value even that cannot express is not cached.

A payload holds what ``select(Model)`` puts in an instance (:func:`cached_columns`): its
columns and the ``column_property`` values computed from its own row; deferred columns and
other expressions stay unloaded, to be loaded on access.

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
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard

from sqlalchemy import Column, TypeDecorator
from sqlalchemy import types as sqltypes
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.exc import CompileError
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.sql.selectable import SelectBase

from declcache._keys import primary_key_names

if TYPE_CHECKING:
    from sqlalchemy.orm import ColumnProperty, Mapper
    from sqlalchemy.sql import ColumnElement
    from sqlalchemy.sql.type_api import TypeEngine

__all__ = [
    "CODEC_VERSION",
    "IMMUTABLE_TYPES",
    "PROCESSING_DIALECT",
    "ModelCodec",
    "Row",
    "UnencodableValueError",
    "cached_columns",
    "fingerprint",
    "pickled_columns",
]

#: Bumped whenever an encoding below changes, so old payloads are never decoded.
CODEC_VERSION = 3

#: The dialect a ``TypeDecorator``'s own processing runs under, in every process.
#:
#: A codec is built once per model, with no engine at hand, and a payload one process writes
#: must decode in every other process sharing the backend, whatever database each one talks
#: to (a replica, a migration script, SQLite in a test). So the stored form must not depend on
#: the dialect in use: SQLAlchemy's generic ``DefaultDialect`` is the same everywhere. It has
#: no DBAPI, so the underlying types add no driver conversion of their own (their values stay
#: the Python values their codec knows), and its name, ``"default"``, sends a decorator's
#: ``load_dialect_impl`` and ``dialect.name`` checks down their generic branch (the GUID
#: recipe stores 32 hex characters, not PostgreSQL's native ``UUID``). What comes back is
#: what the decorator's result processing makes of the value, as after any database read.
PROCESSING_DIALECT = DefaultDialect()

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


#: SQLAlchemy's own types built on ``TypeDecorator`` that have an encoding of their own below.
_BUILT_IN_DECORATORS = (sqltypes.Interval,)


def _decorates(type_: TypeEngine[Any]) -> TypeGuard[TypeDecorator[Any]]:
    """Whether ``type_``'s values go through its own bind and result processing."""
    return isinstance(type_, TypeDecorator) and not isinstance(type_, _BUILT_IN_DECORATORS)


def _bind_processing(type_: TypeDecorator[Any]) -> Callable[[Any], Any]:
    """The decorator's own step from a Python value to its underlying type's value.

    ``process_bind_param`` for a decorator written as SQLAlchemy asks; ``PickleType`` (and
    any type like it) overrides ``bind_processor`` itself.
    """
    cls = type(type_)
    if cls.bind_processor is not TypeDecorator.bind_processor:
        return type_.bind_processor(PROCESSING_DIALECT) or _identity
    if cls.process_bind_param is TypeDecorator.process_bind_param:
        return _identity

    def process(value: Any) -> Any:
        return type_.process_bind_param(value, PROCESSING_DIALECT)

    return process


def _result_processing(type_: TypeDecorator[Any]) -> Callable[[Any], Any]:
    """The decorator's own step back, as :func:`_bind_processing` finds it."""
    cls = type(type_)
    if cls.result_processor is not TypeDecorator.result_processor:
        return type_.result_processor(PROCESSING_DIALECT, None) or _identity
    if cls.process_result_value is TypeDecorator.process_result_value:
        return _identity

    def process(value: Any) -> Any:
        return type_.process_result_value(value, PROCESSING_DIALECT)

    return process


def _decorator_codec(type_: TypeDecorator[Any]) -> tuple[Encode, Decode]:
    """Store what the decorator binds, encoded as its underlying type; read it back through it.

    The underlying type is the one ``load_dialect_impl`` gives (another decorator is followed
    down). ``None`` goes through both steps too: a decorator may turn NULL into a value.
    """
    impl = type_.load_dialect_impl(PROCESSING_DIALECT)
    impl_encode, impl_decode = _codec_for(impl)
    impl_takes_none = _decorates(impl)
    bind = _bind_processing(type_)
    result = _result_processing(type_)

    def encode(value: Any) -> Any:
        try:  # the decorator's code, and a value of its making: anything may go wrong
            bound = bind(value)
            return None if bound is None and not impl_takes_none else impl_encode(bound)
        except UnencodableValueError:
            raise
        except Exception as error:
            # The error's type only: its text may hold the value, maybe a secret.
            raise UnencodableValueError(
                f"{type(type_).__name__} could not store a value: {type(error).__name__}"
            ) from error

    def decode(value: Any) -> Any:
        return result(None if value is None and not impl_takes_none else impl_decode(value))

    return encode, decode


def _unpickles(type_: TypeEngine[Any]) -> bool:
    """Whether decoding a value of ``type_`` unpickles it: a ``PickleType`` however wrapped."""
    if isinstance(type_, sqltypes.PickleType):
        return True
    if isinstance(type_, sqltypes.ARRAY):
        return _unpickles(type_.item_type)
    return _decorates(type_) and _unpickles(type_.load_dialect_impl(PROCESSING_DIALECT))


def _codec_for(type_: TypeEngine[Any]) -> tuple[Encode, Decode]:  # noqa: PLR0912 - one flat dispatch reads best
    """Choose the encoding of one column from its SQLAlchemy type, once per model."""
    if _decorates(type_):
        return _decorator_codec(type_)
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
    # Types of other packages that are no decorator: trust only the value's runtime type.
    return _encode_tagged, _decode_tagged


@dataclass(frozen=True, slots=True)
class _Column:
    key: str
    encode: Encode
    decode: Decode
    takes_none: bool  # a decorator's: ``None`` goes through encode and decode too


def _own_row(expression: ColumnElement[Any], tables: frozenset[Any]) -> bool:
    """Whether ``expression`` is computed from its own row alone, the same way every time.

    A mapped column is; so is an expression of the model's tables made only of constructs
    known to be deterministic (statement caching's allow-list). A subquery is not, even of the
    model's own table: it reads other rows, whose changes never reach this row's cache entry.
    """
    if isinstance(expression, Column):
        return True
    from declcache.repository._statement_key import nondeterminism  # noqa: PLC0415 - cycle

    if nondeterminism(expression) is not None:
        return False
    return not any(
        isinstance(element, SelectBase)
        or (isinstance(element, ColumnClause) and element.table not in tables)
        for element in visitors.iterate(expression)
    )


def _cached_attributes(mapper: Mapper[Any]) -> list[ColumnProperty[Any]]:
    """The column attributes a payload carries: what ``select(Model)`` loads and stays true.

    Left out, and so unloaded on a hit, to be loaded on access as after any partial load:
    deferred columns (the deferred loader loads them), ``query_expression`` attributes (only
    ``with_expression`` fills them) and a ``column_property`` that reads other rows or is not
    known to be deterministic (a load fills it, but its cached value could go stale while its
    row does not change).
    """
    tables = frozenset(mapper.tables)
    return [
        prop
        for prop in mapper.column_attrs
        if not prop.deferred
        and not dict(prop.strategy_key).get("query_expression")
        and all(_own_row(column, tables) for column in prop.columns)
    ]


def cached_columns(mapper: Mapper[Any]) -> list[tuple[str, TypeEngine[Any]]]:
    """The ``(attribute key, type)`` of every attribute the entity payload carries, in order.

    Its columns, and the ``column_property`` values computed from its own row alone.
    """
    return [(prop.key, prop.columns[0].type) for prop in _cached_attributes(mapper)]


def _sql(expression: ColumnElement[Any]) -> str:
    """The SQL of ``expression`` with its bound values, or their placeholders if not literal."""
    try:
        return str(expression.compile(compile_kwargs={"literal_binds": True}))
    except CompileError:  # a value of a type that has no literal form
        return str(expression)


def pickled_columns(mapper: Mapper[Any]) -> list[str]:
    """The cached attributes whose values decoding unpickles, as ``Model.key (column t.c)``.

    Such a value comes back through ``pickle.loads`` of what the cache holds: whoever can write
    the cache can run code in the process that reads it.
    """
    return [
        f"{mapper.class_.__name__}.{prop.key} (column {_sql(prop.columns[0])})"
        for prop in _cached_attributes(mapper)
        if _unpickles(prop.columns[0].type)
    ]


def _shape_of(prop: ColumnProperty[Any]) -> str:
    """One attribute's part of the fingerprint: an expression's SQL decides its value too."""
    column = prop.columns[0]
    shape = f"{prop.key}:{column.type!r}"
    return shape if isinstance(column, Column) else f"{shape}={_sql(column)}"


def fingerprint(mapper: Mapper[Any], format_name: str) -> str:
    """Twelve hex characters: the model's lineage (4), then a hash of its payloads' shape (8).

    The *shape* is everything that decides how a cached row of this model is written: the
    attributes it carries, their types (and an expression's SQL), the format, the codec. The
    *lineage* is what a release that changes the shape keeps: the class name and the tables.
    Payloads carry the fingerprint (keys do not): a payload of the same lineage and another
    shape is another release's, a silent miss during a deploy; one of another lineage is a
    foreign value, an error.
    """
    cls = mapper.class_
    tables = ",".join(table.fullname for table in mapper.tables)
    shape = [
        f"{cls.__module__}.{cls.__qualname__}",
        tables,
        *(_shape_of(prop) for prop in _cached_attributes(mapper)),
        f"format={format_name}",
        f"codec={CODEC_VERSION}",
    ]
    lineage = hashlib.sha256(f"{cls.__qualname__}\n{tables}".encode()).hexdigest()
    return lineage[:4] + hashlib.sha256("\n".join(shape).encode()).hexdigest()[:8]


#: How one value is decoded: ``(key, a type taken as it is, converter for anything else,
#: whether ``None`` is taken as it is)``. A strict column's converter raises, a JSON column has
#: no converter at all, and a decorator's converts ``None`` too.
_Step = tuple[str, "type | None", "Decode | None", bool]

#: Types of immutable values: instances built from one decoded row may share them, and
#: statement keys spell them by ``repr``.
IMMUTABLE_TYPES = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        str,
        bytes,
        decimal.Decimal,
        dt.datetime,
        dt.date,
        dt.time,
        dt.timedelta,
        uuid.UUID,
    }
)


def _step(column: _Column) -> _Step:
    kind = column.decode.kind if isinstance(column.decode, _Strict) else None
    convert = None if column.decode is _identity else column.decode
    return column.key, kind, convert, not column.takes_none


def _decoded(plan: tuple[_Step, ...], values: list[Any]) -> dict[str, Any]:
    """Attribute key → typed value of ``values``, decoded by ``plan``, one step per value.

    Raises:
        ValueError: the data does not fit the plan.
    """
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"expected a list of {len(plan)} values, got {type(values).__name__}")
    if len(values) != len(plan):
        raise ValueError(f"expected {len(plan)} values, got {len(values)}")
    loaded: dict[str, Any] = {}
    key = None
    try:
        for (key, kind, convert, keeps_none), value in zip(plan, values):  # noqa: B905 - checked
            if convert is None or type(value) is kind or (value is None and keeps_none):
                loaded[key] = value
            else:
                loaded[key] = convert(value)
    except Exception as error:
        raise ValueError(f"column {key!r}: {error!r}") from error
    return loaded


class ModelCodec:
    """Encode one model's instances to a plain list and decode them back, detached.

    Args:
        mapper: the model's mapper.
        allow_pickle: whether values may be unpickled (:func:`pickled_columns`); the model's
            ``CacheMeta.allow_pickle``.

    Raises:
        ValueError: the model has a cached ``PickleType`` column and ``allow_pickle`` is off.

    Attributes:
        keys: the attributes a payload holds, in its order; any other column attribute of
            a built instance is unloaded.
    """

    __slots__ = (
        "_columns",
        "_mapper",
        "_new_instance",
        "_plan",
        "_primary_columns",
        "_primary_key",
        "_primary_plan",
        "keys",
    )

    def __init__(self, mapper: Mapper[Any], *, allow_pickle: bool = False) -> None:
        pickled = [] if allow_pickle else pickled_columns(mapper)
        if pickled:
            raise ValueError(f"a hit would unpickle {', '.join(pickled)}; allow_pickle is off")
        self._columns = tuple(
            _Column(key, *_codec_for(type_), takes_none=_decorates(type_))
            for key, type_ in cached_columns(mapper)
        )
        self.keys = tuple(column.key for column in self._columns)
        self._new_instance = mapper.class_manager.new_instance
        self._mapper = mapper
        self._primary_key = primary_key_names(mapper)
        self._plan = tuple(_step(column) for column in self._columns)
        positions = [self.keys.index(name) for name in self._primary_key]
        self._primary_columns = tuple(self._columns[position] for position in positions)
        self._primary_plan = tuple(self._plan[position] for position in positions)

    def encode(self, instance: object) -> list[Any]:
        """Return the instance's column values as plain data, in :attr:`keys` order.

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
            values.append(None if value is None and not column.takes_none else column.encode(value))
        return values

    def encode_primary_key(self, instance: object) -> list[Any]:
        """The instance's primary-key values, encoded as :meth:`encode` encodes them, in order.

        Raises:
            UnencodableValueError: a primary-key column has no value (or is not loaded).
        """
        loaded = instance_state(instance).dict
        values: list[Any] = []
        for column in self._primary_columns:
            value = loaded.get(column.key)
            if value is None:
                raise UnencodableValueError(f"primary key column {column.key!r} has no value")
            values.append(column.encode(value))
        return values

    def decode_primary_key(self, values: list[Any]) -> tuple[Any, ...]:
        """The typed primary-key values of :meth:`encode_primary_key`'s output.

        Raises:
            ValueError: the data is not a primary key of this model.
        """
        decoded = tuple(_decoded(self._primary_plan, values).values())
        if None in decoded:
            raise ValueError("a primary key without a value")
        return decoded

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
        loaded = _decoded(self._plan, values)
        primary_key = tuple([loaded[name] for name in self._primary_key])
        if None in primary_key:
            raise ValueError("a payload without a primary key")
        mutable = tuple(
            name
            for name, value in loaded.items()
            if type(value) not in IMMUTABLE_TYPES and not isinstance(value, enum.Enum)
        )
        return Row(loaded, self._mapper.identity_key_from_primary_key(primary_key), mutable)

    def build(self, row: Row) -> Any:
        """A detached instance holding ``row``: its own copy of every mutable value in it.

        The instance is built the way SQLAlchemy's own loader builds one from a row: a new
        state, the values put in its dict (so nothing counts as changed), and its identity
        key set; relationships and the attributes not in :attr:`keys` stay unloaded, to be
        loaded once attached.
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
        mutable: keys whose values may change in place (JSON and ARRAY lists and dicts, a
            decorator's own objects): copied for each instance, as each load makes its own.
    """

    values: dict[str, Any]
    identity_key: tuple[Any, ...]
    mutable: tuple[str, ...]
