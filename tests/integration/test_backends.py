"""CacheManager on every backend: one suite, subclassed per backend (dogpile's test style).

:class:`BackendSuite` holds the backend-agnostic tests; each ``Test*`` class below supplies a
:class:`~declcache.CacheConfig` through its ``config`` fixture and, when the backend keeps bytes
somewhere a test can reach, a ``raw`` fixture that reads and plants them past declcache.
Mixins add what only some backends have (server-side expiry on Redis and Memcached, one Redis
connection pool, several processes on one dbm file, a server that goes away).

Rows come from factory-boy factories on a SQLite database; every config uses the test's own
``key_prefix``, so tests never see each other's keys on the shared servers.
"""

from __future__ import annotations

import contextlib
import dbm
import gc
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import factory
import pytest
from factory.alchemy import SQLAlchemyModelFactory
from sqlalchemy import create_engine, inspect
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    configure_mappers,
    mapped_column,
    scoped_session,
    sessionmaker,
)

from declcache import CacheConfig, CacheManager, Lookup, SettingsError, setup_cache_listeners
from tests import _servers
from tests.integration.conftest import delete_redis_keys

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import FrameType

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- models and factories ---------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Widget(Base):
    __tablename__ = "backend_widgets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]

    class CacheMeta:
        ttl = 300


class Gadget(Base):
    """A second cached model with another ttl: it must get a region of its own."""

    __tablename__ = "backend_gadgets"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str]

    class CacheMeta:
        ttl = 120


class Note(Base):
    """Keyed by free text, to push awkward key values through every backend."""

    __tablename__ = "backend_notes"

    code: Mapped[str] = mapped_column(primary_key=True)
    body: Mapped[str]

    class CacheMeta:
        ttl = 300


class Flash(Base):
    """Lives one second in the cache."""

    __tablename__ = "backend_flashes"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]

    class CacheMeta:
        ttl = 1


class Plain(Base):
    """No CacheMeta: never cached."""

    __tablename__ = "backend_plains"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


DbSession = scoped_session(sessionmaker(expire_on_commit=False))


class _Factory(SQLAlchemyModelFactory):
    class Meta:
        abstract = True
        sqlalchemy_session = DbSession
        sqlalchemy_session_persistence = "commit"


class WidgetFactory(_Factory):
    class Meta:
        model = Widget

    id = factory.Sequence(lambda n: n + 1)
    name = factory.Sequence(lambda n: f"widget-{n}")


class GadgetFactory(_Factory):
    class Meta:
        model = Gadget

    id = factory.Sequence(lambda n: n + 1)
    label = factory.Sequence(lambda n: f"gadget-{n}")


class NoteFactory(_Factory):
    class Meta:
        model = Note

    code = factory.Sequence(lambda n: f"note-{n}")
    body = factory.Sequence(lambda n: f"body-{n}")


class FlashFactory(_Factory):
    class Meta:
        model = Flash

    id = factory.Sequence(lambda n: n + 1)
    name = factory.Sequence(lambda n: f"flash-{n}")


class PlainFactory(_Factory):
    class Meta:
        model = Plain

    id = factory.Sequence(lambda n: n + 1)
    name = factory.Sequence(lambda n: f"plain-{n}")


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    """A session on a fresh SQLite file; the factories write through it."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    Base.metadata.create_all(engine)
    DbSession.configure(bind=engine)
    yield DbSession()
    DbSession.remove()
    engine.dispose()


class Loader:
    """A loader for ``manager.load``: reads one row from the database and counts its calls."""

    def __init__(self, session: Session, model: type, ident: Any) -> None:
        self.session, self.model, self.ident = session, model, ident
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.session.get(self.model, self.ident, populate_existing=True)


def columns(instance: Any) -> dict[str, Any]:
    """Every column value of a mapped instance."""
    mapper = inspect(type(instance))
    return {attr.key: getattr(instance, attr.key) for attr in mapper.column_attrs}


def entity_key(manager: CacheManager, model: type, ident: Any) -> str:
    """The backend key the manager stores ``ident``'s entity under (a peek at a private)."""
    cache = manager._cache(model)
    assert cache is not None
    return cache.keys.of_ident(ident)[1]


def generation_key(manager: CacheManager, model: type) -> str:
    cache = manager._cache(model)
    assert cache is not None
    return cache.keys.generation_key


def region_of(manager: CacheManager, model: type) -> Any:
    cache = manager._cache(model)
    assert cache is not None
    return cache.region


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    assert not _servers.listening("127.0.0.1", port)
    return port


class Exploit:
    """A pickle that creates ``path`` when it is unpickled: proof of code execution."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


# --- raw access to what a backend stores --------------------------------------------------------


class Raw:
    """The bytes under a key, read and written with the backend's own client."""

    def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def plant(self, key: str, value: bytes) -> None:
        """Store ``value`` as a hostile writer sharing the backend would."""
        raise NotImplementedError


class DictRaw(Raw):
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def get(self, key: str) -> bytes | None:
        value = self._data.get(key)
        return None if value is None else bytes(value)

    def plant(self, key: str, value: bytes) -> None:
        self._data[key] = value


class RedisRaw(Raw):
    def __init__(self, client: Any) -> None:
        self.client = client

    def get(self, key: str) -> bytes | None:
        value = self.client.get(key)
        return None if value is None else bytes(value)

    def plant(self, key: str, value: bytes) -> None:
        self.client.set(key, value, ex=300)


class MemcachedRaw(Raw):
    def __init__(self, client: Any) -> None:
        self.client = client

    def get(self, key: str) -> bytes | None:
        value = self.client.get(key)
        return None if value is None else bytes(value)

    def plant(self, key: str, value: bytes) -> None:
        from pymemcache.serde import FLAG_PICKLE

        # Flagged as a pickle: pymemcache's default serde would unpickle it on read.
        assert self.client.set(key, value, expire=300, noreply=False, flags=FLAG_PICKLE)


class DbmRaw(Raw):
    def __init__(self, filename: str) -> None:
        self._filename = filename

    def get(self, key: str) -> bytes | None:
        with dbm.open(self._filename, "c") as db:
            return db.get(key)

    def plant(self, key: str, value: bytes) -> None:
        with dbm.open(self._filename, "c") as db:
            db[key] = value


#: The two ttls of :func:`write_mixed_ttls`: a tombstone's and a token's, as in one commit.
SHORT_TTL, LONG_TTL = 100, 10_000


def write_mixed_ttls(manager: CacheManager) -> list[str]:
    """One ``write_many`` of three keys with two ttls, one key written twice; the keys.

    The values end as ``zero``, ``one``, ``two`` with ttls short, long, short: the second
    write of the first key wins, ttl included.
    """
    cache = manager._cache(Widget)
    assert cache is not None
    keys = [entity_key(manager, Widget, 900_000 + n) for n in range(3)]
    cache.store.write_many(
        [
            (keys[0], b"overwritten", LONG_TTL),
            (keys[1], b"one", LONG_TTL),
            (keys[0], b"zero", SHORT_TTL),
            (keys[2], b"two", SHORT_TTL),
        ]
    )
    return keys


def assert_mixed_ttls(seconds_left: list[int]) -> None:
    """The server ttls of :func:`write_mixed_ttls`'s keys are short, long, short."""
    first, second, third = seconds_left
    assert 0 < first <= SHORT_TTL
    assert SHORT_TTL < second <= LONG_TTL
    assert 0 < third <= SHORT_TTL


# --- the backend-agnostic suite -------------------------------------------------------------------


class BackendSuite:
    """What every backend must do. Subclasses provide the ``config`` fixture."""

    #: dogpile backend name the config resolves to.
    backend_name: ClassVar[str]
    #: Class name of the dogpile backend each region gets.
    backend_class: ClassVar[str]
    #: Whether the backend remembers anything (``dogpile.cache.null`` does not).
    keeps_values: ClassVar[bool] = True

    @pytest.fixture
    def config(self, key_prefix: str) -> CacheConfig:
        raise NotImplementedError

    @pytest.fixture
    def manager(self, config: CacheConfig) -> CacheManager:
        return CacheManager(config)

    def assert_cached(self, found: Any, row: Any) -> None:
        """``found`` is a detached copy of ``row`` (or a miss where nothing is kept)."""
        if not self.keeps_values:
            assert found is Lookup.MISS
            return
        assert found is not Lookup.MISS
        assert found is not row
        assert type(found) is type(row)
        assert columns(found) == columns(row)
        assert inspect(found).detached

    def test_one_region_per_cached_model_with_its_ttl(self, manager: CacheManager) -> None:
        assert manager.enabled
        assert manager.config.backend == self.backend_name
        widgets, gadgets = region_of(manager, Widget), region_of(manager, Gadget)
        assert widgets is not gadgets
        assert widgets.expiration_time == 300
        assert gadgets.expiration_time == 120
        assert region_of(manager, Flash).expiration_time == 1
        assert type(widgets.backend).__name__ == self.backend_class
        assert type(gadgets.backend).__name__ == self.backend_class
        assert region_of(manager, Widget) is widgets  # built once, then reused
        assert manager._cache(Plain) is None

    def test_set_get_get_many_invalidate_round_trip(
        self, manager: CacheManager, session: Session
    ) -> None:
        first, second = WidgetFactory.create_batch(2)
        gadget = GadgetFactory(id=first.id)  # same id, other model
        assert manager.get(Widget, first.id) is Lookup.MISS

        assert manager.set(Widget, first)
        assert manager.set_many(Widget, [second]) == 1
        assert manager.set(Gadget, gadget)
        self.assert_cached(manager.get(Widget, first.id), first)
        self.assert_cached(manager.get(Widget, str(first.id)), first)  # "7" names 7 too
        self.assert_cached(manager.get(Gadget, gadget.id), gadget)

        many = manager.get_many(Widget, [second.id, 10_000, first.id])
        assert many[1] is Lookup.MISS
        self.assert_cached(many[0], second)
        self.assert_cached(many[2], first)
        self.assert_cached(manager.get(Gadget, first.id), gadget)  # never the widget

        assert manager.invalidate(Widget, first.id) is True
        assert manager.get(Widget, first.id) is Lookup.MISS
        self.assert_cached(manager.get(Widget, second.id), second)
        self.assert_cached(manager.get(Gadget, gadget.id), gadget)

        loader = Loader(session, Widget, first.id)
        assert columns(manager.load(Widget, first.id, loader)) == columns(first)
        assert loader.calls == 1
        reloaded = manager.load(Widget, first.id, loader)
        assert columns(reloaded) == columns(first)
        assert loader.calls == (1 if self.keeps_values else 2)

        assert manager.invalidate_model(Widget) is True
        assert manager.get_many(Widget, [first.id, second.id]) == [Lookup.MISS] * 2
        self.assert_cached(manager.get(Gadget, gadget.id), gadget)

        stats = manager.stats()
        assert stats["Widget"].errors == 0
        assert stats["Gadget"].errors == 0
        assert stats["Widget"].invalidations >= 2
        if self.keeps_values:
            assert stats["Widget"].hits >= 5
            assert stats["Widget"].fills >= 3

    def test_write_many_writes_every_entry(self, manager: CacheManager) -> None:
        keys = write_mixed_ttls(manager)
        cache = manager._cache(Widget)
        assert cache is not None
        expected = [b"zero", b"one", b"two"] if self.keeps_values else [None] * 3
        assert cache.store.get_many(keys) == expected

    def test_clear_drops_every_cached_model(self, manager: CacheManager, session: Session) -> None:
        widget, gadget, note = WidgetFactory(), GadgetFactory(), NoteFactory()
        assert manager.set(Widget, widget)
        assert manager.set(Gadget, gadget)
        assert manager.set(Note, note)
        self.assert_cached(manager.get(Note, note.code), note)
        assert manager.clear() is True
        assert manager.get(Widget, widget.id) is Lookup.MISS
        assert manager.get(Gadget, gadget.id) is Lookup.MISS
        assert manager.get(Note, note.code) is Lookup.MISS
        assert manager.set(Widget, widget)  # and caching goes on afterwards
        self.assert_cached(manager.get(Widget, widget.id), widget)

    def test_model_without_cache_meta_is_never_cached(
        self, manager: CacheManager, session: Session
    ) -> None:
        row = PlainFactory()
        assert manager.spec(Plain) is None
        assert not manager.is_cached(Plain)
        assert manager.set(Plain, row) is False
        assert manager.get(Plain, row.id) is Lookup.MISS
        loader = Loader(session, Plain, row.id)
        assert manager.load(Plain, row.id, loader) is row
        assert manager.load(Plain, row.id, loader) is row
        assert loader.calls == 2
        assert manager.invalidate(Plain, row.id) is True
        assert "Plain" not in manager.stats()

    @pytest.mark.parametrize(
        "codes",
        [
            pytest.param(["with space", "tab\tand\nnew line", " lead", "trail "], id="spaces"),
            pytest.param(["ünïcødé ✓", "日本語のキー", "emoji 🐍🎉", "ß"], id="unicode"),
            pytest.param(["x" * 1000, "é" * 400, "x" * 999 + "y"], id="very-long"),
            pytest.param(["A", "%41", "a:b", "a,b", "a=b", "a+b", "#", ""], id="separators"),
        ],
    )
    def test_awkward_key_values_are_valid_keys_everywhere(
        self, manager: CacheManager, session: Session, codes: list[str]
    ) -> None:
        rows = [NoteFactory(code=code) for code in codes]
        keys = [entity_key(manager, Note, code) for code in codes]
        assert len(set(keys)) == len(keys), "two key values share a cache key"
        for key in keys:  # what Memcached accepts: ≤ 250 bytes, no whitespace or control chars
            assert key.isascii()
            assert len(key.encode()) <= 250
            assert not any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in key)

        assert manager.set_many(Note, rows) == len(rows)
        for row in rows:
            self.assert_cached(manager.get(Note, row.code), row)
        found = manager.get_many(Note, codes)
        for row, item in zip(rows, found, strict=True):
            self.assert_cached(item, row)
        assert manager.stats()["Note"].errors == 0

    def test_entries_expire_after_the_model_ttl(
        self, manager: CacheManager, session: Session
    ) -> None:
        row = FlashFactory()
        assert manager.set(Flash, row)
        self.assert_cached(manager.get(Flash, row.id), row)
        time.sleep(1.1)
        assert manager.get(Flash, row.id) is Lookup.MISS
        loader = Loader(session, Flash, row.id)
        assert columns(manager.load(Flash, row.id, loader)) == columns(row)
        assert loader.calls == 1
        assert manager.stats()["Flash"].errors == 0

    def test_disabled_manager_always_misses_and_writes_nothing(
        self, config: CacheConfig, session: Session
    ) -> None:
        manager = CacheManager(config.with_overrides(enabled=False))
        row = WidgetFactory()
        assert manager.enabled is False
        assert not manager.is_cached(Widget)
        assert manager.set(Widget, row) is False
        assert manager.set_many(Widget, [row]) == 0
        assert manager.get(Widget, row.id) is Lookup.MISS
        assert manager.get_many(Widget, [row.id, row.id + 1]) == [Lookup.MISS] * 2
        loader = Loader(session, Widget, row.id)
        assert manager.load(Widget, row.id, loader) is row
        assert manager.load(Widget, row.id, loader) is row
        assert loader.calls == 2
        assert manager.invalidate(Widget, row.id) is True
        assert manager.invalidate_model(Widget) is True
        assert manager.clear() is True
        assert manager.stats() == {}
        assert manager.pending_invalidations == 0


class StoredBytesChecks:
    """For backends that keep bytes: what is stored is dogpile's JSON layout, never a pickle.

    Subclasses provide the ``raw`` fixture (a :class:`Raw`).
    """

    def test_stored_bytes_are_dogpile_json_without_pickle(
        self, manager: CacheManager, raw: Raw, session: Session
    ) -> None:
        row = WidgetFactory(name="plain-ascii-name")
        assert manager.set(Widget, row)
        for key in (entity_key(manager, Widget, row.id), generation_key(manager, Widget)):
            stored = raw.get(key)
            assert stored is not None
            head, separator, payload = stored.partition(b"|")
            assert separator
            assert stored.startswith(b'{"ct":')  # dogpile's metadata comes first
            metadata = json.loads(head)
            assert set(metadata) == {"ct", "v"}
            assert isinstance(metadata["ct"], float)
            # nothing a pickle starts with (PROTO 0x80) or holds in protocol 2+: plain ASCII
            assert stored.isascii()
            assert not stored.startswith(b"\x80")
            if key == entity_key(manager, Widget, row.id):
                body = json.loads(payload)
                assert isinstance(body, list)
                assert body[-2:] == [row.id, "plain-ascii-name"]

    def test_planted_pickle_is_a_miss_never_unpickled(
        self, manager: CacheManager, raw: Raw, session: Session, tmp_path: Path
    ) -> None:
        row = WidgetFactory()
        assert manager.set(Widget, row)
        marker = tmp_path / "pwned"
        evil = pickle.dumps(Exploit(marker))
        dogpile_framed = b'{"ct":%f,"v":2}|' % time.time() + evil
        key = entity_key(manager, Widget, row.id)
        for planted in (evil, dogpile_framed):
            raw.plant(key, planted)
            assert manager.get(Widget, row.id) is Lookup.MISS
            loader = Loader(session, Widget, row.id)
            assert columns(manager.load(Widget, row.id, loader)) == columns(row)
            assert loader.calls == 1
            assert not marker.exists()
        raw.plant(generation_key(manager, Widget), evil)
        assert manager.get(Widget, row.id) is Lookup.MISS
        assert not marker.exists()
        assert manager.stats()["Widget"].errors >= 2
        # the planted bytes were live: unpickling them would have run code
        pickle.loads(pickle.dumps(Exploit(tmp_path / "control")))
        assert (tmp_path / "control").exists()

    def test_disabled_manager_leaves_the_backend_untouched(
        self, config: CacheConfig, raw: Raw, session: Session
    ) -> None:
        row = WidgetFactory()
        disabled = CacheManager(config.with_overrides(enabled=False))
        disabled.set(Widget, row)
        disabled.load(Widget, row.id, Loader(session, Widget, row.id))
        disabled.clear()
        probe = CacheManager(config)  # only to compute the keys; reads nothing
        assert raw.get(entity_key(probe, Widget, row.id)) is None
        assert raw.get(generation_key(probe, Widget)) is None


# --- memory -------------------------------------------------------------------------------------


class TestMemory(StoredBytesChecks, BackendSuite):
    backend_name = "dogpile.cache.memory"
    backend_class = "MemoryBackend"

    @pytest.fixture
    def cache_dict(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def config(self, key_prefix: str, cache_dict: dict[str, Any]) -> CacheConfig:
        return CacheConfig(
            backend="dogpile.cache.memory",
            arguments={"cache_dict": cache_dict},
            key_prefix=key_prefix,
        )

    @pytest.fixture
    def raw(self, cache_dict: dict[str, Any]) -> Raw:
        return DictRaw(cache_dict)


# --- redis --------------------------------------------------------------------------------------


def _redis_config(host: str, port: int, key_prefix: str, **extra: Any) -> CacheConfig:
    return CacheConfig(
        backend="dogpile.cache.redis",
        arguments={"host": host, "port": port, "db": 0, **extra},
        key_prefix=key_prefix,
    )


class RedisChecks(StoredBytesChecks):
    """Redis only: server-side expiry and one connection pool per manager."""

    backend_name = "dogpile.cache.redis"
    backend_class = "RedisBackend"
    extra_arguments: ClassVar[dict[str, Any]] = {}

    @pytest.fixture
    def config(self, redis_address: tuple[str, int], key_prefix: str) -> Iterator[CacheConfig]:
        host, port = redis_address
        yield _redis_config(host, port, key_prefix, **self.extra_arguments)
        delete_redis_keys(host, port, key_prefix)

    @pytest.fixture
    def raw(self, redis_address: tuple[str, int]) -> Iterator[RedisRaw]:
        import redis

        client = redis.Redis(*redis_address, socket_timeout=5)
        yield RedisRaw(client)
        client.close()

    def test_server_side_expiry_is_set_on_every_key(
        self, manager: CacheManager, raw: RedisRaw, session: Session, key_prefix: str
    ) -> None:
        widget, flash = WidgetFactory(), FlashFactory()
        assert manager.set(Widget, widget)
        assert manager.set(Flash, flash)
        assert manager.invalidate(Widget, widget.id + 1)  # a tombstone and a list token
        assert 0 < raw.client.ttl(entity_key(manager, Widget, widget.id)) <= 300 + 60
        assert 0 < raw.client.ttl(entity_key(manager, Flash, flash.id)) <= 1 + 60
        assert 0 < raw.client.ttl(entity_key(manager, Widget, widget.id + 1)) <= 300 + 60
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", key_prefix) + "*"
        keys = list(raw.client.scan_iter(match=pattern, count=500))
        assert len(keys) >= 5
        assert all(raw.client.ttl(key) > 0 for key in keys), "a key without expiry"

    def test_write_many_gives_each_entry_its_own_server_ttl(
        self, manager: CacheManager, raw: RedisRaw
    ) -> None:
        keys = write_mixed_ttls(manager)
        assert_mixed_ttls([raw.client.ttl(key) for key in keys])

    def test_regions_of_one_manager_share_one_connection_pool(
        self, manager: CacheManager, session: Session
    ) -> None:
        pools = {
            id(region_of(manager, model).backend.writer_client.connection_pool)
            for model in (Widget, Gadget, Note, Flash)
        }
        assert len(pools) == 1
        # and the shared pool works for every model
        widget, gadget = WidgetFactory(), GadgetFactory()
        assert manager.set(Widget, widget)
        assert manager.set(Gadget, gadget)
        self.assert_cached(manager.get(Widget, widget.id), widget)  # type: ignore[attr-defined]
        self.assert_cached(manager.get(Gadget, gadget.id), gadget)  # type: ignore[attr-defined]


class TestRedis(RedisChecks, BackendSuite):
    def test_a_commit_invalidates_in_one_round_trip(
        self, manager: CacheManager, session: Session, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The tombstone (model ttl) and the list token (longer) go in one pipeline."""
        import redis.connection

        setup_cache_listeners()
        widget = WidgetFactory()
        assert manager.set(Widget, widget)
        sent: list[bytes] = []
        original = redis.connection.AbstractConnection.send_packed_command

        def counting(self: Any, command: Any, check_health: bool = True) -> None:
            sent.append(b"".join(command) if isinstance(command, list) else command)
            original(self, command, check_health)

        with Session(session.get_bind(), info={"cache_manager": manager}) as writer:
            row = writer.get(Widget, widget.id)
            assert row is not None
            row.name = "renamed"
            monkeypatch.setattr(
                redis.connection.AbstractConnection, "send_packed_command", counting
            )
            writer.commit()
            monkeypatch.undo()

        assert len(sent) == 1, sent  # one write to the server: one round trip
        assert sent[0].count(b"$3\r\nSET\r\n") == 2  # the tombstone and the list token
        assert manager.get(Widget, widget.id) is Lookup.MISS
        assert manager.stats()["Widget"].errors == 0

    def test_backend_down_falls_back_to_the_loader(self, key_prefix: str, session: Session) -> None:
        with _servers.start_redis_server() as server:
            manager = CacheManager(_redis_config(*server.address, key_prefix))
            row = WidgetFactory()
            assert manager.set(Widget, row)
            self.assert_cached(manager.get(Widget, row.id), row)
            server.stop()

            assert manager.get(Widget, row.id) is Lookup.MISS
            loader = Loader(session, Widget, row.id)
            assert manager.load(Widget, row.id, loader) is row
            assert loader.calls == 1
            stats = manager.stats()["Widget"]
            assert stats.errors >= 2
            assert stats.hits == 1

    def test_a_dead_redis_costs_one_connection_attempt(
        self, key_prefix: str, session: Session, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """redis-py retries three times with backoff by default: seconds per call on a dead
        server. declcache turns retries off, so one lookup makes one attempt, then misses."""
        import redis.connection

        attempts: list[int] = []
        original = redis.connection.Connection._connect

        def counting_connect(self: redis.connection.Connection) -> object:
            attempts.append(1)
            return original(self)

        with _servers.start_redis_server() as server:
            manager = CacheManager(_redis_config(*server.address, key_prefix))
            row = WidgetFactory()
            assert manager.set(Widget, row)
            server.stop()
            monkeypatch.setattr(redis.connection.Connection, "_connect", counting_connect)
            assert manager.get(Widget, row.id) is Lookup.MISS
        assert len(attempts) == 1


class TestRedisDistributedLock(RedisChecks, BackendSuite):
    extra_arguments: ClassVar[dict[str, Any]] = {"distributed_lock": True}

    def test_regions_use_the_distributed_lock(self, manager: CacheManager) -> None:
        assert region_of(manager, Widget).backend.distributed_lock is True
        assert region_of(manager, Gadget).backend.distributed_lock is True

    def test_api_md_configuration_builds_regions_without_warnings(
        self, manager: CacheManager
    ) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            region_of(manager, Widget)
            region_of(manager, Gadget)
        assert [str(item.message) for item in caught] == []


# --- memcached ----------------------------------------------------------------------------------


def _memcached_meta(address: tuple[str, int], key: str) -> dict[str, str]:
    """Flags and remaining ttl of ``key``, from memcached's meta-get (``mg key t f``)."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(f"mg {key} t f\r\n".encode())
        reply = sock.recv(256).decode()
    status, *tokens = reply.split()
    assert status == "HD", f"meta-get of {key!r} answered {reply!r}"
    return {token[0]: token[1:] for token in tokens}


class MemcachedChecks(StoredBytesChecks):
    """Memcached only: server-side expiry and flags (no pickle flag)."""

    backend_class = "PyMemcacheBackend"
    #: The name the user writes; ``backend_name`` is what it resolves to.
    configured_name: ClassVar[str]

    @pytest.fixture
    def config(self, memcached_address: tuple[str, int], key_prefix: str) -> CacheConfig:
        host, port = memcached_address
        return CacheConfig(
            backend=self.configured_name,
            arguments={"url": [f"{host}:{port}"]},
            key_prefix=key_prefix,
        )

    @pytest.fixture
    def raw(self, memcached_address: tuple[str, int]) -> Iterator[MemcachedRaw]:
        from pymemcache.client.base import Client

        client = Client(memcached_address, connect_timeout=5, timeout=5)
        yield MemcachedRaw(client)
        client.close()

    def test_server_side_expiry_and_plain_flags(
        self, manager: CacheManager, memcached_address: tuple[str, int], session: Session
    ) -> None:
        widget, flash = WidgetFactory(), FlashFactory()
        assert manager.set(Widget, widget)
        assert manager.set(Flash, flash)
        for key, ttl in (
            (entity_key(manager, Widget, widget.id), 300),
            (entity_key(manager, Flash, flash.id), 1),
        ):
            meta = _memcached_meta(memcached_address, key)
            assert 0 < int(meta["t"]) <= ttl + 60
            assert meta["f"] == "0"  # pymemcache's pickle flag is 1: nothing is pickled

    def test_write_many_gives_each_entry_its_own_server_ttl(
        self, manager: CacheManager, memcached_address: tuple[str, int]
    ) -> None:
        keys = write_mixed_ttls(manager)
        assert_mixed_ttls([int(_memcached_meta(memcached_address, key)["t"]) for key in keys])


class TestPymemcache(MemcachedChecks, BackendSuite):
    backend_name = "dogpile.cache.pymemcache"
    configured_name = "dogpile.cache.pymemcache"

    def test_backend_down_falls_back_to_the_loader(self, key_prefix: str, session: Session) -> None:
        manager = CacheManager(
            CacheConfig(
                backend="dogpile.cache.pymemcache",
                arguments={"url": [f"127.0.0.1:{free_port()}"]},
                key_prefix=key_prefix,
            )
        )
        row = WidgetFactory()
        assert manager.set(Widget, row) is False
        assert manager.get(Widget, row.id) is Lookup.MISS
        assert manager.get_many(Widget, [row.id, row.id + 1]) == [Lookup.MISS] * 2
        loader = Loader(session, Widget, row.id)
        assert manager.load(Widget, row.id, loader) is row
        assert manager.load(Widget, row.id, loader) is row
        assert loader.calls == 2
        assert manager.stats()["Widget"].errors >= 4


class TestMemcachedAlias(MemcachedChecks, BackendSuite):
    """``dogpile.cache.memcached`` (python-memcached in dogpile) means pymemcache here."""

    backend_name = "dogpile.cache.pymemcache"
    configured_name = "dogpile.cache.memcached"

    def test_alias_resolves_to_pymemcache(self, config: CacheConfig) -> None:
        assert config.backend == "dogpile.cache.pymemcache"
        assert CacheConfig(backend="dogpile.cache.memcached").backend == config.backend


# --- dbm ----------------------------------------------------------------------------------------


class LockWaitTimeout(BaseException):
    """A backend call sat in dogpile's file lock for too long: a deadlock, not a wait.

    A BaseException, so that declcache's ``except Exception`` fault handling cannot eat it.
    """


_DOGPILE_FILE_BACKEND = os.path.join("dogpile", "cache", "backends", "file.py")


def _in_file_lock(frame: FrameType | None) -> bool:
    return (
        frame is not None
        and frame.f_code.co_name == "_acquire"
        and frame.f_code.co_filename.endswith(_DOGPILE_FILE_BACKEND)
    )


@contextlib.contextmanager
def deadlock_watchdog(limit: float = 0.5) -> Iterator[None]:
    """Raise :class:`LockWaitTimeout` in the main thread when one ``flock`` waits > ``limit``.

    A single process never legitimately waits on its own dbm lock, so a long wait is the
    self-deadlock; this turns a hang into a failure.
    """
    stuck: dict[str, Any] = {"frame": None, "since": 0.0}

    def tick(_signum: int, frame: FrameType | None) -> None:
        if not _in_file_lock(frame):
            stuck["frame"] = None
        elif stuck["frame"] is not frame:
            stuck["frame"], stuck["since"] = frame, time.monotonic()
        elif time.monotonic() - stuck["since"] > limit:
            stuck["frame"] = None
            raise LockWaitTimeout(f"blocked in dogpile's file lock for more than {limit} s")

    previous = signal.signal(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_DBM_WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time

    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    from declcache import CacheConfig, CacheManager, Lookup

    filename, prefix, tag, rounds, go = sys.argv[1:6]
    stuck = {"frame": None, "since": 0.0}

    def tick(signum, frame):  # a flock held > 2 s by one call is a deadlock: exit 75
        if frame is None or frame.f_code.co_name != "_acquire":
            stuck["frame"] = None
        elif stuck["frame"] is not frame:
            stuck["frame"], stuck["since"] = frame, time.monotonic()
        elif time.monotonic() - stuck["since"] > 2.0:
            os._exit(75)

    signal.signal(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)

    class Base(DeclarativeBase):
        pass

    class Widget(Base):
        __tablename__ = "widgets"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

        class CacheMeta:
            ttl = 300

    manager = CacheManager(
        CacheConfig(
            backend="dogpile.cache.dbm", arguments={"filename": filename}, key_prefix=prefix
        )
    )
    manager.is_cached(Widget)  # build the region before the race starts
    deadline = time.monotonic() + 10
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    hits = misses = wrong = 0
    for i in range(int(rounds)):
        ident = i % 10
        if i % 3 == 0:
            manager.set(Widget, Widget(id=ident, name=f"{tag}-{ident}"))
        elif i % 7 == 0:
            manager.invalidate(Widget, ident)
        found = manager.get(Widget, ident)
        if found is Lookup.MISS:
            misses += 1
        elif found.id == ident and found.name in {f"a-{ident}", f"b-{ident}"}:
            hits += 1
        else:
            wrong += 1
    signal.setitimer(signal.ITIMER_REAL, 0)  # a tick during shutdown would kill the process
    stats = manager.stats()["Widget"]
    print(json.dumps({"hits": hits, "misses": misses, "wrong": wrong, "errors": stats.errors}))
    """
)


class TestDbm(StoredBytesChecks, BackendSuite):
    backend_name = "dogpile.cache.dbm"
    backend_class = "DBMBackend"

    @pytest.fixture(autouse=True)
    def _no_lock_hangs(self) -> Iterator[None]:
        """A self-deadlock on dogpile's file lock fails the test instead of hanging the run."""
        with deadlock_watchdog():
            yield

    @pytest.fixture
    def filename(self, tmp_path: Path) -> str:
        return str(tmp_path / "cache.dbm")

    @pytest.fixture
    def config(self, key_prefix: str, filename: str) -> CacheConfig:
        return CacheConfig(
            backend="dogpile.cache.dbm", arguments={"filename": filename}, key_prefix=key_prefix
        )

    @pytest.fixture
    def raw(self, filename: str) -> Raw:
        return DbmRaw(filename)

    def test_two_processes_share_one_dbm_file(
        self, filename: str, key_prefix: str, tmp_path: Path
    ) -> None:
        go = tmp_path / "go"
        environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", _DBM_WORKER, filename, key_prefix, tag, "150", str(go)],
                cwd=tmp_path,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for tag in ("a", "b")
        ]
        go.touch()
        results = []
        for worker in workers:
            try:
                out, err = worker.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.communicate()
                raise
            if worker.returncode == 75:
                raise LockWaitTimeout(f"a worker deadlocked on the dbm lock: {err.decode()}")
            assert worker.returncode == 0, err.decode()
            results.append(json.loads(out.decode().strip().splitlines()[-1]))

        for result in results:
            assert result["wrong"] == 0
            assert result["errors"] == 0
            assert result["hits"] > 0
        from declcache import _payload

        with dbm.open(filename, "r") as db:  # the file is intact and every value is ours
            keys = list(db.keys())
            assert len(keys) >= 11  # ten widgets and a generation token at least
            for key in keys:
                created_at, payload = _payload.unwrap(db[key])
                assert created_at > 0
                if key.endswith((b":generation", b":list-version")):
                    assert re.fullmatch(rb"[0-9a-f]{16}", payload), payload  # a bare token
                else:
                    assert isinstance(json.loads(payload), list)


# --- null ---------------------------------------------------------------------------------------


class TestNull(BackendSuite):
    backend_name = "dogpile.cache.null"
    backend_class = "NullBackend"
    keeps_values = False

    @pytest.fixture
    def config(self, key_prefix: str) -> CacheConfig:
        return CacheConfig(backend="dogpile.cache.null", key_prefix=key_prefix)

    def test_always_misses(self, manager: CacheManager, session: Session) -> None:
        rows = WidgetFactory.create_batch(3)
        manager.set_many(Widget, rows)
        ids = [row.id for row in rows]
        assert manager.get_many(Widget, ids) == [Lookup.MISS] * 3
        loader = Loader(session, Widget, ids[0])
        for _ in range(3):
            assert columns(manager.load(Widget, ids[0], loader)) == columns(rows[0])
        assert loader.calls == 3
        assert manager.stats()["Widget"].hits == 0
        assert manager.stats()["Widget"].errors == 0


# --- bad input, whatever the backend ----------------------------------------------------------


def test_unknown_backend_argument_fails_at_first_use_naming_the_argument(
    key_prefix: str,
) -> None:
    manager = CacheManager(CacheConfig(backend="dogpile.cache.nope", key_prefix=key_prefix))
    with pytest.raises(SettingsError, match=r"CacheConfig\.backend.*dogpile\.cache\.nope") as info:
        manager.get(Widget, 1)
    assert info.value.setting == "CacheConfig.backend"


def test_unknown_backend_variable_fails_at_first_use_naming_the_variable(
    key_prefix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DECLCACHE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("DECLCACHE_BACKEND", "dogpile.cache.nope")
    manager = CacheManager(CacheConfig.from_env(key_prefix=key_prefix))
    with pytest.raises(SettingsError, match=r"DECLCACHE_BACKEND.*dogpile\.cache\.nope") as info:
        manager.is_cached(Widget)
    assert info.value.setting == "DECLCACHE_BACKEND"


def _clear_after_a_registry_was_disposed(key_prefix: str) -> str | None:
    """``repr`` of what ``clear()`` raised with a disposed cached model around, or ``None``."""

    class Disposable(DeclarativeBase):
        pass

    class Gone(Disposable):
        __tablename__ = "gone"

        id: Mapped[int] = mapped_column(primary_key=True)

        class CacheMeta:
            ttl = 60

    configure_mappers()  # the registry reads Gone's CacheMeta
    Disposable.registry.dispose()
    manager = CacheManager(
        CacheConfig(
            backend="dogpile.cache.memory", arguments={"cache_dict": {}}, key_prefix=key_prefix
        )
    )
    try:
        manager.clear()
    except Exception as error:
        return repr(error)
    return None


def test_clear_ignores_models_whose_registry_was_disposed(key_prefix: str) -> None:
    failure = _clear_after_a_registry_was_disposed(key_prefix)
    gc.collect()  # drop Gone, so that no later test sees it registered
    assert failure is None, f"clear() raised {failure}"


def test_backend_without_its_client_library_names_the_backend(key_prefix: str) -> None:
    pytest.importorskip("dogpile.cache.backends.memcached")
    if _importable("bmemcached"):
        pytest.skip("python-binary-memcached is installed here")
    manager = CacheManager(
        CacheConfig(
            backend="dogpile.cache.bmemcached",
            arguments={"url": ["127.0.0.1:1"]},
            key_prefix=key_prefix,
        )
    )
    with pytest.raises(SettingsError, match=r"CacheConfig\.backend.*needs a client library"):
        manager.get(Widget, 1)


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


_NO_DOGPILE_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys

    class HideDogpile:
        def find_spec(self, name, path=None, target=None):
            if name == "dogpile" or name.startswith("dogpile."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
            return None

    sys.meta_path.insert(0, HideDogpile())
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append([record.name, record.levelname, record.getMessage()])

    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(logging.DEBUG)

    from sqlalchemy import create_engine
    from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

    from declcache import CacheConfig, CacheManager, Lookup

    class Base(DeclarativeBase):
        pass

    class Widget(Base):
        __tablename__ = "widgets"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

        class CacheMeta:
            ttl = 300

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine, expire_on_commit=False) as session:
        session.add(Widget(id=1, name="from-the-database"))
        session.commit()
        calls = []

        def loader():
            calls.append(1)
            return session.get(Widget, 1, populate_existing=True)

        manager = CacheManager(CacheConfig(key_prefix=sys.argv[1]))
        first = manager.load(Widget, 1, loader)
        second = manager.load(Widget, 1, loader)
        result = {
            "enabled": manager.enabled,
            "is_cached": manager.is_cached(Widget),
            "names": [first.name, second.name],
            "loader_calls": len(calls),
            "get_misses": manager.get(Widget, 1) is Lookup.MISS,
            "set": manager.set(Widget, first),
            "invalidate": manager.invalidate(Widget, 1),
            "clear": manager.clear(),
            "stats": manager.stats(),
            "dogpile_imported": sorted(m for m in sys.modules if m.split(".")[0] == "dogpile"),
            "records": records,
        }
    print(json.dumps(result))
    """
)


def test_without_dogpile_the_manager_is_a_no_op_that_misses(
    key_prefix: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _NO_DOGPILE_SCRIPT, key_prefix],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["enabled"] is False
    assert result["is_cached"] is False
    assert result["names"] == ["from-the-database"] * 2
    assert result["loader_calls"] == 2
    assert result["get_misses"] is True
    assert result["set"] is False
    assert result["invalidate"] is True
    assert result["clear"] is True
    assert result["stats"] == {}
    assert result["dogpile_imported"] == []
    warnings_logged = [
        message
        for logger, level, message in result["records"]
        if logger.startswith("declcache") and level == "WARNING"
    ]
    assert any("dogpile.cache is not installed" in message for message in warnings_logged)
