"""The bounded memory mapping behind the memory backend (issue 6, bounded memory)."""

from __future__ import annotations

import threading

import pytest

from declcache import CacheConfig
from declcache.backends import open_backend
from declcache.backends.memory import BoundedDict as LRUDict
from declcache.settings import DEFAULT_MEMORY_MAX_ENTRIES


def test_keeps_at_most_max_entries_dropping_the_least_recently_used() -> None:
    lru = LRUDict(3)
    for key in "abc":
        lru[key] = key.upper()
    assert lru.get("a") == "A"  # a read makes "a" the newest
    lru["d"] = "D"
    assert sorted(lru) == ["a", "c", "d"]
    assert "b" not in lru
    assert lru.evictions == 1
    lru["c"] = "C2"  # a write makes "c" the newest
    lru["e"] = "E"
    assert sorted(lru) == ["c", "d", "e"]
    assert len(lru) == 3


def test_mapping_behaviour() -> None:
    lru = LRUDict(2)
    lru["a"] = 1
    assert lru["a"] == 1
    assert lru.get("missing", 0) == 0
    assert lru.pop("a") == 1
    assert lru.pop("a", None) is None
    with pytest.raises(KeyError):
        lru["a"]
    lru["b"] = 2
    del lru["b"]
    assert len(lru) == 0
    default = open_backend("dogpile.cache.memory", {}, CacheConfig()).data
    assert isinstance(default, LRUDict)
    assert default.max_entries == DEFAULT_MEMORY_MAX_ENTRIES


def test_rejects_a_bound_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        LRUDict(0)


def test_concurrent_writers_never_exceed_the_bound() -> None:
    lru = LRUDict(50)
    sizes: list[int] = []

    def write(offset: int) -> None:
        for i in range(2000):
            lru[f"{offset}:{i}"] = i
            lru.get(f"{offset}:{i // 2}")
            sizes.append(len(lru))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert max(sizes) <= 50
    assert len(lru) == 50
    assert lru.evictions == 4 * 2000 - 50
