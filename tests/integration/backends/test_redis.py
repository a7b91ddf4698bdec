"""``dogpile.cache.redis``: the shared suite on one Redis server, with and without dogpile's
distributed lock."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from declcache import CacheConfig, CacheManager
from tests import _servers
from tests.integration.backends._redis_family import (
    OnePoolChecks,
    RedisRaw,
    ServerExpiryChecks,
    SingleServerChecks,
)
from tests.integration.backends._suite import BackendSuite, Gadget, Widget, region_of
from tests.integration.conftest import delete_redis_keys

if TYPE_CHECKING:
    from collections.abc import Iterator


class RedisChecks(ServerExpiryChecks, OnePoolChecks):
    """One Redis server (the shared one), its keys deleted after each test."""

    backend_name = "dogpile.cache.redis"
    backend_class = "RedisBackend"
    extra_arguments: ClassVar[dict[str, Any]] = {}

    @pytest.fixture
    def config(self, redis_address: tuple[str, int], key_prefix: str) -> Iterator[CacheConfig]:
        host, port = redis_address
        yield CacheConfig(
            backend=self.backend_name,
            arguments={"host": host, "port": port, "db": 0, **self.extra_arguments},
            key_prefix=key_prefix,
        )
        delete_redis_keys(host, port, key_prefix)

    @pytest.fixture
    def raw(self, redis_address: tuple[str, int]) -> Iterator[RedisRaw]:
        import redis

        client = redis.Redis(*redis_address, socket_timeout=5)
        yield RedisRaw(client)
        client.close()


class TestRedis(RedisChecks, SingleServerChecks, BackendSuite):
    client = "redis"

    def start_private_server(self) -> _servers.RedisProcess:
        return _servers.start_redis_server()


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
