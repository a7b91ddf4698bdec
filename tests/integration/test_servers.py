"""The test-server helpers work: shared servers answer, private ones can be killed and restarted."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from tests import _servers


def test_redis_set_get_with_prefix(redis_address: tuple[str, int], key_prefix: str) -> None:
    redis = pytest.importorskip("redis")
    host, port = redis_address
    client = redis.Redis(host=host, port=port, socket_timeout=5)
    key = f"{key_prefix}hello"
    try:
        assert key.startswith(_servers.run_prefix())
        assert client.set(key, b"world", ex=60)
        assert client.get(key) == b"world"
    finally:
        client.delete(key)
        client.close()


def test_memcached_set_get(memcached_address: tuple[str, int], key_prefix: str) -> None:
    pymemcache = pytest.importorskip("pymemcache.client.base")
    client = pymemcache.Client(memcached_address, connect_timeout=5, timeout=5)
    key = f"{key_prefix}hello"
    try:
        assert client.set(key, b"world", expire=60, noreply=False)
        assert client.get(key) == b"world"
    finally:
        client.delete(key)
        client.close()


def test_key_prefixes_differ_per_test(key_prefix: str) -> None:
    other = f"{_servers.run_prefix()}"
    assert key_prefix.startswith(other)
    assert key_prefix != other


def test_postgres_select_on_own_database(postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar_one() == 1
            name = conn.execute(sa.text("select current_database()")).scalar_one()
        assert name.startswith("declcache_test_")
        assert engine.url.database == name
    finally:
        engine.dispose()


def test_postgres_async_url_reaches_the_same_database(
    postgres_url: str, postgres_async_url: str
) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    async def current_database() -> str:
        engine = create_async_engine(postgres_async_url)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(sa.text("select current_database()"))
                return str(result.scalar_one())
        finally:
            await engine.dispose()

    assert asyncio.run(current_database()) == sa.make_url(postgres_url).database


def test_private_redis_stops_and_starts_again() -> None:
    redis = pytest.importorskip("redis")
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    with _servers.start_redis_server() as server:
        # No retries: redis-py's default backoff would spend seconds on the refused connection.
        client = redis.Redis(
            host=server.host, port=server.port, socket_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        try:
            assert client.ping()
            client.set("k", b"v")
            server.stop()
            assert not _servers.listening(server.host, server.port)
            with pytest.raises(redis.ConnectionError, match=r"(?i)refused"):
                client.ping()
            server.start()
            assert client.ping()
            assert client.get("k") is None  # no persistence: a restart is an empty server
        finally:
            client.close()
    assert not server.running
    assert not _servers.listening(server.host, server.port)


def test_private_memcached_stops_and_starts_again() -> None:
    pymemcache = pytest.importorskip("pymemcache.client.base")
    with _servers.start_memcached_server() as server:
        client = pymemcache.Client(server.address, connect_timeout=2, timeout=2)
        try:
            assert client.set("k", b"v", noreply=False)
            server.stop()
            assert not _servers.listening(server.host, server.port)
            fresh = pymemcache.Client(server.address, connect_timeout=2, timeout=2)
            with pytest.raises(ConnectionRefusedError):
                fresh.get("k")
            server.start()
            assert fresh.get("k") is None  # no persistence: a restart is an empty server
            fresh.close()
        finally:
            client.close()


def test_unavailable_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert _servers.in_ci()
    with pytest.raises(pytest.fail.Exception, match="DECLCACHE_TEST_REDIS"):
        _servers.unavailable("no redis on 127.0.0.1:1, set DECLCACHE_TEST_REDIS")


@pytest.mark.parametrize("ci", [None, "false", "1"])
def test_unavailable_skips_outside_ci(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert not _servers.in_ci()
    with pytest.raises(pytest.skip.Exception, match="DECLCACHE_TEST_REDIS"):
        _servers.unavailable("no redis on 127.0.0.1:1, set DECLCACHE_TEST_REDIS")


def test_listening_on_a_closed_port_is_false() -> None:
    port = _servers._free_port()
    assert not _servers.listening("127.0.0.1", port, timeout=0.2)
