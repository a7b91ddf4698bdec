"""``dogpile.cache.memory``: the shared suite on a dict of this process."""

from __future__ import annotations

from typing import Any

import pytest

from declcache import CacheConfig
from tests.integration.backends._suite import BackendSuite, Raw, StoredBytesChecks


class DictRaw(Raw):
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def get(self, key: str) -> bytes | None:
        value = self._data.get(key)
        return None if value is None else bytes(value)

    def plant(self, key: str, value: bytes) -> None:
        self._data[key] = value


class TestMemory(StoredBytesChecks, BackendSuite):
    backend_name = "dogpile.cache.memory"
    backend_class = "MemoryBackend"

    @pytest.fixture
    def cache_dict(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def config(self, key_prefix: str, cache_dict: dict[str, Any]) -> CacheConfig:
        return CacheConfig(
            backend="dogpile.cache.memory",
            arguments={"cache_dict": cache_dict},
            key_prefix=key_prefix,
        )

    @pytest.fixture
    def raw(self, cache_dict: dict[str, Any]) -> Raw:
        return DictRaw(cache_dict)
