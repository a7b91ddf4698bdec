"""A corrupt or foreign payload under a key the manager reads is a miss, on every backend.

Never an exception and never a wrong object; each undecodable payload is counted in
``stats()[model].errors``. The payloads are planted with the backend's own client
(``raw_cache``) under the key the manager uses for an entity.

Finding that key needs one manager internal, :func:`entity_key`; a public
``CacheManager.key_of(model, ident)`` would let tests and tools do without it.
"""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import DateTime, Integer, String, inspect
from sqlalchemy.orm import DeclarativeBase, Mapped, make_transient_to_detached, mapped_column
from sqlalchemy.orm.attributes import set_committed_value

from declcache import CacheManager, Lookup

if TYPE_CHECKING:
    from collections.abc import Callable

    from declcache import CacheConfig
    from tests.integration.conftest import RawCache


class Base(DeclarativeBase):
    pass


class Target(Base):
    __tablename__ = "bad_payload_targets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    score: Mapped[int] = mapped_column(Integer)
    created: Mapped[Any] = mapped_column(DateTime(timezone=True), nullable=True)

    class CacheMeta:
        ttl = 600


class Other(Base):
    """Another model whose columns happen to decode as a Target's would."""

    __tablename__ = "bad_payload_others"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    score: Mapped[int] = mapped_column(Integer)
    created: Mapped[Any] = mapped_column(DateTime(timezone=True), nullable=True)

    class CacheMeta:
        ttl = 600


class OldBase(DeclarativeBase):
    pass


class OldTarget(OldBase):
    """``Target`` as an older schema had it (no ``created``): another fingerprint."""

    __tablename__ = "bad_payload_targets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    score: Mapped[int] = mapped_column(Integer)

    class CacheMeta:
        ttl = 600


Base.registry.configure()
OldBase.registry.configure()


def loaded(model: type, **values: Any) -> Any:
    """An instance as if loaded from the database and expunged."""
    instance = inspect(model).class_manager.new_instance()
    for prop in inspect(model).column_attrs:
        set_committed_value(instance, prop.key, values.get(prop.key))
    make_transient_to_detached(instance)
    return instance


def entity_key(manager: CacheManager, model: type, ident: Any) -> str:
    """The backend key ``manager`` reads for ``ident`` (the one manager internal used here)."""
    cache = manager._cache(model)
    assert cache is not None
    found = cache.keys.of_ident(ident)
    return found[-1] if isinstance(found, tuple) else found  # (fields, key) or key


def present(raw_cache: RawCache, key: str) -> bytes:
    """The raw value under ``key``, which must be there."""
    raw = raw_cache.get(key)
    assert raw is not None, f"nothing stored under {key!r}"
    return raw


def errors(manager: CacheManager, model: type = Target) -> int:
    stats = manager.stats().get(model.__name__)
    return 0 if stats is None else stats.errors


def split(raw: bytes) -> tuple[bytes, bytes]:
    """``(head, payload)`` of a stored value: dogpile's ``<json metadata>|`` and the payload."""
    head, separator, payload = raw.partition(b"|")
    assert separator, raw
    return head + separator, payload


@pytest.fixture
def manager(cache_config: CacheConfig) -> CacheManager:
    return CacheManager(cache_config)


@pytest.fixture
def stored(manager: CacheManager, raw_cache: RawCache) -> tuple[str, bytes, list[Any]]:
    """Target 1 cached by ``manager``: its key, its raw value and its decoded JSON payload."""
    assert manager.set(Target, loaded(Target, id=1, name="one", score=10))
    assert manager.set(Target, loaded(Target, id=2, name="two", score=20))
    key = entity_key(manager, Target, 1)
    raw = present(raw_cache, key)
    return key, raw, json.loads(split(raw)[1])


def _json(data: Any) -> bytes:
    return json.dumps(data).encode()


#: Corrupt values, built from the good one: ``make(raw, payload) -> bytes``. The payload is
#: ``[fingerprint, generation, kind, *column values]`` today; the cases only lean on the
#: fingerprint being first and the column values last.
CORRUPTIONS: dict[str, Callable[[bytes, list[Any]], bytes]] = {
    "empty value": lambda raw, data: b"",
    "random bytes": lambda raw, data: bytes(range(255, 0, -7)) * 3,
    "no dogpile metadata": lambda raw, data: split(raw)[1],
    "garbage metadata": lambda raw, data: b"{not json|" + split(raw)[1],
    "truncated JSON": lambda raw, data: raw[: len(split(raw)[0]) + len(split(raw)[1]) // 2],
    "not UTF-8": lambda raw, data: split(raw)[0] + b"\xff\xfe[",
    "JSON object": lambda raw, data: split(raw)[0] + _json({"id": 1, "name": "one"}),
    "JSON string": lambda raw, data: split(raw)[0] + _json("one"),
    "JSON null": lambda raw, data: split(raw)[0] + _json(None),
    "empty list": lambda raw, data: split(raw)[0] + _json([]),
    "fingerprint only": lambda raw, data: split(raw)[0] + _json(data[:1]),
    "values missing": lambda raw, data: split(raw)[0] + _json(data[:-4]),
    "one value short": lambda raw, data: split(raw)[0] + _json(data[:-1]),
    "one value extra": lambda raw, data: split(raw)[0] + _json([*data, None]),
    "wrong value types": lambda raw, data: split(raw)[0] + _json([*data[:-4], "1", 1, "x", 5]),
    "bad datetime": lambda raw, data: split(raw)[0] + _json([*data[:-1], "yesterday"]),
    "another fingerprint": lambda raw, data: split(raw)[0] + _json(["0123456789ab", *data[1:]]),
    "msgpack bytes": lambda raw, data: split(raw)[0] + msgpack.packb(data),
    "unknown kind": lambda raw, data: split(raw)[0] + _json([*data[:2], "?", *data[3:]]),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_payload_is_a_miss(
    manager: CacheManager,
    raw_cache: RawCache,
    stored: tuple[str, bytes, list[Any]],
    corruption: str,
) -> None:
    key, raw, data = stored
    raw_cache.set(key, CORRUPTIONS[corruption](raw, data))

    assert manager.get(Target, 1) is Lookup.MISS
    found = manager.get_many(Target, [1, 2])
    assert found[0] is Lookup.MISS
    assert (found[1].id, found[1].name) == (2, "two")  # the good neighbour is still served


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_payload_is_counted_as_an_error(
    manager: CacheManager,
    raw_cache: RawCache,
    stored: tuple[str, bytes, list[Any]],
    corruption: str,
) -> None:
    key, raw, data = stored
    raw_cache.set(key, CORRUPTIONS[corruption](raw, data))
    before = errors(manager)

    assert manager.get(Target, 1) is Lookup.MISS

    assert errors(manager) == before + 1


def test_the_manager_recovers_from_a_corrupt_payload(
    manager: CacheManager, raw_cache: RawCache, stored: tuple[str, bytes, list[Any]]
) -> None:
    key, _, _ = stored
    raw_cache.set(key, b"garbage")
    assert manager.get(Target, 1) is Lookup.MISS

    assert manager.set(Target, loaded(Target, id=1, name="again", score=11))

    assert manager.get(Target, 1).name == "again"


_fresh = itertools.count()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(garbage=st.binary(max_size=300))
def test_random_bytes_are_a_counted_miss(
    manager: CacheManager, raw_cache: RawCache, garbage: bytes
) -> None:
    ident = next(_fresh) + 100
    key = entity_key(manager, Target, ident)
    raw_cache.set(key, garbage)
    before = errors(manager)

    assert manager.get(Target, ident) is Lookup.MISS
    assert manager.get_many(Target, [ident]) == [Lookup.MISS]

    assert errors(manager) == before + 2


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(value=st.recursive(st.none() | st.booleans() | st.integers() | st.text(), st.lists))
def test_random_json_after_valid_metadata_is_a_miss(
    manager: CacheManager,
    raw_cache: RawCache,
    stored: tuple[str, bytes, list[Any]],
    value: Any,
) -> None:
    key, raw, _ = stored
    raw_cache.set(key, split(raw)[0] + _json(value))

    assert manager.get(Target, 1) is Lookup.MISS


# -- foreign payloads ---------------------------------------------------------------------------


def test_a_payload_of_another_model_is_a_counted_miss(
    manager: CacheManager, raw_cache: RawCache, stored: tuple[str, bytes, list[Any]]
) -> None:
    key, _, _ = stored
    assert manager.set(Other, loaded(Other, id=1, name="other", score=10))
    raw_cache.set(key, present(raw_cache, entity_key(manager, Other, 1)))
    before = errors(manager)

    assert manager.get(Target, 1) is Lookup.MISS
    assert errors(manager) == before + 1
    assert manager.get(Other, 1).name == "other"


def test_a_payload_of_an_older_schema_is_a_counted_miss(
    cache_config: CacheConfig, manager: CacheManager, raw_cache: RawCache, stored: Any
) -> None:
    key, _, _ = stored
    old = CacheManager(cache_config)
    assert old.set(OldTarget, loaded(OldTarget, id=1, name="old", score=1))
    old_key = entity_key(old, OldTarget, 1)
    assert old_key != key  # the fingerprint is part of the key: a plain read never sees it

    raw_cache.set(key, present(raw_cache, old_key))
    before = errors(manager)

    assert manager.get(Target, 1) is Lookup.MISS
    assert errors(manager) == before + 1


@pytest.mark.parametrize(("writer", "reader"), [("json", "msgpack"), ("msgpack", "json")])
def test_a_payload_of_another_serializer_is_a_miss(
    cache_config: CacheConfig, raw_cache: RawCache, writer: str, reader: str
) -> None:
    writing = CacheManager(cache_config.with_overrides(serializer=writer))
    reading = CacheManager(cache_config.with_overrides(serializer=reader))
    assert writing.set(Target, loaded(Target, id=1, name="one", score=10))
    assert writing.get(Target, 1).name == "one"

    # Same prefix, another format: the same key (keys hold no fingerprint, issue 14 point
    # 12), and the writer's payload is another release's: a plain miss, not an error, told
    # from the metadata's fingerprint before anything of it is decoded.
    assert entity_key(reading, Target, 1) == entity_key(writing, Target, 1)
    assert reading.get(Target, 1) is Lookup.MISS
    assert errors(reading) == 0
    assert writing.get(Target, 1).name == "one"


# -- payloads that decode, but not to what was asked for ---------------------------------------


def test_a_payload_of_another_entity_is_not_returned(
    manager: CacheManager, raw_cache: RawCache, stored: tuple[str, bytes, list[Any]]
) -> None:
    key, _, _ = stored
    raw_cache.set(key, present(raw_cache, entity_key(manager, Target, 2)))

    found = manager.get(Target, 1)

    assert found is Lookup.MISS, f"asked for Target 1, got Target {found.id}"


def test_a_payload_read_before_under_its_own_key_is_not_returned_under_another(
    manager: CacheManager, raw_cache: RawCache, stored: tuple[str, bytes, list[Any]]
) -> None:
    # The manager remembers payloads it parsed, and the key each was found to belong to:
    # the same bytes read under another key must be checked again, not trusted.
    key, _, _ = stored
    assert manager.get(Target, 2).id == 2
    raw_cache.set(key, present(raw_cache, entity_key(manager, Target, 2)))

    found = manager.get(Target, 1)

    assert found is Lookup.MISS, f"asked for Target 1, got Target {found.id}"
    assert manager.get(Target, 2).id == 2


def test_a_pointer_under_a_primary_key_is_not_followed(
    manager: CacheManager, raw_cache: RawCache, stored: tuple[str, bytes, list[Any]]
) -> None:
    key, raw, data = stored
    raw_cache.set(key, split(raw)[0] + _json([*data[:2], "p", "2"]))

    found = manager.get(Target, 1)

    assert found is Lookup.MISS, f"asked for Target 1, got Target {found.id}"


def test_a_null_primary_key_in_a_payload_is_a_miss(
    manager: CacheManager, raw_cache: RawCache, stored: tuple[str, bytes, list[Any]]
) -> None:
    key, raw, data = stored
    values = data[-4:]
    values[0] = None  # the id column comes first
    raw_cache.set(key, split(raw)[0] + _json([*data[:-4], *values]))

    found = manager.get(Target, 1)

    assert found is Lookup.MISS, f"got an entity with identity {inspect(found).key}"
