"""The guards a fill passes besides its compare-and-set (issue 12: mutations no test caught).

A fill is a compare-and-set against what the look-up saw before the database was read, which
wins over every invalidation that lands later — as long as that invalidation's tombstone still
exists. Tombstones expire with the model's ttl, so a read that took longer than the ttl could
find the key empty again and write its row over nothing: such a read must not fill at all.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from declcache import CacheConfig, CacheManager, Lookup
from tests.integration._invalidation_models import Base, Note, Reader, reset_rows, row

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine

NOTE_TTL = 1  # Note's CacheMeta.ttl


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'guards.sqlite'}")
    Base.metadata.create_all(engine)
    reset_rows(engine)
    yield engine
    engine.dispose()


def slow_load(engine: Engine, manager: CacheManager, seconds: float) -> dict[str, Any] | None:
    """``manager.load`` of note 1 whose database read takes ``seconds``."""
    with Session(engine, info={"cache_manager": manager}) as session:

        def loader() -> Any:
            time.sleep(seconds)
            return session.get(Note, 1)

        return row(manager.load(Note, 1, loader))


def test_a_read_slower_than_the_ttl_fills_nothing(
    engine: Engine, cache_config: CacheConfig
) -> None:
    manager = CacheManager(cache_config)

    found = slow_load(engine, manager, NOTE_TTL + 0.2)

    assert found == {"id": 1, "body": "first"}  # the caller still gets its row
    assert manager.get(Note, 1) is Lookup.MISS  # but nothing was cached from it
    assert manager.stats()["Note"].fills == 0


def test_a_read_within_the_ttl_fills(engine: Engine, cache_config: CacheConfig) -> None:
    """The counterpart: the same read, quick enough, is cached (so the test above can fail)."""
    manager = CacheManager(cache_config)

    found = slow_load(engine, manager, 0)

    assert found == {"id": 1, "body": "first"}
    assert row(manager.get(Note, 1)) == found
    assert manager.stats()["Note"].fills == 1
    reader = Reader(engine, manager)
    assert reader.loads_during(lambda: reader.get(Note, 1)) == 0
