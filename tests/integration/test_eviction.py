"""Tombstones must outlive the entries they guard (issue 14, point 10).

A reader looks a key up (empty), SELECTs the old row and pauses; a writer commits (a
tombstone over the key); other reads then fill the bounded memory cache past its bound. If
that eviction dropped the tombstone, the paused reader's compare-and-set, which expects the
key empty, would store the old row. The memory backend evicts entries before markers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import factory
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from declcache import CacheConfig, CacheManager, setup_cache_listeners
from declcache.backends.memory import BoundedDict
from tests.integration._invalidation_models import (
    Base,
    Item,
    PausedRead,
    Reader,
    reset_rows,
    writing,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine

BOUND = 8  # entries the memory cache keeps
FILLERS = 30  # rows read after the commit: many more than the bound


class ItemFactory(factory.Factory):
    class Meta:
        model = Item

    id = factory.Sequence(lambda n: 10 + n)
    name = factory.Faker("word")


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    setup_cache_listeners()
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'evict.sqlite'}")
    else:
        engine = create_engine(request.getfixturevalue("postgres_url"))
    Base.metadata.create_all(engine)
    reset_rows(engine)
    ItemFactory.reset_sequence()
    with Session(engine) as session:
        session.add_all(ItemFactory.build_batch(FILLERS))
        session.commit()
    yield engine
    if request.param == "postgresql":
        Base.metadata.drop_all(engine)
    engine.dispose()


def test_evicting_past_the_bound_keeps_the_tombstone_of_a_racing_fill(db: Engine) -> None:
    cache = BoundedDict(BOUND)
    manager = CacheManager(CacheConfig(arguments={"cache_dict": cache}))
    reader = PausedRead(db, manager, Item, 1, lambda s: s.get(Item, 1))
    reader.pause()  # looked the empty key up, SELECTed the old row
    with writing(db, manager) as session:
        session.get(Item, 1).name = "new"
        session.commit()  # a tombstone over the key
    others = Reader(db, manager)
    for ident in range(10, 10 + FILLERS):
        others.get(Item, ident)  # fills: past the bound
    assert cache.evictions >= FILLERS - BOUND
    assert reader.finish() == {"id": 1, "name": "item-1"}
    assert manager.stats()["Item"].fills_refused == 1
    assert cache.guard_evictions == 0
    assert Reader(db, manager).get(Item, 1) == {"id": 1, "name": "new"}


def test_markers_go_after_every_entry_then_oldest_first() -> None:
    cache = BoundedDict(3)
    cache.mark("tombstone", b"t", 300)
    cache["entry-1"] = b"1"
    cache.mark("token", b"k", 0)  # its ttl has already run out
    cache["entry-2"] = b"2"  # evicts entry-1: the only entry, although the newest marker
    assert sorted(cache) == ["entry-2", "token", "tombstone"]
    cache.get("tombstone")
    cache["entry-3"] = b"3"
    assert sorted(cache) == ["entry-3", "token", "tombstone"]
    cache.mark("tombstone-2", b"t2", 300)  # evicts entry-3
    cache.mark("tombstone-3", b"t3", 300)  # no entry left: the oldest marker, a live one
    assert "tombstone" not in cache
    assert cache.guard_evictions == 1
    cache["tombstone-2"] = b"filled"  # a fill over a marker makes it an entry
    cache.mark("tombstone-4", b"t4", 300)
    assert "tombstone-2" not in cache
    assert cache.evictions == 5
