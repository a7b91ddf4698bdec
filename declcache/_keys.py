"""Idents and cache keys: how a caller names a row, and how the cache names what it holds. Pure.

Every key is ``prefix + model + schema fingerprint [+ scope] + what it names``:

* an entity: ``…:id=7`` (its primary key) or ``…:email=a%40b.c`` (a ``key_fields`` set, whose
  entry is a *pointer* to the primary-key entry);
* the model's *generation* token ``…:generation`` and *list version* token ``…:list-version``;
* a cached query result ``…:q:<kind>:<hash of its SQL and parameters>``.

A key must be valid on every backend: Memcached refuses spaces, control characters and more
than 250 bytes. Key values are percent-encoded (so ``"a b"``, unicode and ``:`` are safe and
``1`` never collides with ``"1,2"``), and a key that would still be too long keeps its
readable head and replaces the rest by a hash.

Every key holds the model's schema fingerprint (:func:`declcache._codec.fingerprint`): change
the columns, their types, the format or the codec, and every old key is simply never read again.

Every key also holds the :class:`Scope` it was read or written in, when there is one: the
schema a ``schema_translate_map`` sends the model's table to (``~tenant_b``), and the name the
configured scope function gives a session (``@acme``). Rows of two schemas are two tables,
so their keys share nothing; a named scope is a view of the same rows, so a named scope also
reads two *outside* tokens of its schema, which writes made outside every named scope replace
(:mod:`declcache._invalidation` writes them).
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import types as sqltypes
from sqlalchemy.orm.attributes import instance_state

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from sqlalchemy.orm import Mapper
    from sqlalchemy.sql.type_api import TypeEngine

    from declcache._api import Ident

__all__ = [
    "MAX_KEY_BYTES",
    "UNSCOPED",
    "KeyBuilder",
    "KeySet",
    "Scope",
    "ident_parts",
    "match",
    "normalized",
    "primary_key_names",
    "primary_key_values",
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


def _normalizer(type_: TypeEngine[Any]) -> Callable[[Any], str]:
    """Text of a key value, the same for every spelling of it (``7`` and ``"7"`` for an int)."""
    if isinstance(type_, sqltypes.Integer):
        return _integer_text
    if isinstance(type_, sqltypes.Uuid):
        return _uuid_text
    return str


def _integer_text(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return str(int(value))


def _uuid_text(value: Any) -> str:
    return str(value if isinstance(value, uuid.UUID) else uuid.UUID(str(value)))


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
        fingerprint: the model's schema fingerprint (the spec's).
        key_sets: the ``key_fields`` sets naming one entity besides the primary key.
        scope: the scope the keys belong to.
    """

    __slots__ = (
        "_fingerprint",
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
        fingerprint: str,
        key_sets: Sequence[KeySet] = (),
        scope: Scope = UNSCOPED,
    ) -> None:
        self._mapper = mapper
        self._prefix = prefix
        self._fingerprint = fingerprint
        self.scope = scope
        schema_head = f"{prefix}{_encode_value(mapper.class_.__name__)}:{fingerprint}"
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
        return KeyBuilder(self._prefix, self._mapper, self._fingerprint, key_sets, scope)

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
