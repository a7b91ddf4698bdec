"""Checks of the Redis family: Redis, Valkey, Redis Cluster and Sentinel.

Mixins for the backend modules, beside :class:`~tests.integration.backends._suite.BackendSuite`:
:class:`ServerExpiryChecks` for every member, :class:`OnePoolChecks` where the regions of one
manager share one connection pool (a single server), :class:`SingleServerChecks` for what a
single server on redis-py or valkey-py must do (one round trip per commit, a server that goes
away). A single-server class names its client package in ``client``.
"""

from __future__ import annotations

import importlib
import re
import time
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy.orm import Session

from declcache import CacheConfig, CacheManager, Lookup, setup_cache_listeners
from tests import _servers
from tests.integration.backends._suite import (
    Flash,
    FlashFactory,
    Gadget,
    GadgetFactory,
    Loader,
    Note,
    Raw,
    StoredBytesChecks,
    Widget,
    WidgetFactory,
    assert_mixed_ttls,
    entity_key,
    region_of,
    write_mixed_ttls,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    import pytest


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    """Poll ``check`` until it holds; give up on the server (skip, or fail under CI) if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    _servers.unavailable(f"{what} did not come up within {timeout}s")


class RedisRaw(Raw):
    """Raw bytes through a redis-py or valkey-py client (a cluster client too)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def get(self, key: str) -> bytes | None:
        value = self.client.get(key)
        return None if value is None else bytes(value)

    def plant(self, key: str, value: bytes) -> None:
        self.client.set(key, value, ex=300)


class ServerExpiryChecks(StoredBytesChecks):
    """Every member of the family: the server expires every key, each with its own ttl.

    Subclasses provide ``raw`` as a :class:`RedisRaw`.
    """

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


class OnePoolChecks:
    """A single server: the regions of one manager share one connection pool."""

    assert_cached: Callable[[Any, Any], None]

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
        self.assert_cached(manager.get(Widget, widget.id), widget)
        self.assert_cached(manager.get(Gadget, gadget.id), gadget)


class SingleServerChecks:
    """A single server on ``client`` (``redis`` or ``valkey``): one round trip per commit, and
    a server that goes away costs one connection attempt, then the database answers."""

    #: The client package: ``redis`` (redis-py) or ``valkey`` (valkey-py).
    client: ClassVar[str]
    backend_name: ClassVar[str]
    assert_cached: Callable[[Any, Any], None]

    def start_private_server(self) -> _servers.RedisProcess:
        """A new server of this test's own, on a free port (it will be stopped)."""
        raise NotImplementedError

    def private_config(self, address: tuple[str, int], key_prefix: str) -> CacheConfig:
        host, port = address
        return CacheConfig(
            backend=self.backend_name,
            arguments={"host": host, "port": port, "db": 0},
            key_prefix=key_prefix,
        )

    def test_a_commit_invalidates_in_one_round_trip(
        self, manager: CacheManager, session: Session, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The tombstone (model ttl) and the list token (longer) go in one pipeline."""
        connection = importlib.import_module(f"{self.client}.connection")

        setup_cache_listeners()
        widget = WidgetFactory()
        assert manager.set(Widget, widget)
        sent: list[bytes] = []
        original = connection.AbstractConnection.send_packed_command

        def counting(self: Any, command: Any, check_health: bool = True) -> None:
            sent.append(b"".join(command) if isinstance(command, list) else command)
            original(self, command, check_health)

        with Session(session.get_bind(), info={"cache_manager": manager}) as writer:
            row = writer.get(Widget, widget.id)
            assert row is not None
            row.name = "renamed"
            monkeypatch.setattr(connection.AbstractConnection, "send_packed_command", counting)
            writer.commit()
            monkeypatch.undo()

        assert len(sent) == 1, sent  # one write to the server: one round trip
        assert sent[0].count(b"$3\r\nSET\r\n") == 2  # the tombstone and the list token
        assert manager.get(Widget, widget.id) is Lookup.MISS
        assert manager.stats()["Widget"].errors == 0

    def test_backend_down_falls_back_to_the_loader(self, key_prefix: str, session: Session) -> None:
        with self.start_private_server() as server:
            manager = CacheManager(self.private_config(server.address, key_prefix))
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

    def test_a_dead_server_costs_one_connection_attempt(
        self, key_prefix: str, session: Session, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """redis-py (and valkey-py) retry three times with backoff by default: seconds per call
        on a dead server. declcache turns retries off, so one lookup makes one attempt, then
        misses."""
        connection = importlib.import_module(f"{self.client}.connection")
        attempts: list[int] = []
        original = connection.Connection._connect

        def counting_connect(self: Any) -> object:
            attempts.append(1)
            return original(self)

        with self.start_private_server() as server:
            manager = CacheManager(self.private_config(server.address, key_prefix))
            row = WidgetFactory()
            assert manager.set(Widget, row)
            server.stop()
            monkeypatch.setattr(connection.Connection, "_connect", counting_connect)
            assert manager.get(Widget, row.id) is Lookup.MISS
        assert len(attempts) == 1
