"""``dogpile.cache.null``: the shared suite on a backend that remembers nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from declcache import CacheConfig, CacheManager, Lookup
from tests.integration.backends._suite import BackendSuite, Loader, Widget, WidgetFactory, columns

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class TestNull(BackendSuite):
    backend_name = "dogpile.cache.null"
    backend_class = "NullBackend"
    keeps_values = False

    @pytest.fixture
    def config(self, key_prefix: str) -> CacheConfig:
        return CacheConfig(backend="dogpile.cache.null", key_prefix=key_prefix)

    def test_always_misses(self, manager: CacheManager, session: Session) -> None:
        rows = WidgetFactory.create_batch(3)
        manager.set_many(Widget, rows)
        ids = [row.id for row in rows]
        assert manager.get_many(Widget, ids) == [Lookup.MISS] * 3
        loader = Loader(session, Widget, ids[0])
        for _ in range(3):
            assert columns(manager.load(Widget, ids[0], loader)) == columns(rows[0])
        assert loader.calls == 3
        assert manager.stats()["Widget"].hits == 0
        assert manager.stats()["Widget"].errors == 0
