"""Scale-out (issue 6): bounded memory, bounded values, byte counts, the ``on_stats`` hook.

Several servers (Redis Cluster, Sentinel, several Memcached nodes) run the shared backend suite
in ``backends/test_redis_cluster.py``, ``backends/test_redis_sentinel.py`` and
``backends/test_memcached.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from declcache import CacheConfig, CacheManager, setup_cache_listeners
from declcache.backends.memory import BoundedDict
from tests.integration._invalidation_models import Base, Item, Reader, reset_rows, writing

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Engine

ITEMS = 30


@pytest.fixture
def engine(tmp_path: Any) -> Iterator[Engine]:
    setup_cache_listeners()
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    reset_rows(engine)
    with Session(engine) as session:
        session.add_all(Item(id=i, name=f"item-{i}") for i in range(4, ITEMS + 1))
        session.commit()
    yield engine
    engine.dispose()


# --- bounded memory ---------------------------------------------------------------------------


def test_the_memory_backend_keeps_at_most_memory_max_entries(
    engine: Engine, key_prefix: str
) -> None:
    manager = CacheManager(CacheConfig(key_prefix=key_prefix, memory_max_entries=10))
    reader = Reader(engine, manager)
    for ident in range(1, ITEMS + 1):
        assert reader.get(Item, ident) == {"id": ident, "name": f"item-{ident}"}
    memory = manager._backend.data
    assert isinstance(memory, BoundedDict)
    assert len(memory) == 10
    assert memory.evictions >= ITEMS - 10
    # The most recent entries are still cached, the oldest were dropped and load again.
    assert reader.loads_during(lambda: reader.get(Item, ITEMS)) == 0
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 1
    # An eviction never resurrects an old row: an invalidated, evicted entry reloads fresh.
    with writing(engine, manager) as session:
        session.get(Item, ITEMS).name = "new"
        session.commit()
    for ident in range(1, 12):
        reader.get(Item, ident)
    assert reader.get(Item, ITEMS) == {"id": ITEMS, "name": "new"}
    assert len(memory) == 10


def test_the_default_memory_bound_applies_without_configuration() -> None:
    manager = CacheManager()
    assert isinstance(manager._backend.data, BoundedDict)
    assert manager._backend.data.max_entries == 10_000


def test_an_explicit_cache_dict_is_used_as_given(engine: Engine, key_prefix: str) -> None:
    mine: dict[str, Any] = {}
    config = CacheConfig(key_prefix=key_prefix, arguments={"cache_dict": mine})
    Reader(engine, CacheManager(config)).get(Item, 1)
    assert any(key.startswith(key_prefix) for key in mine)


# --- bounded values ---------------------------------------------------------------------------


def test_a_value_larger_than_max_value_bytes_is_not_cached(engine: Engine, key_prefix: str) -> None:
    manager = CacheManager(CacheConfig(key_prefix=key_prefix, max_value_bytes=300))
    reader = Reader(engine, manager)
    with writing(engine, manager) as session:
        session.get(Item, 2).name = "x" * 1000
        session.commit()

    reader.get(Item, 1)
    assert reader.loads_during(lambda: reader.get(Item, 1)) == 0  # small: cached
    assert manager.stats()["Item"].bytes > 0
    filled = manager.stats()["Item"].fills
    for _ in range(2):  # large: never cached, every read goes to the database
        assert reader.loads_during(lambda: reader.get(Item, 2)) == 1
    assert reader.seen[-1] == {"id": 2, "name": "x" * 1000}
    stats = manager.stats()["Item"]
    assert stats.oversized == 2
    assert stats.fills == filled
    # A list result larger than the bound is not cached either.
    for _ in range(2):
        assert reader.loads_during(lambda: reader.list_all(Item)) == 1
    assert manager.stats()["Item"].oversized == 4
    # set() refuses it too.
    with Session(engine) as session:
        assert manager.set(Item, session.get(Item, 2)) is False
        assert manager.set(Item, session.get(Item, 3)) is True


def test_bytes_counts_what_fills_wrote(engine: Engine, key_prefix: str) -> None:
    manager = CacheManager(CacheConfig(key_prefix=key_prefix))
    reader = Reader(engine, manager)
    reader.get(Item, 1)
    one = manager.stats()["Item"].bytes
    assert one > 0
    reader.get(Item, 2)
    reader.list_all(Item)
    assert manager.stats()["Item"].bytes > 2 * one


def test_max_value_bytes_and_memory_max_entries_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DECLCACHE_MEMORY_MAX_ENTRIES", "123")
    monkeypatch.setenv("DECLCACHE_MAX_VALUE_BYTES", "4096")
    monkeypatch.setenv("DECLCACHE_BREAKER_INTERVAL", "2.5")
    config = CacheConfig.from_env()
    assert (config.memory_max_entries, config.max_value_bytes) == (123, 4096)
    assert config.breaker_interval == 2.5
    assert config.sources["memory_max_entries"] == "DECLCACHE_MEMORY_MAX_ENTRIES"
    assert CacheManager(config)._backend.data.max_entries == 123


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DECLCACHE_MEMORY_MAX_ENTRIES", "0"),
        ("DECLCACHE_MAX_VALUE_BYTES", "-1"),
        ("DECLCACHE_BREAKER_INTERVAL", "-1"),
    ],
)
def test_invalid_limits_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    from declcache import SettingsError

    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        CacheConfig.from_env()
    field = variable.removeprefix("DECLCACHE_").lower()
    with pytest.raises(SettingsError, match=f"CacheConfig.{field}"):
        CacheConfig(**{field: int(value)})


# --- observability ----------------------------------------------------------------------------


def test_on_stats_is_told_of_every_increment(engine: Engine, key_prefix: str) -> None:
    seen: list[tuple[str, str, int]] = []
    manager = CacheManager(CacheConfig(key_prefix=key_prefix), on_stats=lambda *a: seen.append(a))
    reader = Reader(engine, manager)
    reader.get(Item, 1)
    reader.get(Item, 1)
    totals: dict[str, int] = {}
    for model, counter, amount in seen:
        assert model == "Item"
        totals[counter] = totals.get(counter, 0) + amount
    stats = manager.stats()["Item"].as_dict()
    assert totals == {name: value for name, value in stats.items() if value}
    assert totals["hits"] == 1
    assert totals["bytes"] > 0


def test_a_failing_on_stats_hook_never_fails_a_read(
    engine: Engine, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args: Any) -> None:
        raise RuntimeError("exporter down")

    manager = CacheManager(CacheConfig(key_prefix=key_prefix), on_stats=broken)
    reader = Reader(engine, manager)
    assert reader.get(Item, 1) == {"id": 1, "name": "item-1"}
    assert reader.get(Item, 1) == {"id": 1, "name": "item-1"}
    assert manager.stats()["Item"].hits == 1
    assert any("on_stats hook failed" in record.getMessage() for record in caplog.records)
