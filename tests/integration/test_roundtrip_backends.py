"""Random rows of every column type round-trip exactly through each backend and each format.

The same model, strategies and exact comparison as ``tests/unit/test_codec.py`` (all from
``tests/_codec_cases.py``), this time through ``CacheManager.set`` / ``.get`` / ``.get_many``
and a real backend (memory, Redis, memcached, dbm; see ``cache_config``).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect

from declcache import CacheManager, Lookup
from tests._codec_cases import COLUMNS, FORMATS, Everything, assert_same_instance, loaded, rows

if TYPE_CHECKING:
    from declcache import CacheConfig

#: Network round trips are slower: fewer examples there, plenty in process.
MAX_EXAMPLES = {"memory": 100, "dbm": 50, "redis": 30, "memcached": 30}
_examples = itertools.count()


def manager_for(cache_config: CacheConfig, format_name: str) -> CacheManager:
    return CacheManager(cache_config.with_overrides(serializer=format_name))


@pytest.mark.parametrize("format_name", FORMATS)
def test_random_rows_round_trip_exactly(
    cache_backend: str, cache_config: CacheConfig, format_name: str
) -> None:
    manager = manager_for(cache_config, format_name)

    @settings(max_examples=MAX_EXAMPLES[cache_backend], deadline=None)
    @given(values=rows())
    def check(values: dict[str, Any]) -> None:
        original = loaded(Everything, **values)

        assert manager.set(Everything, original)
        cached = manager.get(Everything, values["id"])

        assert cached is not original
        assert type(cached) is Everything
        assert inspect(cached).detached
        assert inspect(cached).key == (Everything, (values["id"],), None)
        assert_same_instance(original, cached)

    check()


@pytest.mark.parametrize("format_name", FORMATS)
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batch=st.lists(rows(), min_size=1, max_size=6, unique_by=lambda values: values["id"]))
def test_get_many_returns_each_row_exactly_in_order(
    cache_config: CacheConfig, format_name: str, batch: list[dict[str, Any]]
) -> None:
    # The fixture (and so its key prefix) is shared by all examples: give each its own.
    example_config = cache_config.with_overrides(
        key_prefix=f"{cache_config.key_prefix}x{next(_examples)}:"
    )
    manager = manager_for(example_config, format_name)
    originals = [loaded(Everything, **values) for values in batch]
    for original in originals:
        assert manager.set(Everything, original)
    absent = max(values["id"] for values in batch) + 1
    idents = [values["id"] for values in reversed(batch)]

    found = manager.get_many(Everything, [*idents, absent])

    assert found[-1] is Lookup.MISS
    for original, cached in zip(reversed(originals), found[:-1], strict=True):
        assert inspect(cached).detached
        assert_same_instance(original, cached)


@pytest.mark.parametrize("format_name", FORMATS)
def test_counters_follow_fills_hits_and_misses(cache_config: CacheConfig, format_name: str) -> None:
    manager = manager_for(cache_config, format_name)
    for ident in (1, 2, 3):
        assert manager.set(Everything, loaded(Everything, id=ident, name=f"n{ident}"))

    assert manager.get(Everything, 1).name == "n1"
    assert [row.name for row in manager.get_many(Everything, [2, 3])] == ["n2", "n3"]
    assert manager.get(Everything, 4) is Lookup.MISS

    stats = manager.stats()["Everything"]
    assert (stats.fills, stats.hits, stats.misses, stats.errors) == (3, 3, 1, 0)


@pytest.mark.parametrize("format_name", FORMATS)
@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("name", "lone \udc80 surrogate"),  # neither UTF-8 JSON nor msgpack can carry it
        ("doc", {"key": {1, 2}}),  # a set inside a JSON column
        ("doc", [2**64]),  # too large for msgpack; JSON carries it
    ],
)
def test_a_value_the_format_cannot_carry_is_not_cached(
    cache_config: CacheConfig, format_name: str, column: str, value: Any
) -> None:
    manager = manager_for(cache_config, format_name)
    original = loaded(Everything, id=5, **{column: value})

    stored = manager.set(Everything, original)
    cached = manager.get(Everything, 5)

    if stored:  # only the JSON format can carry an integer beyond 64 bits
        assert (format_name, column, value) == ("json", "doc", [2**64])
        assert cached.doc == [2**64]
    else:
        assert cached is Lookup.MISS
    assert manager.stats()["Everything"].errors == 0


def test_every_column_is_covered() -> None:
    assert len(COLUMNS) == len(inspect(Everything).columns)
