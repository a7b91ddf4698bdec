"""``dogpile.cache.redis_sentinel``: the shared suite on the master a private Sentinel names.

One master and one Sentinel watching it as ``mymaster`` are started once for the module and
stopped at its end; each test's keys are deleted from the master when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from declcache import CacheConfig, CacheManager, SettingsError
from tests import _servers
from tests.integration._invalidation_models import Item
from tests.integration.backends._redis_family import RedisRaw, ServerExpiryChecks, wait_for
from tests.integration.backends._suite import BackendSuite, SeveralServersChecks
from tests.integration.conftest import delete_redis_keys

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


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


@dataclass(frozen=True)
class SentinelGroup:
    """Where the Sentinel listens, and the master it names."""

    sentinel: tuple[str, int]
    master: tuple[str, int]


@pytest.fixture(scope="module")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """One master and one Sentinel watching it as ``mymaster``."""
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

        wait_for(ready, "the Redis Sentinel")
        yield SentinelGroup(sentinel.address, master.address)
    finally:
        if sentinel is not None:
            sentinel.stop()
        master.stop()


class TestRedisSentinel(ServerExpiryChecks, SeveralServersChecks, BackendSuite):
    backend_name = "dogpile.cache.redis_sentinel"
    backend_class = "RedisSentinelBackend"

    @pytest.fixture
    def config(self, redis_sentinel: SentinelGroup, key_prefix: str) -> Iterator[CacheConfig]:
        host, port = redis_sentinel.sentinel
        yield CacheConfig(url=f"redis+sentinel://{host}:{port}/mymaster", key_prefix=key_prefix)
        delete_redis_keys(*redis_sentinel.master, key_prefix)

    @pytest.fixture
    def raw(self, redis_sentinel: SentinelGroup) -> Iterator[RedisRaw]:
        import redis

        client = redis.Redis(*redis_sentinel.master, socket_timeout=5)
        yield RedisRaw(client)
        client.close()

    def test_the_url_configures_dogpile_s_sentinel_backend(self, config: CacheConfig) -> None:
        manager = CacheManager(config)
        cache = manager._cache(Item)
        assert cache is not None
        assert type(cache.region.backend).__name__ == "RedisSentinelBackend"
        assert config.backend == "dogpile.cache.redis_sentinel"


# --- URLs and arguments (pure) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "arguments"),
    [
        (
            "redis+sentinel://s1,s2:26380/mymaster/2",
            {"sentinels": ["s1:26379", "s2:26380"], "service_name": "mymaster", "db": 2},
        ),
        (
            "redis+sentinel://:pw@s1:26379/cache",
            {"sentinels": ["s1:26379"], "service_name": "cache", "password": "pw"},
        ),
    ],
)
def test_sentinel_urls(url: str, arguments: dict[str, Any]) -> None:
    from declcache.backends import parse_url

    assert parse_url(url) == ("dogpile.cache.redis_sentinel", arguments)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://s1:26379", "no service name"),
        ("redis+sentinel://s1:26379/mymaster/x", "not a number"),
    ],
)
def test_bad_sentinel_urls(url: str, problem: str) -> None:
    with pytest.raises(SettingsError, match=problem):
        CacheConfig(url=url)


def test_sentinel_arguments_carry_the_short_timeouts() -> None:
    from declcache.backends import open_backend

    sentinel = open_backend(
        "dogpile.cache.redis_sentinel",
        {"sentinels": ["s:26379"], "service_name": "m"},
        CacheConfig(),
    ).region_arguments(60, None)
    assert sentinel["sentinels"] == [("s", 26379)]
    assert sentinel["sentinel_kwargs"]["socket_timeout"] == 0.5
    assert sentinel["distributed_lock"] is False


# --- the same group through valkey-py -------------------------------------------------------------


class TestValkeySentinel(TestRedisSentinel):
    """``dogpile.cache.valkey_sentinel`` on the same private group (the protocol is one)."""

    backend_name = "dogpile.cache.valkey_sentinel"
    backend_class = "ValkeySentinelBackend"

    @pytest.fixture
    def config(self, redis_sentinel: SentinelGroup, key_prefix: str) -> Iterator[CacheConfig]:
        host, port = redis_sentinel.sentinel
        yield CacheConfig(url=f"valkey+sentinel://{host}:{port}/mymaster", key_prefix=key_prefix)
        delete_redis_keys(*redis_sentinel.master, key_prefix)

    def test_the_url_configures_dogpile_s_sentinel_backend(self, config: CacheConfig) -> None:
        import valkey

        manager = CacheManager(config)
        cache = manager._cache(Item)
        assert cache is not None
        assert type(cache.region.backend).__name__ == "ValkeySentinelBackend"
        assert isinstance(cache.region.backend.writer_client, valkey.Valkey)
        assert config.backend == "dogpile.cache.valkey_sentinel"
