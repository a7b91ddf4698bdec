"""Scale-out (issue 6): bounded memory, bounded values, byte counts, several servers.

Every server here is private to the test (``tests/_servers.py``), started on a free loopback
port and stopped at the end; the shared servers are never touched.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session

from declcache import CacheConfig, CacheManager, setup_cache_listeners
from declcache.backends.memory import BoundedDict
from declcache.config import SQLAlchemySyncConfig
from declcache.repository import SQLAlchemySyncRepository
from tests import _servers
from tests.integration._invalidation_models import Base, Item, Reader, reset_rows, writing

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine

ITEMS = 30


@pytest.fixture
def engine(tmp_path: Any) -> Iterator[Engine]:
    setup_cache_listeners()
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    reset_rows(engine)
    with Session(engine) as session:
        session.add_all(Item(id=i, name=f"item-{i}") for i in range(4, ITEMS + 1))
        session.commit()
    yield engine
    engine.dispose()


# --- bounded memory ---------------------------------------------------------------------------


def test_the_memory_backend_keeps_at_most_memory_max_entries(
    engine: Engine, key_prefix: str
) -> None:
    manager = CacheManager(CacheConfig(key_prefix=key_prefix, memory_max_entries=10))
    reader = Reader(engine, manager)
    for ident in range(1, ITEMS + 1):
        assert reader.get(Item, ident) == {"id": ident, "name": f"item-{ident}"}
    memory = manager._backend.data
    assert isinstance(memory, BoundedDict)
    assert len(memory) == 10
    assert memory.evictions >= ITEMS - 10
    # The most recent entries are still cached, the oldest were dropped and load again.
    assert reader.loads_during(lambda: reader.get(Item, ITEMS)) == 0
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 1
    # An eviction never resurrects an old row: an invalidated, evicted entry reloads fresh.
    with writing(engine, manager) as session:
        session.get(Item, ITEMS).name = "new"
        session.commit()
    for ident in range(1, 12):
        reader.get(Item, ident)
    assert reader.get(Item, ITEMS) == {"id": ITEMS, "name": "new"}
    assert len(memory) == 10


def test_the_default_memory_bound_applies_without_configuration() -> None:
    manager = CacheManager()
    assert isinstance(manager._backend.data, BoundedDict)
    assert manager._backend.data.max_entries == 10_000


def test_an_explicit_cache_dict_is_used_as_given(engine: Engine, key_prefix: str) -> None:
    mine: dict[str, Any] = {}
    config = CacheConfig(key_prefix=key_prefix, arguments={"cache_dict": mine})
    Reader(engine, CacheManager(config)).get(Item, 1)
    assert any(key.startswith(key_prefix) for key in mine)


# --- bounded values ---------------------------------------------------------------------------


def test_a_value_larger_than_max_value_bytes_is_not_cached(engine: Engine, key_prefix: str) -> None:
    manager = CacheManager(CacheConfig(key_prefix=key_prefix, max_value_bytes=300))
    reader = Reader(engine, manager)
    with writing(engine, manager) as session:
        session.get(Item, 2).name = "x" * 1000
        session.commit()

    reader.get(Item, 1)
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 0  # small: cached
    assert manager.stats()["Item"].bytes > 0
    filled = manager.stats()["Item"].fills
    for _ in range(2):  # large: never cached, every read goes to the database
        assert reader.loads_during(lambda: reader.get(Item, 2)) == 1
    assert reader.seen[-1] == {"id": 2, "name": "x" * 1000}
    stats = manager.stats()["Item"]
    assert stats.oversized == 2
    assert stats.fills == filled
    # A list result larger than the bound is not cached either.
    for _ in range(2):
        assert reader.loads_during(lambda: reader.list_all(Item)) == 1
    assert manager.stats()["Item"].oversized == 4
    # set() refuses it too.
    with Session(engine) as session:
        assert manager.set(Item, session.get(Item, 2)) is False
        assert manager.set(Item, session.get(Item, 3)) is True


def test_bytes_counts_what_fills_wrote(engine: Engine, key_prefix: str) -> None:
    manager = CacheManager(CacheConfig(key_prefix=key_prefix))
    reader = Reader(engine, manager)
    reader.get(Item, 1)
    one = manager.stats()["Item"].bytes
    assert one > 0
    reader.get(Item, 2)
    reader.list_all(Item)
    assert manager.stats()["Item"].bytes > 2 * one


def test_max_value_bytes_and_memory_max_entries_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DECLCACHE_MEMORY_MAX_ENTRIES", "123")
    monkeypatch.setenv("DECLCACHE_MAX_VALUE_BYTES", "4096")
    monkeypatch.setenv("DECLCACHE_BREAKER_INTERVAL", "2.5")
    config = CacheConfig.from_env()
    assert (config.memory_max_entries, config.max_value_bytes) == (123, 4096)
    assert config.breaker_interval == 2.5
    assert config.sources["memory_max_entries"] == "DECLCACHE_MEMORY_MAX_ENTRIES"
    assert CacheManager(config)._backend.data.max_entries == 123


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DECLCACHE_MEMORY_MAX_ENTRIES", "0"),
        ("DECLCACHE_MAX_VALUE_BYTES", "-1"),
        ("DECLCACHE_BREAKER_INTERVAL", "-1"),
    ],
)
def test_invalid_limits_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    from declcache import SettingsError

    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        CacheConfig.from_env()
    field = variable.removeprefix("DECLCACHE_").lower()
    with pytest.raises(SettingsError, match=f"CacheConfig.{field}"):
        CacheConfig(**{field: int(value)})


# --- Redis Cluster and Sentinel ---------------------------------------------------------------


def _cluster_port() -> int:
    """A free port below 55536 whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = random.randrange(20_000, 45_000)
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a cluster node")


class ClusterNodeProcess(_servers.RedisProcess):
    """A private ``redis-server`` in cluster mode."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(port=_cluster_port())
        self.workdir = workdir

    def _command(self, binary: str) -> list[str]:
        return [
            *super()._command(binary),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.workdir / f"nodes-{self.port}.conf"),
            "--cluster-node-timeout",
            "5000",
        ]


class SentinelProcess(_servers.RedisProcess):
    """A private ``redis-server --sentinel`` watching one master as ``mymaster``."""

    def __init__(self, workdir: Path, master: _servers.RedisProcess) -> None:
        super().__init__()
        self.config = workdir / f"sentinel-{self.port}.conf"
        self.config.write_text(
            f"port {self.port}\nbind {self.host}\ndir {workdir}\n"
            f"sentinel monitor mymaster {master.host} {master.port} 1\n"
            "sentinel down-after-milliseconds mymaster 5000\n"
        )

    def _command(self, binary: str) -> list[str]:
        return [binary, str(self.config), "--sentinel"]


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    _servers.unavailable(f"{what} did not come up within {timeout}s")


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, int]]]:
    """Three masters on free loopback ports, created with ``redis-cli --cluster create``."""
    cli = shutil.which("redis-cli")
    if cli is None:
        _servers.unavailable("redis-cli is not installed: cannot create a Redis Cluster")
    workdir = tmp_path_factory.mktemp("cluster")
    nodes = [ClusterNodeProcess(workdir) for _ in range(3)]
    try:
        for node in nodes:
            node.start()
        addresses = [f"{node.host}:{node.port}" for node in nodes]
        created = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            _servers.unavailable(f"redis-cli --cluster create failed: {created.stdout!r}")

        def ready() -> bool:
            import redis

            for node in nodes:
                client = redis.Redis(host=node.host, port=node.port, socket_timeout=2)
                try:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
                finally:
                    client.close()
            return True

        _wait_for(ready, "the Redis Cluster")
        yield [node.address for node in nodes]
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """One master and one Sentinel watching it as ``mymaster``; the Sentinel's address."""
    workdir = tmp_path_factory.mktemp("sentinel")
    master = _servers.RedisProcess()
    sentinel: SentinelProcess | None = None
    try:
        master.start()
        sentinel = SentinelProcess(workdir, master)
        sentinel.start()

        def ready() -> bool:
            import redis

            assert sentinel is not None
            client = redis.Redis(host=sentinel.host, port=sentinel.port, socket_timeout=2)
            try:
                found = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
            finally:
                client.close()
            return bool(found) and int(found[1]) == master.port

        _wait_for(ready, "the Redis Sentinel")
        yield sentinel.address
    finally:
        if sentinel is not None:
            sentinel.stop()
        master.stop()


def cluster_url(nodes: list[tuple[str, int]]) -> str:
    return "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in nodes)


@pytest.fixture(params=["cluster", "sentinel"])
def distributed_config(request: pytest.FixtureRequest, key_prefix: str) -> CacheConfig:
    if request.param == "cluster":
        url = cluster_url(request.getfixturevalue("redis_cluster"))
    else:
        host, port = request.getfixturevalue("redis_sentinel")
        url = f"redis+sentinel://{host}:{port}/mymaster"
    return CacheConfig(url=url, key_prefix=key_prefix)


def test_the_urls_configure_dogpile_cluster_and_sentinel_backends(
    distributed_config: CacheConfig,
) -> None:
    manager = CacheManager(distributed_config)
    cache = manager._cache(Item)
    assert cache is not None
    backend = type(cache.region.backend).__name__
    assert backend in {"RedisClusterBackend", "RedisSentinelBackend"}
    assert distributed_config.backend in {
        "dogpile.cache.redis_cluster",
        "dogpile.cache.redis_sentinel",
    }


def test_get_load_invalidate_and_stale_fill_on_distributed_redis(
    engine: Engine, distributed_config: CacheConfig, request: pytest.FixtureRequest
) -> None:
    from tests.integration.test_stale_fill import race

    manager = CacheManager(distributed_config)
    other = CacheManager(distributed_config)  # another process sharing the servers
    reader = Reader(engine, manager)
    idents = list(range(1, 13))  # their keys spread over every slot range of the cluster
    with Session(engine, info={"cache_manager": manager}) as session:
        loaded = manager.load_many(
            Item, idents, lambda missing: [session.get(Item, i) for i in missing]
        )
    assert [item.id for item in loaded] == idents
    assert all(hit is not None for hit in manager.get_many(Item, idents))
    assert reader.loads_during(lambda: [reader.get(Item, i) for i in idents]) == 0
    assert reader.list_all(Item)[0] == {"id": 1, "name": "item-1"}
    assert reader.loads_during(lambda: reader.list_all(Item)) == 0

    with writing(engine, other) as session:  # invalidation across processes and slots
        session.get(Item, 5).name = "five"
        session.commit()
    assert reader.get(Item, 5) == {"id": 5, "name": "five"}
    assert reader.list_all(Item)[4] == {"id": 5, "name": "five"}
    assert manager.invalidate(Item, 6)
    assert reader.loads_during(lambda: reader.get(Item, 6)) == 1
    assert manager.invalidate_model(Item)
    assert reader.loads_during(lambda: reader.get(Item, 7)) == 1

    def commit() -> None:
        with writing(engine, other) as session:
            session.get(Item, 1).name = "new"
            session.commit()

    manager.invalidate(Item, 1)
    own = race(engine, manager, Item, 1, query=lambda s: s.get(Item, 1), commit=commit)
    assert own == {"id": 1, "name": "item-1"}  # selected before the commit
    assert manager.stats()["Item"].fills_refused >= 1
    assert Reader(engine, other).get(Item, 1) == {"id": 1, "name": "new"}
    assert reader.get(Item, 1) == {"id": 1, "name": "new"}
    assert manager.stats()["Item"].errors == 0
    if distributed_config.backend == "dogpile.cache.redis_cluster":
        import redis

        prefix = distributed_config.key_prefix.replace("*", "\\*")
        for host, port in request.getfixturevalue("redis_cluster"):
            client = redis.Redis(host=host, port=port, socket_timeout=2)
            try:  # the model's keys are spread over every master
                assert list(client.scan_iter(match=prefix + "*", count=1000))
            finally:
                client.close()


# --- several Memcached nodes ------------------------------------------------------------------


@pytest.fixture
def two_memcached() -> Iterator[list[_servers.MemcachedProcess]]:
    nodes = [_servers.start_memcached_server() for _ in range(2)]
    yield nodes
    for node in nodes:
        node.stop()


def _items_on(node: _servers.MemcachedProcess, keys: list[str]) -> int:
    from pymemcache.client.base import Client

    client = Client(node.address, connect_timeout=2, timeout=2)
    try:
        return len(client.get_many(keys))
    finally:
        client.close()


def test_several_memcached_nodes_share_keys_and_survive_a_dead_node(
    engine: Engine, key_prefix: str, two_memcached: list[_servers.MemcachedProcess]
) -> None:
    url = "memcached://" + ",".join(f"{n.host}:{n.port}" for n in two_memcached)
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
    spread = [_items_on(node, keys) for node in two_memcached]
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
    while time.monotonic() < deadline and _items_on(two_memcached[0], keys) == 0:
        for ident in expected:
            reader.get(Item, ident)
        time.sleep(0.2)
    assert _items_on(two_memcached[0], keys) > 0  # back in the ring
    assert reader.get(Item, 1) == {"id": 1, "name": "new"}
    assert [reader.get(Item, i) for i in range(2, ITEMS + 1)] == [
        expected[i] for i in range(2, ITEMS + 1)
    ]


@pytest.mark.parametrize(("nodes", "client"), [(1, "Client"), (2, "HashClient")])
def test_every_memcached_store_step_on_one_node_and_on_several(
    key_prefix: str, two_memcached: list[_servers.MemcachedProcess], nodes: int, client: str
) -> None:
    """One node gets pymemcache's plain client (no key hashing), several its HashClient."""
    url = "memcached://" + ",".join(f"{n.host}:{n.port}" for n in two_memcached[:nodes])
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


# --- observability ----------------------------------------------------------------------------


def test_on_stats_is_told_of_every_increment(engine: Engine, key_prefix: str) -> None:
    seen: list[tuple[str, str, int]] = []
    manager = CacheManager(CacheConfig(key_prefix=key_prefix), on_stats=lambda *a: seen.append(a))
    reader = Reader(engine, manager)
    reader.get(Item, 1)
    reader.get(Item, 1)
    totals: dict[str, int] = {}
    for model, counter, amount in seen:
        assert model == "Item"
        totals[counter] = totals.get(counter, 0) + amount
    stats = manager.stats()["Item"].as_dict()
    assert totals == {name: value for name, value in stats.items() if value}
    assert totals["hits"] == 1
    assert totals["bytes"] > 0


def test_a_failing_on_stats_hook_never_fails_a_read(
    engine: Engine, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args: Any) -> None:
        raise RuntimeError("exporter down")

    manager = CacheManager(CacheConfig(key_prefix=key_prefix), on_stats=broken)
    reader = Reader(engine, manager)
    assert reader.get(Item, 1) == {"id": 1, "name": "item-1"}
    assert reader.get(Item, 1) == {"id": 1, "name": "item-1"}
    assert manager.stats()["Item"].hits == 1
    assert any("on_stats hook failed" in record.getMessage() for record in caplog.records)


# --- URLs (pure parsing) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "backend", "arguments"),
    [
        (
            "redis+cluster://a:7000,b:7001",
            "dogpile.cache.redis_cluster",
            {"startup_nodes": ["a:7000", "b:7001"]},
        ),
        (
            "redis+cluster://user:p%40ss@a,b:7001?socket_timeout=0.2",
            "dogpile.cache.redis_cluster",
            {
                "startup_nodes": ["a:6379", "b:7001"],
                "username": "user",
                "password": "p@ss",
                "socket_timeout": 0.2,
            },
        ),
        (
            "redis+sentinel://s1,s2:26380/mymaster/2",
            "dogpile.cache.redis_sentinel",
            {"sentinels": ["s1:26379", "s2:26380"], "service_name": "mymaster", "db": 2},
        ),
        (
            "redis+sentinel://:pw@s1:26379/cache",
            "dogpile.cache.redis_sentinel",
            {"sentinels": ["s1:26379"], "service_name": "cache", "password": "pw"},
        ),
        (
            "memcached://m1:11211,m2",
            "dogpile.cache.pymemcache",
            {"url": ["m1:11211", "m2:11211"]},
        ),
    ],
)
def test_distributed_urls(url: str, backend: str, arguments: dict[str, Any]) -> None:
    from declcache.backends import parse_url

    assert parse_url(url) == (backend, arguments)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://", "no server"),
        ("redis+sentinel://s1:26379", "no service name"),
        ("redis+sentinel://s1:26379/mymaster/x", "not a number"),
        ("redis+cluster://a:port", "not a number"),
    ],
)
def test_bad_distributed_urls(url: str, problem: str) -> None:
    from declcache import SettingsError

    with pytest.raises(SettingsError, match=problem):
        CacheConfig(url=url)


def test_cluster_and_sentinel_arguments_carry_the_short_timeouts() -> None:
    from redis.cluster import ClusterNode

    from declcache.backends import open_backend

    def backend_arguments(name: str, arguments: dict[str, Any], ttl: int) -> dict[str, Any]:
        return open_backend(name, arguments, CacheConfig()).region_arguments(ttl, None)

    cluster = backend_arguments(
        "dogpile.cache.redis_cluster", {"startup_nodes": ["a:7000"], "password": "pw"}, 60
    )
    assert isinstance(cluster["startup_nodes"][0], ClusterNode)
    kwargs = cluster["connection_kwargs"]
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.5, 0.5)
    assert kwargs["password"] == "pw"
    assert kwargs["retry"].get_retries() == 0
    sentinel = backend_arguments(
        "dogpile.cache.redis_sentinel", {"sentinels": ["s:26379"], "service_name": "m"}, 60
    )
    assert sentinel["sentinels"] == [("s", 26379)]
    assert sentinel["sentinel_kwargs"]["socket_timeout"] == 0.5
    assert sentinel["distributed_lock"] is False


# --- the stock repository on every scaled-out backend -----------------------------------------


class ItemRepository(SQLAlchemySyncRepository[Item]):
    model_type = Item


@pytest.fixture(params=["cluster", "sentinel", "two-memcached"])
def scaled_out_config(request: pytest.FixtureRequest, key_prefix: str) -> CacheConfig:
    if request.param == "two-memcached":
        nodes = request.getfixturevalue("two_memcached")
        url = "memcached://" + ",".join(f"{n.host}:{n.port}" for n in nodes)
    elif request.param == "cluster":
        url = cluster_url(request.getfixturevalue("redis_cluster"))
    else:
        host, port = request.getfixturevalue("redis_sentinel")
        url = f"redis+sentinel://{host}:{port}/mymaster"
    return CacheConfig(url=url, key_prefix=key_prefix)


def test_the_stock_repository_on_scaled_out_backends(
    engine: Engine, scaled_out_config: CacheConfig
) -> None:
    db = SQLAlchemySyncConfig(connection_string=str(engine.url), cache_config=scaled_out_config)
    selects: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    event.listen(db.engine, "before_cursor_execute", count)
    idents = list(range(1, 13))  # spread over every cluster slot range and both nodes

    def read_all() -> tuple[list[str], list[str]]:
        with db.get_session() as session:
            repo = ItemRepository(session=session)
            many = [item.name for item in repo.get_many(idents)]
            listed = [item.name for item in repo.list(order_by=Item.id)]
        return many, listed

    first = read_all()
    before = len(selects)
    assert read_all() == first  # every read answered by the cache, in fresh sessions
    assert len(selects) == before
    with db.get_session() as session:
        repo = ItemRepository(session=session)
        item = repo.get(5)
        item.name = "five"
        repo.update(item, auto_commit=True)
    many, listed = read_all()
    assert many[4] == "five"
    assert listed[4] == "five"
    db.dispose()
