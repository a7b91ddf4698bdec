"""Session-wide server fixtures, built on ``tests/_servers.py``.

A missing server skips the tests that need it locally and fails them under ``CI=true``.
"""

from __future__ import annotations

import itertools

import pytest

from tests import _servers

_test_counter = itertools.count(1)


@pytest.fixture(scope="session")
def redis_address() -> tuple[str, int]:
    """``(host, port)`` of a Redis server (``DECLCACHE_TEST_REDIS`` or a private one)."""
    return _servers.redis_address()


@pytest.fixture(scope="session")
def valkey_address() -> tuple[str, int]:
    """``(host, port)`` of a Valkey server (``DECLCACHE_TEST_VALKEY`` or a private one).

    A private ``redis-server`` stands in where ``valkey-server`` is not installed.
    """
    return _servers.valkey_address()


@pytest.fixture(scope="session")
def memcached_address() -> tuple[str, int]:
    """``(host, port)`` of a memcached server (``DECLCACHE_TEST_MEMCACHED`` or a private one)."""
    return _servers.memcached_address()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """psycopg URL of a database created for this test run (dropped at exit)."""
    return _servers.postgres_urls()[0]


@pytest.fixture(scope="session")
def postgres_async_url() -> str:
    """asyncpg URL of the same database as ``postgres_url``."""
    return _servers.postgres_urls()[1]


@pytest.fixture
def key_prefix() -> str:
    """A cache key prefix unique to this test, e.g. ``"dct1a2b3c4d:t17:"``."""
    return f"{_servers.run_prefix()}t{next(_test_counter)}:"
