"""The backend-agnostic suite every backend's test module subclasses (dogpile's test style).

:class:`BackendSuite` holds what every backend must do; a backend's module (``test_*.py``
beside this one) subclasses it once per configuration and supplies a
:class:`~declcache.CacheConfig` through its ``config`` fixture. Mixins add what only some
backends have: :class:`StoredBytesChecks` where the backend keeps bytes a test can reach
(a ``raw`` fixture reads and plants them past declcache), :class:`SeveralServersChecks` where
the keys of one model live on several servers (Redis Cluster, Sentinel, several Memcached
nodes). Each module adds the checks of its own backend (server-side expiry, one connection
pool, a server that goes away).

Rows come from factory-boy factories on a SQLite database (the ``session`` fixture of
``conftest.py``); every config uses the test's own ``key_prefix``, so tests never see each
other's keys on the shared servers.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import socket
import time
from typing import TYPE_CHECKING, Any, ClassVar

import factory
import pytest
from factory.alchemy import SQLAlchemyModelFactory
from sqlalchemy import inspect
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    scoped_session,
    sessionmaker,
)

from declcache import CacheConfig, CacheManager, Lookup, _payload, setup_cache_listeners
from declcache.config import SQLAlchemySyncConfig
from declcache.repository import SQLAlchemySyncRepository
from tests import _servers
from tests.integration._invalidation_models import WAIT, Reader, race, writing
from tests.integration._invalidation_models import Item as ScaledItem

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from sqlalchemy.engine import Engine

    from declcache import ModelStats
    from tests.integration.conftest import StatementLog

#: Rows of the invalidation models' ``Item`` the scenarios across several servers read.
ITEMS = 30


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


# --- helpers ------------------------------------------------------------------------------------


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


class Raw:
    """The bytes under a key, read and written with the backend's own client."""

    def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def plant(self, key: str, value: bytes) -> None:
        """Store ``value`` as a hostile writer sharing the backend would."""
        raise NotImplementedError


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


#: What a key may hold when a reader looks it up and misses, other than nothing.
HELD_VALUES = ("tombstone", "expired", "old-generation")


def hold(held: str, manager: CacheManager, other: CacheManager, widget: Widget) -> bytes | None:
    """Leave under ``widget``'s key a value ``manager``'s look-up reads as a miss; return it.

    ``tombstone``: ``other`` invalidated the widget. ``expired``: the widget is cached, written
    longer ago than the model's ttl (still on the server, whose expiry is ttl + 60 s).
    ``old-generation``: the widget is cached, then ``other`` invalidated the whole model.
    """
    cache = manager._cache(Widget)
    assert cache is not None
    key = entity_key(manager, Widget, widget.id)
    if held == "tombstone":
        assert other.invalidate(Widget, widget.id)
    elif held == "expired":
        assert manager.set(Widget, widget) is True
        fresh = cache.store.get_many([key])[0]
        if fresh is not None:  # the null backend keeps nothing
            created_at, stamp, payload = _payload.unwrap_stamped(fresh)
            stale = b'{"ct":%r,"v":%d,"fp":"%b"}|%b' % (
                created_at - 2 * cache.ttl,
                _payload.value_version,
                stamp or b"",
                payload,
            )
            cache.store.write_many([(key, stale, cache.server_ttl)])
    elif held == "old-generation":
        assert manager.set(Widget, widget) is True
        assert other.invalidate_model(Widget)
    else:  # pragma: no cover - HELD_VALUES and this function go together
        raise AssertionError(held)
    return cache.store.get_many([key])[0]


def rename(engine: Engine, manager: CacheManager, ident: int, name: str) -> None:
    """Commit a new name for widget ``ident``; the commit invalidates through ``manager``."""
    with Session(engine, info={"cache_manager": manager}) as session:
        found = session.get(Widget, ident)
        assert found is not None
        found.name = name
        session.commit()


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

    # -- compare-and-set over a value, and the race that needs it ------------------------------
    #
    # A fill is a compare-and-set against what the look-up saw. Seeing nothing is the easy case
    # (set if absent); these tests start from a key that holds a value, where the backend must
    # compare the value itself (Memcached's gets/cas alone only says nobody wrote since the gets).

    def _swap_keys(self, manager: CacheManager) -> tuple[str, str, str]:
        held, other, absent = (entity_key(manager, Widget, 900_100 + n) for n in range(3))
        return held, other, absent

    def test_compare_and_set_refuses_a_key_that_holds_another_value(
        self, manager: CacheManager
    ) -> None:
        cache = manager._cache(Widget)
        assert cache is not None
        store = cache.store
        held, other, absent = self._swap_keys(manager)
        store.write_many([(held, b"A", LONG_TTL), (other, b"B", LONG_TTL)])

        refused = store.compare_and_set([(held, b"B", b"new")], LONG_TTL)
        if not self.keeps_values:  # the null store claims every write and keeps none
            assert refused == [True]
            assert store.get_many([held, other, absent]) == [None] * 3
            return
        assert refused == [False]
        assert store.get_many([held]) == [b"A"]  # untouched

        swaps = [
            (held, b"B", b"x"),  # holds A, not B
            (held, None, b"y"),  # holds A, not nothing
            (other, b"B", b"B2"),  # holds B: swapped
            (absent, b"A", b"z"),  # holds nothing, not A
        ]
        assert store.compare_and_set(swaps, LONG_TTL) == [False, False, True, False]
        assert store.get_many([held, other, absent]) == [b"A", b"B2", None]
        swaps = [(held, b"A", b"A2"), (absent, None, b"C")]
        assert store.compare_and_set(swaps, LONG_TTL) == [True, True]
        assert store.get_many([held, other, absent]) == [b"A2", b"B2", b"C"]

    async def test_awaited_compare_and_set_refuses_a_key_that_holds_another_value(
        self, manager: CacheManager
    ) -> None:
        cache = manager._cache(Widget)
        assert cache is not None
        store = cache.astore
        held, other, absent = self._swap_keys(manager)
        try:
            await store.write_many([(held, b"A", LONG_TTL), (other, b"B", LONG_TTL)])
            refused = await store.compare_and_set([(held, b"B", b"new")], LONG_TTL)
            if not self.keeps_values:
                assert refused == [True]
                assert await store.get_many([held, other, absent]) == [None] * 3
                return
            assert refused == [False]
            assert await store.get_many([held]) == [b"A"]
            swaps = [
                (held, b"B", b"x"),
                (held, None, b"y"),
                (other, b"B", b"B2"),
                (absent, b"A", b"z"),
            ]
            assert await store.compare_and_set(swaps, LONG_TTL) == [False, False, True, False]
            assert await store.get_many([held, other, absent]) == [b"A", b"B2", None]
            swaps = [(held, b"A", b"A2"), (absent, None, b"C")]
            assert await store.compare_and_set(swaps, LONG_TTL) == [True, True]
            assert await store.get_many([held, other, absent]) == [b"A2", b"B2", b"C"]
        finally:
            await manager.aclose()

    @pytest.mark.parametrize("held", HELD_VALUES)
    def test_a_fill_over_the_value_the_look_up_saw_is_stored(
        self, config: CacheConfig, session: Session, held: str
    ) -> None:
        """The control of the race below: with no invalidation meanwhile, the fill lands."""
        manager, other = CacheManager(config), CacheManager(config)
        widget = WidgetFactory()
        before = hold(held, manager, other, widget)
        assert (before is not None) is self.keeps_values
        assert manager.get(Widget, widget.id) is Lookup.MISS

        loader = Loader(session, Widget, widget.id)
        assert columns(manager.load(Widget, widget.id, loader)) == columns(widget)
        assert loader.calls == 1
        self.assert_cached(manager.get(Widget, widget.id), widget)
        self.assert_cached(CacheManager(config).get(Widget, widget.id), widget)
        stats = manager.stats()["Widget"]
        assert stats.fills_refused == 0
        assert stats.errors == 0

    @pytest.mark.parametrize("held", HELD_VALUES)
    def test_a_fill_over_a_value_loses_to_an_invalidation_during_the_query(
        self, config: CacheConfig, session: Session, held: str
    ) -> None:
        """A reader misses on a key that holds a value, then SELECTs; a writer commits before
        the reader fills. The fill must be refused: the commit's tombstone stays."""
        setup_cache_listeners()
        engine = session.get_bind()
        reader, writer = CacheManager(config), CacheManager(config)
        widget = WidgetFactory(name="old")
        key = entity_key(reader, Widget, widget.id)
        cache = reader._cache(Widget)
        assert cache is not None
        before = hold(held, reader, writer, widget)
        assert (before is not None) is self.keeps_values
        assert reader.get(Widget, widget.id) is Lookup.MISS
        counted = reader.stats()["Widget"]

        own = race(
            engine,
            reader,
            Widget,
            widget.id,
            query=lambda s: s.get(Widget, widget.id),
            commit=lambda: rename(engine, writer, widget.id, "new"),
        )

        self.assert_refused(reader, counted, cache=cache, key=key, before=before, own=own)
        self.assert_new_row_is_read_and_cached(config, reader, session, widget.id)

    @pytest.mark.parametrize("held", HELD_VALUES)
    async def test_an_awaited_fill_over_a_value_loses_to_an_invalidation_during_the_query(
        self, config: CacheConfig, session: Session, held: str
    ) -> None:
        """The same race on the async path: the look-up and the fill on the async store."""
        setup_cache_listeners()
        engine = session.get_bind()
        reader, writer = CacheManager(config), CacheManager(config)
        widget = WidgetFactory(name="old")
        key = entity_key(reader, Widget, widget.id)
        cache = reader._cache(Widget)
        assert cache is not None
        before = hold(held, reader, writer, widget)
        assert (before is not None) is self.keeps_values
        counted = reader.stats()["Widget"]
        selected, resume = asyncio.Event(), asyncio.Event()

        async def read() -> dict[str, Any] | None:
            with Session(engine, info={"cache_manager": reader}) as own_session:

                async def loader() -> Any:
                    found = own_session.get(Widget, widget.id)
                    selected.set()
                    await resume.wait()
                    return found

                found = await reader.aload(Widget, widget.id, loader)
                return None if found is None else columns(found)

        try:
            reading = asyncio.create_task(read())
            await asyncio.wait_for(selected.wait(), WAIT)
            rename(engine, writer, widget.id, "new")
            resume.set()
            own = await asyncio.wait_for(reading, WAIT)
        finally:
            await reader.aclose()

        self.assert_refused(reader, counted, cache=cache, key=key, before=before, own=own)
        self.assert_new_row_is_read_and_cached(config, reader, session, widget.id)

    def assert_refused(
        self,
        reader: CacheManager,
        counted: ModelStats,
        *,
        cache: Any,
        key: str,
        before: bytes | None,
        own: dict[str, Any] | None,
    ) -> None:
        """The reader got its old row, and its fill (counted after ``counted``) left the
        commit's tombstone in place."""
        assert own is not None
        assert own["name"] == "old"  # selected before the commit: its own result may be old
        after = cache.store.get_many([key])[0]
        stats = reader.stats()["Widget"]
        assert stats.errors == 0
        if self.keeps_values:
            assert after is not None
            assert after != before
            assert cache.payloads.parse(after) is None  # still the commit's tombstone
            assert stats.fills_refused == counted.fills_refused + 1
            assert stats.fills == counted.fills

    def assert_new_row_is_read_and_cached(
        self, config: CacheConfig, reader: CacheManager, session: Session, ident: int
    ) -> None:
        """Every read after the commit sees the new row: first from the database, then cached."""
        for manager in (reader, CacheManager(config)):
            assert manager.get(Widget, ident) is Lookup.MISS  # the row stays invalidated
        loader = Loader(session, Widget, ident)
        assert reader.load(Widget, ident, loader).name == "new"
        assert loader.calls == 1
        assert reader.load(Widget, ident, loader).name == "new"
        assert loader.calls == (1 if self.keeps_values else 2)
        found = CacheManager(config).get(Widget, ident)
        if self.keeps_values:
            assert found is not Lookup.MISS
            assert found.name == "new"


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
            # an entity's metadata also names its schema fingerprint; a token's does not
            assert set(metadata) in ({"ct", "v"}, {"ct", "v", "fp"})
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


# --- several servers ------------------------------------------------------------------------------


class ItemRepository(SQLAlchemySyncRepository[ScaledItem]):
    model_type = ScaledItem


class SeveralServersChecks:
    """Where one model's keys live on several servers (Cluster masters, Memcached nodes), or
    the server is found through others (Sentinel): reads, invalidation across processes, the
    stale-fill race and the stock repository, on the invalidation models' items (``engine``).
    """

    def assert_keys_on_every_server(self, config: CacheConfig, keys: list[str]) -> None:
        """Every server holds some of ``keys`` (30 entity keys); a no-op for one server."""

    def test_get_load_invalidate_and_stale_fill_across_servers(
        self, engine: Engine, config: CacheConfig
    ) -> None:
        manager = CacheManager(config)
        other = CacheManager(config)  # another process sharing the servers
        reader = Reader(engine, manager)
        idents = list(range(1, ITEMS + 1))  # enough keys to land on every master and node
        with Session(engine, info={"cache_manager": manager}) as session:
            loaded = manager.load_many(
                ScaledItem, idents, lambda missing: [session.get(ScaledItem, i) for i in missing]
            )
        assert [item.id for item in loaded] == idents
        assert all(hit is not None for hit in manager.get_many(ScaledItem, idents))
        assert reader.loads_during(lambda: [reader.get(ScaledItem, i) for i in idents]) == 0
        assert reader.list_all(ScaledItem)[0] == {"id": 1, "name": "item-1"}
        assert reader.loads_during(lambda: reader.list_all(ScaledItem)) == 0

        with writing(engine, other) as session:  # invalidation across processes and servers
            session.get(ScaledItem, 5).name = "five"
            session.commit()
        assert reader.get(ScaledItem, 5) == {"id": 5, "name": "five"}
        assert reader.list_all(ScaledItem)[4] == {"id": 5, "name": "five"}
        assert manager.invalidate(ScaledItem, 6)
        assert reader.loads_during(lambda: reader.get(ScaledItem, 6)) == 1
        assert manager.invalidate_model(ScaledItem)
        assert reader.loads_during(lambda: reader.get(ScaledItem, 7)) == 1

        def commit() -> None:
            with writing(engine, other) as session:
                session.get(ScaledItem, 1).name = "new"
                session.commit()

        manager.invalidate(ScaledItem, 1)
        own = race(
            engine, manager, ScaledItem, 1, query=lambda s: s.get(ScaledItem, 1), commit=commit
        )
        assert own == {"id": 1, "name": "item-1"}  # selected before the commit
        assert manager.stats()["Item"].fills_refused >= 1
        assert Reader(engine, other).get(ScaledItem, 1) == {"id": 1, "name": "new"}
        assert reader.get(ScaledItem, 1) == {"id": 1, "name": "new"}
        assert manager.stats()["Item"].errors == 0
        cache = manager._cache(ScaledItem)
        assert cache is not None
        keys = [cache.keys.entity_key(("id",), (ident,)) for ident in idents]
        self.assert_keys_on_every_server(config, keys)

    def test_the_stock_repository_across_servers(
        self,
        engine: Engine,
        config: CacheConfig,
        statements: Callable[[Engine], StatementLog],
    ) -> None:
        db = SQLAlchemySyncConfig(connection_string=str(engine.url), cache_config=config)
        sent = statements(db.engine)
        idents = list(range(1, 13))  # spread over every cluster slot range and every node

        def read_all() -> tuple[list[str], list[str]]:
            with db.get_session() as session:
                repo = ItemRepository(session=session)
                many = [item.name for item in repo.get_many(idents)]
                listed = [item.name for item in repo.list(order_by=ScaledItem.id)]
            return many, listed

        first = read_all()
        before = len(sent.of_kind("SELECT"))
        assert read_all() == first  # every read answered by the cache, in fresh sessions
        assert len(sent.of_kind("SELECT")) == before
        with db.get_session() as session:
            repo = ItemRepository(session=session)
            item = repo.get(5)
            item.name = "five"
            repo.update(item, auto_commit=True)
        many, listed = read_all()
        assert many[4] == "five"
        assert listed[4] == "five"
        db.dispose()
