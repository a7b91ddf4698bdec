"""Invalidation: what a transaction changed, and the writes that make every reader see it.

:class:`ModelChanges` is what the session listeners (:mod:`declcache._listeners`) collect for
one model while a transaction runs; after its commit, :func:`invalidate` writes, in one
``write_many`` (one pipeline on Redis):

* a unique *tombstone* over every entity key the transaction touched (old and new key values),
  so no fill that looked the key up before the commit can write the old row back;
* a new *list version*, so every cached query result of the model becomes a miss;
* a new *generation* when rows were written that nobody listed (a bulk or textual statement),
  so every cached entity of the model becomes a miss.

Flows, like :mod:`declcache._reads`: no I/O here, :mod:`declcache._driver` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from declcache._driver import Call
from declcache._keys import UNSCOPED, Scope
from declcache._payload import POINTER, new_token
from declcache._reads import joined_token

if TYPE_CHECKING:
    from collections.abc import Sequence

    from declcache._api import Write
    from declcache._driver import Flow
    from declcache._keys import KeySet
    from declcache._model_cache import ModelCache

__all__ = ["ModelChanges", "invalidate", "pointed_primary_key", "warm"]


@dataclass
class ModelChanges:
    """What one transaction changed in one model, collected by the session listeners.

    Attributes:
        keys: ``(key fields, values)`` of every entity key to invalidate, old and new.
        whole_model: a bulk or textual statement wrote rows nobody listed.
        scopes: the scopes the changes were written in; none recorded means unscoped.
    """

    keys: set[tuple[KeySet, tuple[Any, ...]]] = field(default_factory=set)
    whole_model: bool = False
    scopes: set[Scope] = field(default_factory=set)

    def merge(self, other: ModelChanges) -> None:
        """Add ``other``'s changes to these."""
        self.keys |= other.keys
        self.whole_model |= other.whole_model
        self.scopes |= other.scopes

    @property
    def size(self) -> int:
        """How many keys invalidating these changes writes (at least)."""
        return (len(self.keys) + 1) * max(len(self.scopes), 1)


def invalidate(cache: ModelCache, change: ModelChanges) -> Flow[None]:
    """Tombstones and new tokens in one ``write_many``: one round trip on Redis.

    A change written in a named scope is invalidated there and in its schema's unnamed
    scope, which sees every row of the schema. A change written outside every named scope
    cannot know which named scopes hold those rows: it replaces the schema's *outside*
    tokens, which every named scope reads too (see :mod:`declcache._keys`).

    A store fault propagates: the caller queues the change for replay.
    """
    tombstones: dict[str, None] = {}
    tokens: dict[str, None] = {}
    for scope in change.scopes or (UNSCOPED,):
        reached = {scope, scope.outside}
        for keys in (cache.scoped(each).keys for each in reached):
            for fields, values in change.keys:
                try:
                    tombstones[keys.entity_key(fields, values)] = None
                except (ValueError, TypeError):
                    continue
            tokens[keys.list_version_key] = None
            if change.whole_model:
                tokens[keys.generation_key] = None
        if scope.name is None and cache.named_scopes:
            keys = cache.scoped(scope).keys
            tokens[keys.outside_list_version_key] = None
            if change.whole_model or change.keys:
                tokens[keys.outside_generation_key] = None
    writes: list[Write] = [
        (key, cache.payloads.tombstone(), cache.server_ttl) for key in tombstones
    ]
    writes.extend((key, cache.payloads.token_value(new_token()), cache.token_ttl) for key in tokens)
    yield Call("write_many", writes)
    cache.counters.add("invalidations", len(writes))


def pointed_primary_key(cache: ModelCache, key: str) -> Flow[tuple[Any, ...] | None]:
    """The primary key a ``key_fields`` key points to, if the cache knows it."""
    try:
        found = cache.payload((yield Call("get_many", [key]))[0])
    except Exception:
        return None
    return tuple(found.body) if found is not None and found.kind == POINTER else None


def warm(cache: ModelCache, instances: Sequence[object]) -> Flow[int]:
    """Cache ``instances`` unconditionally (warm-up); how many were stored."""
    try:
        tokens = cache.keys.generation_keys
        generation = yield from joined_token(cache, tokens, (yield Call("get_many", [*tokens])))
        mapping: dict[str, bytes] = {}
        stored = 0
        for instance in instances:
            writes = cache.entity_writes(generation, instance)
            if writes is not None:
                stored += 1
                mapping.update(writes)
        if mapping:
            ttl = cache.server_ttl
            yield Call("write_many", [(key, value, ttl) for key, value in mapping.items()])
    except Exception as error:
        cache.fault("set", error)
        return 0
    cache.counters.add("bytes", sum(len(value) for value in mapping.values()))
    cache.counters.add("fills", stored)
    return stored
