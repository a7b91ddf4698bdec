"""The test-server helpers work: shared servers answer, private ones can be killed and restarted."""

from __future__ import annotations

import asyncio
import shutil
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from tests import _servers

if TYPE_CHECKING:
    from pathlib import Path


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


def test_valkey_set_get_with_prefix(valkey_address: tuple[str, int], key_prefix: str) -> None:
    valkey = pytest.importorskip("valkey")
    host, port = valkey_address
    client = valkey.Valkey(host=host, port=port, socket_timeout=5)
    key = f"{key_prefix}hello"
    try:
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


def test_private_valkey_is_valkey_server_or_redis_server_in_its_place() -> None:
    valkey = pytest.importorskip("valkey")
    from valkey.backoff import NoBackoff
    from valkey.retry import Retry

    expected = shutil.which("valkey-server") or shutil.which("redis-server")
    assert _servers.ValkeyProcess.executable() == expected
    with _servers.start_valkey_server() as server:
        client = valkey.Valkey(
            host=server.host, port=server.port, socket_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        try:
            assert client.set("k", b"v")
            server.stop()
            assert not _servers.listening(server.host, server.port)
            server.start()
            assert client.get("k") is None  # no persistence: a restart is an empty server
        finally:
            client.close()
    assert not server.running


def test_without_a_valkey_or_redis_binary_valkey_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no server binary on it
    monkeypatch.delenv("DECLCACHE_TEST_VALKEY_UNSET", raising=False)
    assert _servers.ValkeyProcess.executable() is None
    # An environment variable of its own: _discover remembers its answer per variable.
    found = _servers._discover(_servers.ValkeyProcess, "DECLCACHE_TEST_VALKEY_UNSET", None)
    assert isinstance(found, str)
    assert "valkey-server or redis-server is not installed" in found
    assert "DECLCACHE_TEST_VALKEY_UNSET is not set" in found


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
