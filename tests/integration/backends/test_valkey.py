"""``dogpile.cache.valkey``: the shared suite on Valkey through the ``valkey`` client.

The server is ``DECLCACHE_TEST_VALKEY`` or a private ``valkey-server``; where Valkey is not
installed, a private ``redis-server`` stands in (same protocol: the client cannot tell). The
stale-fill scenario (``test_stale_fill.py``) and the stock repositories
(``test_repository_sync.py``, ``test_repository_async.py``) run on Valkey too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from declcache import CacheConfig, CacheManager
from declcache.backends.redis import AsyncRedisStore, RedisStore
from tests import _servers
from tests.integration.backends._redis_family import (
    OnePoolChecks,
    RedisRaw,
    ServerExpiryChecks,
    SingleServerChecks,
)
from tests.integration.backends._suite import (
    BackendSuite,
    Loader,
    Widget,
    WidgetFactory,
    columns,
)
from tests.integration.conftest import delete_redis_keys

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.orm import Session


class ValkeyChecks(ServerExpiryChecks, OnePoolChecks):
    backend_name = "dogpile.cache.valkey"
    backend_class = "ValkeyBackend"

    @pytest.fixture
    def raw(self, valkey_address: tuple[str, int]) -> Iterator[RedisRaw]:
        import valkey

        client = valkey.Valkey(*valkey_address, socket_timeout=5)
        yield RedisRaw(client)
        client.close()

    def test_the_stores_are_valkey_py_s_own_sync_and_asyncio_clients(
        self, manager: CacheManager
    ) -> None:
        import valkey
        import valkey.asyncio

        cache = manager._cache(Widget)
        assert cache is not None
        assert isinstance(cache.region.backend.writer_client, valkey.Valkey)
        assert isinstance(cache.store.inner, RedisStore)
        assert isinstance(cache.store.inner._client, valkey.Valkey)
        assert isinstance(cache.astore.inner, AsyncRedisStore)  # native, not a worker thread
        assert cache.astore.inner._module is valkey.asyncio

    async def test_an_awaited_read_is_answered_by_valkey_asyncio(
        self, manager: CacheManager, session: Session
    ) -> None:
        import valkey.asyncio

        widget = WidgetFactory()
        loader = Loader(session, Widget, widget.id)

        async def load() -> Widget:
            return loader()

        try:
            assert columns(await manager.aload(Widget, widget.id, load)) == columns(widget)
            assert columns(await manager.aload(Widget, widget.id, load)) == columns(widget)
            assert loader.calls == 1
            cache = manager._cache(Widget)
            assert cache is not None
            clients = list(cache.astore.inner._clients.values())
            assert len(clients) == 1  # this event loop's client, opened by the reads
            assert isinstance(clients[0][0], valkey.asyncio.Valkey)
        finally:
            await manager.aclose()
        assert manager.stats()["Widget"].errors == 0


class TestValkey(ValkeyChecks, SingleServerChecks, BackendSuite):
    """Configured by backend name and arguments."""

    client = "valkey"

    def start_private_server(self) -> _servers.RedisProcess:
        return _servers.start_valkey_server()

    @pytest.fixture
    def config(self, valkey_address: tuple[str, int], key_prefix: str) -> Iterator[CacheConfig]:
        host, port = valkey_address
        yield CacheConfig(
            backend="dogpile.cache.valkey",
            arguments={"host": host, "port": port, "db": 0},
            key_prefix=key_prefix,
        )
        delete_redis_keys(host, port, key_prefix)


class TestValkeyUrl(ValkeyChecks, BackendSuite):
    """Configured by a ``valkey://host:port/db`` URL."""

    @pytest.fixture
    def config(self, valkey_address: tuple[str, int], key_prefix: str) -> Iterator[CacheConfig]:
        host, port = valkey_address
        yield CacheConfig(url=f"valkey://{host}:{port}/0", key_prefix=key_prefix)
        delete_redis_keys(host, port, key_prefix)

    def test_the_url_names_the_valkey_backend(self, config: CacheConfig) -> None:
        host, port = config.arguments["host"], config.arguments["port"]
        assert config.backend == "dogpile.cache.valkey"
        assert config.arguments == {"host": host, "port": port, "db": 0}


@pytest.mark.parametrize(
    ("url", "arguments"),
    [
        ("valkey://cache", {"host": "cache", "port": 6379}),
        (
            "valkeys://user:p%40ss@cache:6380/2?socket_timeout=0.2",
            {
                "host": "cache",
                "port": 6380,
                "db": 2,
                "username": "user",
                "password": "p@ss",
                "ssl": True,
                "socket_timeout": 0.2,
            },
        ),
    ],
)
def test_valkey_urls(url: str, arguments: dict[str, object]) -> None:
    from declcache.backends import parse_url

    assert parse_url(url) == ("dogpile.cache.valkey", arguments)
