"""``dogpile.cache.redis_cluster``: the shared suite on a private three-master Redis Cluster.

The cluster is started once for the module (``redis-server --cluster-enabled`` on free loopback
ports, joined with ``redis-cli --cluster create``) and stopped at its end; each test keeps to
its own key prefix.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
from typing import TYPE_CHECKING, Any

import pytest

from declcache import CacheConfig, CacheManager, SettingsError
from tests import _servers
from tests.integration._invalidation_models import Item
from tests.integration.backends._redis_family import RedisRaw, ServerExpiryChecks, wait_for
from tests.integration.backends._suite import BackendSuite, SeveralServersChecks

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


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

        wait_for(ready, "the Redis Cluster")
        yield [node.address for node in nodes]
    finally:
        for node in nodes:
            node.stop()


def cluster_url(nodes: list[tuple[str, int]]) -> str:
    return "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in nodes)


class TestRedisCluster(ServerExpiryChecks, SeveralServersChecks, BackendSuite):
    backend_name = "dogpile.cache.redis_cluster"
    backend_class = "RedisClusterBackend"

    @pytest.fixture
    def config(self, redis_cluster: list[tuple[str, int]], key_prefix: str) -> CacheConfig:
        """Keys stay behind: the cluster is this module's and goes with it."""
        return CacheConfig(url=cluster_url(redis_cluster), key_prefix=key_prefix)

    @pytest.fixture
    def raw(self, redis_cluster: list[tuple[str, int]]) -> Iterator[RedisRaw]:
        from redis.cluster import ClusterNode, RedisCluster

        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in redis_cluster],
            socket_timeout=5,
        )
        yield RedisRaw(client)
        client.close()

    def assert_keys_on_every_server(self, config: CacheConfig, keys: list[str]) -> None:
        """The model's keys are spread over every master."""
        import redis

        nodes = [tuple(node.split(":")) for node in config.arguments["startup_nodes"]]
        assert len(nodes) == 3
        prefix = config.key_prefix.replace("*", "\\*")
        for host, port in nodes:
            client = redis.Redis(host=host, port=int(port), socket_timeout=2)
            try:
                held = {key.decode() for key in client.scan_iter(match=prefix + "*", count=1000)}
            finally:
                client.close()
            assert held & set(keys), f"no entity key on {host}:{port}"

    def test_the_url_configures_dogpile_s_cluster_backend(self, config: CacheConfig) -> None:
        manager = CacheManager(config)
        cache = manager._cache(Item)
        assert cache is not None
        assert type(cache.region.backend).__name__ == "RedisClusterBackend"
        assert config.backend == "dogpile.cache.redis_cluster"


# --- URLs and arguments (pure) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "arguments"),
    [
        ("redis+cluster://a:7000,b:7001", {"startup_nodes": ["a:7000", "b:7001"]}),
        (
            "redis+cluster://user:p%40ss@a,b:7001?socket_timeout=0.2",
            {
                "startup_nodes": ["a:6379", "b:7001"],
                "username": "user",
                "password": "p@ss",
                "socket_timeout": 0.2,
            },
        ),
    ],
)
def test_cluster_urls(url: str, arguments: dict[str, Any]) -> None:
    from declcache.backends import parse_url

    assert parse_url(url) == ("dogpile.cache.redis_cluster", arguments)


@pytest.mark.parametrize(
    ("url", "problem"),
    [("redis+cluster://", "no server"), ("redis+cluster://a:port", "not a number")],
)
def test_bad_cluster_urls(url: str, problem: str) -> None:
    with pytest.raises(SettingsError, match=problem):
        CacheConfig(url=url)


def test_cluster_arguments_carry_the_short_timeouts() -> None:
    from redis.cluster import ClusterNode

    from declcache.backends import open_backend

    cluster = open_backend(
        "dogpile.cache.redis_cluster",
        {"startup_nodes": ["a:7000"], "password": "pw"},
        CacheConfig(),
    ).region_arguments(60, None)
    assert isinstance(cluster["startup_nodes"][0], ClusterNode)
    kwargs = cluster["connection_kwargs"]
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.5, 0.5)
    assert kwargs["password"] == "pw"
    assert kwargs["retry"].get_retries() == 0


# --- the same cluster through valkey-py -----------------------------------------------------------


class TestValkeyCluster(TestRedisCluster):
    """``dogpile.cache.valkey_cluster`` on the same private cluster (the protocol is one)."""

    backend_name = "dogpile.cache.valkey_cluster"
    backend_class = "ValkeyClusterBackend"

    @pytest.fixture
    def config(self, redis_cluster: list[tuple[str, int]], key_prefix: str) -> CacheConfig:
        url = cluster_url(redis_cluster).replace("redis+cluster://", "valkey+cluster://")
        return CacheConfig(url=url, key_prefix=key_prefix)

    def test_the_url_configures_dogpile_s_cluster_backend(self, config: CacheConfig) -> None:
        import valkey.cluster

        manager = CacheManager(config)
        cache = manager._cache(Item)
        assert cache is not None
        assert type(cache.region.backend).__name__ == "ValkeyClusterBackend"  # declcache's subclass
        assert isinstance(cache.region.backend.writer_client, valkey.cluster.ValkeyCluster)
        assert config.backend == "dogpile.cache.valkey_cluster"
