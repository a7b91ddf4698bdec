"""``dogpile.cache.pymemcache`` (and its ``dogpile.cache.memcached`` alias): the shared suite on
one Memcached server and on several nodes (pymemcache's ``HashClient``).

The single server is the shared one (``DECLCACHE_TEST_MEMCACHED``); the two nodes are private,
started once for the module. A test that kills a node starts nodes of its own.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from declcache import CacheConfig, CacheManager, Lookup
from tests import _servers
from tests.integration._invalidation_models import Item, Reader, writing
from tests.integration.backends._suite import (
    ITEMS,
    BackendSuite,
    Flash,
    FlashFactory,
    Loader,
    Raw,
    SeveralServersChecks,
    StoredBytesChecks,
    Widget,
    WidgetFactory,
    assert_mixed_ttls,
    entity_key,
    free_port,
    write_mixed_ttls,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session


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


def _memcached_meta(nodes: list[tuple[str, int]], key: str) -> dict[str, str]:
    """Flags and remaining ttl of ``key``, from meta-get (``mg key t f``) on the node holding it."""
    found = []
    for address in nodes:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(f"mg {key} t f\r\n".encode())
            reply = sock.recv(256).decode()
        status, *tokens = reply.split()
        assert status in {"HD", "EN"}, f"meta-get of {key!r} answered {reply!r}"
        if status == "HD":
            found.append({token[0]: token[1:] for token in tokens})
    assert len(found) == 1, f"{key!r} is on {len(found)} of the nodes"
    return found[0]


def _items_on(node: tuple[str, int], keys: list[str]) -> int:
    """How many of ``keys`` one node holds."""
    from pymemcache.client.base import Client

    client = Client(node, connect_timeout=2, timeout=2)
    try:
        return len(client.get_many(keys))
    finally:
        client.close()


def memcached_url(nodes: list[tuple[str, int]]) -> str:
    return "memcached://" + ",".join(f"{host}:{port}" for host, port in nodes)


@pytest.fixture(scope="module")
def memcached_pair() -> Iterator[list[tuple[str, int]]]:
    """Two private Memcached nodes for the module's tests (none of which stops them)."""
    nodes = [_servers.start_memcached_server() for _ in range(2)]
    yield [node.address for node in nodes]
    for node in nodes:
        node.stop()


@pytest.fixture
def two_memcached() -> Iterator[list[_servers.MemcachedProcess]]:
    """Two private Memcached nodes of this test alone: it may stop and restart them."""
    nodes = [_servers.start_memcached_server() for _ in range(2)]
    yield nodes
    for node in nodes:
        node.stop()


class MemcachedChecks(StoredBytesChecks):
    """Memcached only: server-side expiry and flags (no pickle flag). Subclasses provide the
    ``nodes`` fixture."""

    backend_name = "dogpile.cache.pymemcache"
    backend_class = "PyMemcacheBackend"
    #: The name the user writes; ``backend_name`` is what it resolves to.
    configured_name: ClassVar[str] = "dogpile.cache.pymemcache"

    @pytest.fixture
    def nodes(self, memcached_address: tuple[str, int]) -> list[tuple[str, int]]:
        return [memcached_address]

    @pytest.fixture
    def config(self, nodes: list[tuple[str, int]], key_prefix: str) -> CacheConfig:
        """Keys stay behind: they expire on the server (and differ in every test)."""
        return CacheConfig(
            backend=self.configured_name,
            arguments={"url": [f"{host}:{port}" for host, port in nodes]},
            key_prefix=key_prefix,
        )

    @pytest.fixture
    def raw(self, nodes: list[tuple[str, int]]) -> Iterator[MemcachedRaw]:
        from pymemcache.client.base import Client
        from pymemcache.client.hash import HashClient

        if len(nodes) == 1:
            client: Any = Client(nodes[0], connect_timeout=5, timeout=5)
        else:  # hashes keys to nodes as the backend's own HashClient does
            client = HashClient(nodes, connect_timeout=5, timeout=5)
        yield MemcachedRaw(client)
        client.close()

    def test_server_side_expiry_and_plain_flags(
        self, manager: CacheManager, nodes: list[tuple[str, int]], session: Session
    ) -> None:
        widget, flash = WidgetFactory(), FlashFactory()
        assert manager.set(Widget, widget)
        assert manager.set(Flash, flash)
        for key, ttl in (
            (entity_key(manager, Widget, widget.id), 300),
            (entity_key(manager, Flash, flash.id), 1),
        ):
            meta = _memcached_meta(nodes, key)
            assert 0 < int(meta["t"]) <= ttl + 60
            assert meta["f"] == "0"  # pymemcache's pickle flag is 1: nothing is pickled

    def test_write_many_gives_each_entry_its_own_server_ttl(
        self, manager: CacheManager, nodes: list[tuple[str, int]]
    ) -> None:
        keys = write_mixed_ttls(manager)
        assert_mixed_ttls([int(_memcached_meta(nodes, key)["t"]) for key in keys])


class TestPymemcache(MemcachedChecks, BackendSuite):
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

    configured_name = "dogpile.cache.memcached"

    def test_alias_resolves_to_pymemcache(self, config: CacheConfig) -> None:
        assert config.backend == "dogpile.cache.pymemcache"
        assert CacheConfig(backend="dogpile.cache.memcached").backend == config.backend


class TestMemcachedNodes(MemcachedChecks, SeveralServersChecks, BackendSuite):
    """Two nodes: keys hashed over both by pymemcache's ``HashClient``."""

    @pytest.fixture
    def nodes(self, memcached_pair: list[tuple[str, int]]) -> list[tuple[str, int]]:
        return memcached_pair

    def assert_keys_on_every_server(self, config: CacheConfig, keys: list[str]) -> None:
        urls = config.arguments["url"]
        nodes = [(host, int(port)) for host, port in (url.split(":") for url in urls)]
        assert len(nodes) == 2
        for node in nodes:
            assert _items_on(node, keys) > 0, f"no entity key on {node}"

    def test_the_manager_hashes_keys_over_both_nodes(self, manager: CacheManager) -> None:
        cache = manager._cache(Widget)
        assert cache is not None
        assert type(cache.region.backend.client).__name__ == "HashClient"


def test_several_memcached_nodes_share_keys_and_survive_a_dead_node(
    engine: Engine, key_prefix: str, two_memcached: list[_servers.MemcachedProcess]
) -> None:
    url = memcached_url([node.address for node in two_memcached])
    config = CacheConfig(
        url=url + "?hashclient_dead_timeout=1&hashclient_retry_attempts=0",
        key_prefix=key_prefix,
        breaker_interval=0.2,
    )
    manager = CacheManager(config)
    cache = manager._cache(Item)
    assert cache is not None
    reader = Reader(engine, manager)
    expected = {i: {"id": i, "name": f"item-{i}"} for i in range(1, ITEMS + 1)}
    for ident in expected:
        reader.get(Item, ident)
    keys = [cache.keys.entity_key(("id",), (ident,)) for ident in expected]
    spread = [_items_on(node.address, keys) for node in two_memcached]
    assert sum(spread) == ITEMS
    assert min(spread) > 0, spread  # both nodes hold some of the keys
    assert reader.loads_during(lambda: [reader.get(Item, i) for i in expected]) == 0

    two_memcached[0].stop()  # a node dies: every read still answers, from the cache or not
    for _ in range(3):
        assert [reader.get(Item, i) for i in expected] == list(expected.values())
        time.sleep(0.25)
    # The dead node is out of the ring: the live one takes its keys, so reads hit again.
    assert reader.loads_during(lambda: [reader.get(Item, i) for i in expected]) == 0
    with writing(engine, manager) as session:  # invalidation while a node is out
        session.get(Item, 1).name = "new"
        session.commit()
    assert reader.get(Item, 1) == {"id": 1, "name": "new"}

    two_memcached[0].start()  # comes back (empty) and is retried after dead_timeout
    time.sleep(1.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _items_on(two_memcached[0].address, keys) == 0:
        for ident in expected:
            reader.get(Item, ident)
        time.sleep(0.2)
    assert _items_on(two_memcached[0].address, keys) > 0  # back in the ring
    assert reader.get(Item, 1) == {"id": 1, "name": "new"}
    assert [reader.get(Item, i) for i in range(2, ITEMS + 1)] == [
        expected[i] for i in range(2, ITEMS + 1)
    ]


@pytest.mark.parametrize(("count", "client"), [(1, "Client"), (2, "HashClient")])
def test_every_memcached_store_step_on_one_node_and_on_several(
    key_prefix: str, memcached_pair: list[tuple[str, int]], count: int, client: str
) -> None:
    """One node gets pymemcache's plain client (no key hashing), several its HashClient."""
    url = memcached_url(memcached_pair[:count])
    cache = CacheManager(CacheConfig(url=url, key_prefix=key_prefix))._cache(Item)
    assert cache is not None
    assert type(cache.region.backend.client).__name__ == client
    store = cache.store
    a, b, c = (cache.keys.entity_key(("id",), (ident,)) for ident in (1, 2, 3))
    store.write_many([(a, b"a", 100), (b, b"b", 10_000)])
    store.write_many([(c, b"c", 100)])
    assert store.get_many([a, b, c]) == [b"a", b"b", b"c"]
    assert store.add(a, b"x", 100) is False
    assert store.compare_and_set([(a, b"a", b"a2"), (b, b"stale", b"b2")], 100) == [True, False]
    store.delete_many([a, c])
    assert store.get_many([a, b, c]) == [None, b"b", None]
    assert store.add(a, b"a3", 100) is True
    assert store.compare_and_set([(c, None, b"c2")], 100) == [True]
    assert store.get_many([a, b, c]) == [b"a3", b"b", b"c2"]


def test_memcached_urls() -> None:
    from declcache.backends import parse_url

    assert parse_url("memcached://m1:11211,m2") == (
        "dogpile.cache.pymemcache",
        {"url": ["m1:11211", "m2:11211"]},
    )
