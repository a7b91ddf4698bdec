"""Idents and cache keys: how a caller names a row, and how the cache names what it holds. Pure.

Every key is ``prefix + model [+ scope] + what it names``:

* an entity: ``…:id=7`` (its primary key) or ``…:email=a%40b.c`` (a ``key_fields`` set, whose
  entry is a *pointer* to the primary-key entry);
* the model's *generation* token ``…:generation`` and *list version* token ``…:list-version``;
* a cached query result ``…:q:<kind>:<hash of its SQL and parameters>``.

A key must be valid on every backend: Memcached refuses spaces, control characters and more
than 250 bytes. Key values are percent-encoded (so ``"a b"``, unicode and ``:`` are safe and
``1`` never collides with ``"1,2"``), and a key that would still be too long keeps its
readable head and replaces the rest by a hash.

No key holds the model's schema fingerprint (:func:`declcache._codec.fingerprint`): every
payload does, in its metadata (:mod:`declcache._payload`). Two releases of a model running side
by side (a column added, another format) so share every key and token: a commit by either
invalidates what both cached, and each reads the other's payloads as a silent miss.

Key values are spelt as the column compares them (:func:`normalized`): ``Decimal("1.50")``,
``Decimal("1.5")`` and ``1.5`` are one Numeric key, ``"Ada@X.org"`` and ``"ada@x.org"`` one key
on SQLite's NOCASE, and the read side (an ident) and the write side (an instance, an
invalidation) use the same spelling. A collation whose equality cannot be reproduced is
refused for a key at configuration (:func:`collation_problem`).

Every key also holds the :class:`Scope` it was read or written in, when there is one: the
schema a ``schema_translate_map`` sends the model's table to (``~tenant_b``), and the name the
configured scope function gives a session (``@acme``). Rows of two schemas are two tables,
so their keys share nothing; a named scope is a view of the same rows, so a named scope also
reads two *outside* tokens of its schema, which writes made outside every named scope replace
(:mod:`declcache._invalidation` writes them).
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import functools
import hashlib
import re
import string
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import tuple_
from sqlalchemy import types as sqltypes
from sqlalchemy.orm.attributes import instance_state

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from sqlalchemy import ColumnElement
    from sqlalchemy.orm import Mapper
    from sqlalchemy.sql.type_api import TypeEngine

    from declcache._api import Ident

__all__ = [
    "MAX_KEY_BYTES",
    "UNSCOPED",
    "KeyBuilder",
    "KeySet",
    "Scope",
    "collation_problem",
    "ident_parts",
    "match",
    "normalized",
    "primary_key_names",
    "primary_key_values",
    "primary_keys_in",
]

#: Memcached's limit, and so the limit of every key declcache writes.
MAX_KEY_BYTES = 250
_HASHED_TAIL = 40  # hex characters of sha256 kept when a key is too long

#: The attribute names of one key: the primary key, or a ``key_fields`` set.
KeySet = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Scope:
    """What, besides a statement, decides the rows a session reads: part of its every key.

    Attributes:
        schema: the schema the session's ``schema_translate_map`` sends the model's table to;
            ``""`` when the table is used as mapped. Another schema holds other rows.
        name: what the configured scope function answered for the session (a tenant);
            ``None`` outside every named scope: the session sees what the database shows it.
    """

    schema: str = ""
    name: str | None = None

    @property
    def outside(self) -> Scope:
        """The unnamed scope of the same schema: every write in this schema reaches it."""
        return self if self.name is None else Scope(self.schema)

    def __str__(self) -> str:
        """As a message shows it: ``schema tenant_b, scope 'acme'``, or ``unscoped``."""
        parts = [f"schema {self.schema}"] if self.schema else []
        if self.name is not None:
            parts.append(f"scope {self.name!r}")
        return ", ".join(parts) or "unscoped"


#: The scope of a session without schema translation or scope function.
UNSCOPED = Scope()


# -- idents -----------------------------------------------------------------------------------


@functools.cache
def primary_key_names(mapper: Mapper[Any]) -> KeySet:
    """The attribute names of ``mapper``'s primary key, in its column order."""
    return tuple(mapper.get_property_by_column(column).key for column in mapper.primary_key)


def primary_key_values(ident: Ident) -> tuple[Any, ...]:
    """The values of a primary-key ident: a tuple for a composite key, else one value."""
    return ident if isinstance(ident, tuple) else (ident,)


def primary_keys_in(
    columns: Sequence[ColumnElement[Any]], keys: Sequence[tuple[Any, ...]]
) -> ColumnElement[bool]:
    """``columns IN keys``: one column's values, or row values for a composite key."""
    if len(columns) == 1:
        return columns[0].in_([key[0] for key in keys])
    return tuple_(*columns).in_(keys)


def ident_parts(ident: Ident, primary_key: KeySet) -> tuple[KeySet, tuple[Any, ...]]:
    """``(fields, values)`` an ident names: a mapping names its own fields, else the primary key."""
    if isinstance(ident, Mapping):
        return tuple(ident), tuple(ident.values())
    return primary_key, primary_key_values(ident)


def match(mapper: Mapper[Any], idents: Sequence[Ident], loaded: Iterable[Any]) -> list[Any]:
    """For each ident, the instance of ``loaded`` it names, or ``None``."""
    loaded = list(loaded)
    primary_key = primary_key_names(mapper)
    indexes: dict[KeySet, dict[tuple[str, ...], Any]] = {}
    matches = []
    for ident in idents:
        fields, values = ident_parts(ident, primary_key)
        if fields not in indexes:
            index = indexes[fields] = {}
            for item in loaded:
                state = instance_state(item).dict
                index[normalized(mapper, fields, [state.get(name) for name in fields])] = item
        try:
            matches.append(indexes[fields].get(normalized(mapper, fields, values)))
        except (ValueError, TypeError, KeyError):
            matches.append(None)
    return matches


# -- key values -------------------------------------------------------------------------------

#: Collations whose equality is byte (or code point) equality: a key value needs no folding.
#: PostgreSQL's libc and predefined ICU collations are deterministic too (their names below).
_EXACT_COLLATIONS = frozenset({"c", "posix", "binary", "ucs_basic", "pg_c_utf8", "default"})
_EXACT_COLLATION = re.compile(
    r"""
    .*(_bin2?|_cs(_as)?(_\w+)?)$   # MySQL/MariaDB *_bin, *_cs; SQL Server *_CS_AS, *_BIN2
    | .*-x-icu$                    # PostgreSQL's predefined (deterministic) ICU collations
    | [a-z]{2,3}(_[a-z]{2})?(\.[\w-]+)?$  # libc locales: en_US.utf8 (always deterministic)
    """,
    re.IGNORECASE | re.VERBOSE,
)
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def collation_problem(type_: TypeEngine[Any]) -> str | None:
    """Why a column of ``type_`` cannot name a cached entity; ``None`` if it can.

    A key is a text: two spellings the column finds equal must give one key text, or a read
    under one spelling finds what an invalidation under the other never reached. Equality
    of a case-insensitive, accent-insensitive or otherwise nondeterministic collation cannot
    be reproduced here except for the two spelt out in :func:`_normalizer`.
    """
    collation = getattr(type_, "collation", None)
    if collation is None or _string_text(type_) is not None:
        return None
    return (
        f"its collation {collation!r} may find two different spellings equal (case- or "
        "accent-insensitive, or nondeterministic), and a cache key cannot reproduce that "
        "equality; use a deterministic collation (C, *_bin, *_cs…), SQLite's NOCASE, "
        "PostgreSQL's citext, or leave the column out of key_fields"
    )


def _string_text(type_: TypeEngine[Any]) -> Callable[[Any], str] | None:
    """The text of a value of a string column as its collation compares it, if known."""
    if type(type_).__name__.upper() == "CITEXT":  # PostgreSQL compares lower(a) = lower(b)
        return _lower_text
    collation = getattr(type_, "collation", None)
    if collation is None:
        return str
    name = collation.strip('"')
    if name.upper() == "NOCASE":  # SQLite folds the 26 ASCII letters, nothing else
        return _nocase_text
    if name.upper() == "RTRIM":  # SQLite ignores trailing spaces
        return _rtrim_text
    if name.lower() in _EXACT_COLLATIONS or _EXACT_COLLATION.fullmatch(name):
        return str
    return None


def _normalizer(type_: TypeEngine[Any]) -> Callable[[Any], str]:
    """Text of a key value as the column compares it: one text for every spelling of a value.

    ``7``, ``"7"`` and ``7.0`` for an integer; ``Decimal("1.50")``, ``Decimal("1.5")`` and
    ``1.5`` for a Numeric; ``"Ada@X.org"`` and ``"ada@x.org"`` on SQLite's NOCASE. A value
    the column could not compare raises ``ValueError``: it then has no key, so it is read
    from the database and never cached under a spelling an invalidation would miss.
    """
    if isinstance(type_, sqltypes.Boolean):
        return _boolean_text
    if isinstance(type_, sqltypes.Integer):
        return _integer_text
    if isinstance(type_, sqltypes.Float):
        return _float_text
    if isinstance(type_, sqltypes.Numeric):
        return _decimal_text
    if isinstance(type_, sqltypes.Uuid):
        return _uuid_text
    if isinstance(type_, sqltypes.DateTime):
        return _datetime_text
    if isinstance(type_, sqltypes.Date):
        return _date_text
    if isinstance(type_, sqltypes.Enum) and type_.enum_class is not None:
        return _enum_text(dict(zip(type_.enum_class, type_.enums, strict=False)))
    if isinstance(type_, sqltypes.String):
        text = _string_text(type_)
        if text is None:
            problem = collation_problem(type_)

            def refused(_value: Any) -> str:
                raise ValueError(problem)

            return refused
        return text
    return str


def _integer_text(value: Any) -> str:
    if isinstance(value, (float, decimal.Decimal)) and value != int(value):
        raise ValueError(f"{value!r} is not a whole number")
    return str(int(value))


def _boolean_text(value: Any) -> str:
    if value in (True, False):  # also 0 and 1, as the database compares them
        return "1" if value else "0"
    raise ValueError(f"{value!r} is not a boolean")


def _decimal_text(value: Any) -> str:
    """Plain decimal text without trailing zeros or exponent: ``1.50``, ``1.5``, ``15E-1``.

    Not ``Decimal.normalize()``: it rounds to the context's 28 digits, and a wider
    ``Numeric`` would then see two values share one key.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, float):
        number = decimal.Decimal(repr(value))  # the shortest text naming that float
    elif isinstance(value, (int, decimal.Decimal)):
        number = decimal.Decimal(value)
    else:
        try:
            number = decimal.Decimal(str(value).strip())
        except decimal.InvalidOperation:
            raise ValueError(f"{value!r} is not a number") from None
    if not number.is_finite():
        return str(number).lower()
    if number.is_zero():
        return "0"
    sign, digits, finite_exponent = number.as_tuple()
    kept, exponent = list(digits), int(finite_exponent)  # an int: the number is finite
    while exponent < 0 and kept[-1] == 0:
        kept.pop()
        exponent += 1
    return format(decimal.Decimal((sign, kept, exponent)), "f")


def _float_text(value: Any) -> str:
    """The shortest text of the double the column compares: ``Decimal("1.50")`` is ``1.5``."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    number = float(value)
    return "0.0" if number == 0 else repr(number)  # -0.0 = 0.0 in SQL


def _uuid_text(value: Any) -> str:
    return str(value if isinstance(value, uuid.UUID) else uuid.UUID(str(value)))


def _datetime_text(value: Any) -> str:
    """ISO text; an aware value in UTC, since the database compares instants."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if not isinstance(value, dt.datetime):
        raise ValueError(f"{value!r} is not a datetime")
    if value.utcoffset() is not None:
        value = value.astimezone(dt.UTC)
    text: str = value.isoformat()
    return text


def _date_text(value: Any) -> str:
    if isinstance(value, str):
        value = dt.date.fromisoformat(value)
    if isinstance(value, dt.datetime) or not isinstance(value, dt.date):
        raise ValueError(f"{value!r} is not a date")
    return value.isoformat()


def _enum_text(stored: dict[Any, str]) -> Callable[[Any], str]:
    """An enum column stores one text per member: the member and that text are one key.

    The text is the member's name, or what ``values_callable`` gave it.
    """

    def text(value: Any) -> str:
        return stored[value] if isinstance(value, enum.Enum) else str(value)

    return text


def _nocase_text(value: Any) -> str:
    return str(value).translate(_ASCII_LOWER)


def _rtrim_text(value: Any) -> str:
    return str(value).rstrip(" ")


def _lower_text(value: Any) -> str:
    return str(value).lower()


def _encode_value(text: str) -> str:
    return quote(text, safe="")


@functools.cache
def _normalizers(mapper: Mapper[Any]) -> dict[str, Callable[[Any], str]]:
    return {prop.key: _normalizer(prop.columns[0].type) for prop in mapper.column_attrs}


def normalized(
    mapper: Mapper[Any], fields: Sequence[str], values: Sequence[Any]
) -> tuple[str, ...]:
    """The canonical text of each key value, so ``7``, ``"7"`` and ``7.0`` compare equal.

    Raises:
        ValueError: a value cannot be normalised for its column (``"abc"`` for an int id).
        KeyError: a field is not a column attribute.
    """
    normalizers = _normalizers(mapper)
    return tuple(normalizers[f](v) for f, v in zip(fields, values, strict=True))


def _quoted(normalize: Callable[[Any], str]) -> Callable[[Any], str]:
    """``normalize``, then percent-encoded; integers and UUIDs need no encoding."""
    if normalize is _integer_text or normalize is _uuid_text:
        return normalize
    return lambda value: _encode_value(normalize(value))


# -- keys -------------------------------------------------------------------------------------


class KeyBuilder:
    """Every key of one model in one scope: its entities (per key set), tokens and queries.

    The text before the values (``head:fields=``) and each field's normaliser are worked out
    once per key set: a key is built on every cache read.

    Args:
        prefix: the manager's key prefix.
        mapper: the model's mapper.
        key_sets: the ``key_fields`` sets naming one entity besides the primary key.
        scope: the scope the keys belong to.
    """

    __slots__ = (
        "_mapper",
        "_prefix",
        "_shapes",
        "generation_key",
        "generation_keys",
        "head",
        "key_sets",
        "list_version_key",
        "list_version_keys",
        "outside_generation_key",
        "outside_list_version_key",
        "primary_key",
        "scope",
    )

    def __init__(
        self,
        prefix: str,
        mapper: Mapper[Any],
        key_sets: Sequence[KeySet] = (),
        scope: Scope = UNSCOPED,
    ) -> None:
        self._mapper = mapper
        self._prefix = prefix
        self.scope = scope
        schema_head = f"{prefix}{_encode_value(mapper.class_.__name__)}"
        if scope.schema:
            schema_head += f"~{_encode_value(scope.schema)}"
        self.head = schema_head
        if scope.name is not None:
            self.head += f"@{_encode_value(scope.name)}"
        self.primary_key = primary_key_names(mapper)
        #: Every key naming one entity, the primary key first.
        self.key_sets = (self.primary_key, *(keys for keys in key_sets if keys != self.primary_key))
        self._shapes: dict[KeySet, tuple[str, tuple[Callable[[Any], str], ...]]] = {}
        #: The model's generation token: a new one turns every older entry into a miss.
        self.generation_key = self.named_key("generation")
        #: The model's list version: a new one turns every cached query result into a miss.
        self.list_version_key = self.named_key("list-version")
        #: Replaced by writes made outside every named scope of the schema (which cannot
        #: know the named scopes that hold the rows they wrote).
        self.outside_generation_key = _bounded(f"{schema_head}:outside-generation")
        self.outside_list_version_key = _bounded(f"{schema_head}:outside-list-version")
        #: The tokens an entry of this scope is written under: its own, and in a named
        #: scope the outside one too.
        self.generation_keys: tuple[str, ...] = (self.generation_key,)
        self.list_version_keys: tuple[str, ...] = (self.list_version_key,)
        if scope.name is not None:
            self.generation_keys += (self.outside_generation_key,)
            self.list_version_keys += (self.outside_list_version_key,)

    def scoped(self, scope: Scope) -> KeyBuilder:
        """The same model's keys in ``scope``."""
        if scope == self.scope:
            return self
        key_sets = self.key_sets[1:]
        return KeyBuilder(self._prefix, self._mapper, key_sets, scope)

    def _shape(self, fields: KeySet) -> tuple[str, tuple[Callable[[Any], str], ...]]:
        try:
            return self._shapes[fields]
        except KeyError:
            pass
        normalizers = _normalizers(self._mapper)
        names = "+".join(_encode_value(field) for field in fields)
        shape = f"{self.head}:{names}=", tuple(_quoted(normalizers[field]) for field in fields)
        self._shapes[fields] = shape
        return shape

    def entity_key(self, fields: Sequence[str], values: Sequence[Any]) -> str:
        """Key of the entity whose ``fields`` equal ``values``.

        Raises:
            ValueError: a value cannot be normalised for its column (``"abc"`` for an int id),
                or ``values`` has not one value per field.
            KeyError: a field is not a column attribute.
        """
        start, texts = self._shape(tuple(fields))
        if len(texts) == 1 and len(values) == 1:
            return _bounded(start + texts[0](values[0]))
        if len(values) != len(texts):
            raise ValueError(f"expected {len(texts)} key values, got {len(values)}")
        return _bounded(
            start + ",".join(text(value) for text, value in zip(texts, values, strict=True))
        )

    def of_ident(self, ident: Ident) -> tuple[KeySet, str]:
        """``(key set, key)`` of the entity ``ident`` names.

        Raises:
            ValueError: ``ident`` names no key of this model or cannot be normalised.
        """
        if isinstance(ident, Mapping):
            for key_set in self.key_sets:
                if set(key_set) == set(ident):
                    return key_set, self.entity_key(key_set, [ident[name] for name in key_set])
            name = self._mapper.class_.__name__
            known = list(self.key_sets)
            raise ValueError(f"{sorted(ident)} is not a key of {name}; keys are {known}")
        values = ident if isinstance(ident, tuple) else (ident,)  # primary_key_values, inlined
        return self.primary_key, self.entity_key(self.primary_key, values)

    def of_instance(self, instance: object) -> dict[KeySet, str]:
        """Every key ``instance`` is known by, per key set (``None`` values skipped)."""
        loaded = instance_state(instance).dict
        keys = {}
        for key_set in self.key_sets:
            values = [loaded.get(name) for name in key_set]
            if all(value is not None for value in values):
                keys[key_set] = self.entity_key(key_set, values)
        return keys

    def list_key(self, query_key: str) -> str:
        """Key of a cached query result; ``query_key`` names the query (its kind and hash)."""
        return self.named_key(f"q:{query_key}")

    def named_key(self, name: str) -> str:
        """A per-model bookkeeping key; never equal to an entity key (no ``=`` in it)."""
        return _bounded(f"{self.head}:{_encode_value(name)}")


def _bounded(key: str) -> str:
    """Keep ``key`` within :data:`MAX_KEY_BYTES`, hashing what does not fit."""
    if len(key) <= MAX_KEY_BYTES:  # percent-encoding leaves ASCII only: chars == bytes
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:_HASHED_TAIL]
    return f"{key[: MAX_KEY_BYTES - _HASHED_TAIL - 1]}#{digest}"
