"""Cache keys: ``prefix + model + schema fingerprint + key fields = values``. Pure, no I/O.

A key must be valid on every backend: Memcached refuses spaces, control characters and more
than 250 bytes. Key values are percent-encoded (so ``"a b"``, unicode and ``:`` are safe and
``1`` never collides with ``"1,2"``), and a key that would still be too long keeps its
readable head and replaces the rest by a hash.

The fingerprint hashes the model's identity, table, column names and column types, the payload
format and the codec version: change any of them and every old key is simply never read again.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import types as sqltypes

from declcache._codec import CODEC_VERSION, cached_columns

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlalchemy.orm import Mapper
    from sqlalchemy.sql.type_api import TypeEngine

__all__ = ["MAX_KEY_BYTES", "KeyBuilder", "fingerprint", "normalized"]

#: Memcached's limit, and so the limit of every key declcache writes.
MAX_KEY_BYTES = 250
_HASHED_TAIL = 40  # hex characters of sha256 kept when a key is too long


def fingerprint(mapper: Mapper[Any], format_name: str) -> str:
    """A short hash of everything that decides how a cached row of this model is shaped."""
    cls = mapper.class_
    shape = [
        f"{cls.__module__}.{cls.__qualname__}",
        ",".join(table.fullname for table in mapper.tables),
        *(f"{key}:{type_!r}" for key, type_ in cached_columns(mapper)),
        f"format={format_name}",
        f"codec={CODEC_VERSION}",
    ]
    return hashlib.sha256("\n".join(shape).encode()).hexdigest()[:12]


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


class KeyBuilder:
    """Builds the keys of one model: one per key-field set, plus the list-version key.

    The text before the values (``head:fields=``) and each field's normaliser are worked out
    once per key-field set: a key is built on every cache read.
    """

    __slots__ = ("_head", "_mapper", "_shapes")

    def __init__(self, prefix: str, mapper: Mapper[Any], format_name: str) -> None:
        model = _encode_value(mapper.class_.__name__)
        self._head = f"{prefix}{model}:{fingerprint(mapper, format_name)}"
        self._mapper = mapper
        self._shapes: dict[tuple[str, ...], tuple[str, tuple[Callable[[Any], str], ...]]] = {}

    @property
    def head(self) -> str:
        """``prefix + model + fingerprint``: every key of this model starts with it."""
        return self._head

    def _shape(self, fields: tuple[str, ...]) -> tuple[str, tuple[Callable[[Any], str], ...]]:
        try:
            return self._shapes[fields]
        except KeyError:
            pass
        normalizers = _normalizers(self._mapper)
        names = "+".join(_encode_value(field) for field in fields)
        shape = f"{self._head}:{names}=", tuple(_quoted(normalizers[field]) for field in fields)
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

    def named_key(self, name: str) -> str:
        """A per-model bookkeeping key (a token, a cached query); never equal to an entity key."""
        return _bounded(f"{self._head}:{_encode_value(name)}")


def _bounded(key: str) -> str:
    """Keep ``key`` within :data:`MAX_KEY_BYTES`, hashing what does not fit."""
    if len(key) <= MAX_KEY_BYTES:  # percent-encoding leaves ASCII only: chars == bytes
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:_HASHED_TAIL]
    return f"{key[: MAX_KEY_BYTES - _HASHED_TAIL - 1]}#{digest}"
