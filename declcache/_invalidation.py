"""Invalidation: what a transaction changed, and the writes that make every reader see it.

:class:`ModelChanges` is what the session listeners (:mod:`declcache._listeners`) collect for
one model while a transaction runs; after its commit, :func:`invalidate` writes, in one
``write_many`` (one pipeline on Redis):

* a unique *tombstone* over every entity key the transaction touched (old and new key values),
  so no fill that looked the key up before the commit can write the old row back;
* a new *list version*, so every cached query result of the model becomes a miss;
* a new *generation* when rows were written that nobody listed (a bulk or textual statement),
  so every cached entity of the model becomes a miss.

Under ``DECLCACHE_CONSISTENCY=strict`` (:mod:`declcache._strict`) a commit first writes a
*marker* over those same keys, before the database commit (:func:`mark`), and the change then
carries its :class:`Claim`: :func:`invalidate` replaces the commit's own markers by
compare-and-set, and leaves a marker standing while another commit in flight still claims it.

Flows, like :mod:`declcache._reads`: no I/O here, :mod:`declcache._driver` runs them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from declcache._driver import Call
from declcache._keys import UNSCOPED, Scope, normalized
from declcache._payload import POINTER, marker_claims, marker_value, new_token
from declcache._reads import joined_token, marked

if TYPE_CHECKING:
    from collections.abc import Sequence

    from declcache._api import Swap, Write
    from declcache._driver import Flow
    from declcache._keys import KeySet
    from declcache._model_cache import ModelCache

__all__ = [
    "MARK_ATTEMPTS",
    "Claim",
    "KeysKeptChanging",
    "ModelChanges",
    "invalidate",
    "mark",
    "pointed_primary_key",
    "targets",
    "tombstones",
    "warm",
]

#: Compare-and-set rounds a marker write (or its removal) gets before giving up: each round
#: loses only to another writer's change of the same key between its read and its write.
MARK_ATTEMPTS = 32


class KeysKeptChanging(RuntimeError):
    """Other writers changed the keys between each read and compare-and-set of a marker."""


@dataclass
class Claim:
    """A strict commit's claim on the keys it marked before the database committed.

    Attributes:
        id: the commit's random id, as its markers name it.
        deadline: the wall-clock time (``time.time()``) until which its markers block fills.
        marked: the value this commit left at each key, which its clear expects to find.
    """

    id: str
    deadline: float
    marked: dict[str, bytes] = field(default_factory=dict)


@dataclass
class ModelChanges:
    """What one transaction changed in one model, collected by the session listeners.

    Attributes:
        keys: ``(key fields, values)`` of every entity key to invalidate, old and new.
        whole_model: a bulk or textual statement wrote rows nobody listed.
        scopes: the scopes the changes were written in; none recorded means unscoped.
        claims: the strict commits that marked these keys before committing (none in the
            default mode): invalidating replaces their markers and nobody else's.
        pointers: the primary key of the row each ``key_fields`` key in ``keys`` belongs to,
            where known: its tombstone names it (see :func:`tombstones`).
    """

    keys: set[tuple[KeySet, tuple[Any, ...]]] = field(default_factory=set)
    whole_model: bool = False
    scopes: set[Scope] = field(default_factory=set)
    claims: list[Claim] = field(default_factory=list)
    pointers: dict[tuple[KeySet, tuple[Any, ...]], tuple[Any, ...]] = field(default_factory=dict)

    def merge(self, other: ModelChanges) -> None:
        """Add ``other``'s changes to these."""
        self.keys |= other.keys
        self.whole_model |= other.whole_model
        self.scopes |= other.scopes
        self.claims += other.claims
        self.pointers.update(other.pointers)

    @property
    def size(self) -> int:
        """How many keys invalidating these changes writes (at least)."""
        return (len(self.keys) + 1) * max(len(self.scopes), 1)


def targets(cache: ModelCache, change: ModelChanges) -> tuple[list[str], list[str]]:
    """The keys invalidating ``change`` writes: entity keys (tombstones) and token keys.

    A change written in a named scope is invalidated there and in its schema's unnamed
    scope, which sees every row of the schema. A change written outside every named scope
    cannot know which named scopes hold those rows: it replaces the schema's *outside*
    tokens, which every named scope reads too (see :mod:`declcache._keys`).
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
    return list(tombstones), list(tokens)


def tombstones(cache: ModelCache, change: ModelChanges, keys: Sequence[str]) -> dict[str, bytes]:
    """A fresh tombstone for each entity key of ``keys`` (the first list :func:`targets` gives).

    At a ``key_fields`` key whose row's primary key ``change.pointers`` knows, the tombstone
    names it (:meth:`~declcache._payload.Payloads.tombstone`): a read by that key then looks
    the row's primary-key entry up in the same probe, as it follows a live pointer, so its
    fill replaces what it saw there instead of meeting the commit's tombstone blind.
    """
    named: dict[str, tuple[str, ...]] = {}
    if change.pointers:
        primary_key = cache.keys.primary_key
        for scope in change.scopes or (UNSCOPED,):
            for builder in (cache.scoped(each).keys for each in {scope, scope.outside}):
                for (fields, values), pointed in change.pointers.items():
                    try:
                        key = builder.entity_key(fields, values)
                        named[key] = normalized(cache.mapper, primary_key, pointed)
                    except (ValueError, TypeError, KeyError):
                        continue
    payloads = cache.payloads
    return {key: payloads.tombstone(*named.get(key, ())) for key in keys}


def invalidate(cache: ModelCache, change: ModelChanges) -> Flow[None]:
    """Tombstones and new tokens in one ``write_many``: one round trip on Redis.

    A change that strict commits marked (``change.claims``) replaces their markers by
    compare-and-set instead (:func:`_clear`), so that a marker another commit in flight
    still claims stays. A store fault propagates: the caller queues the change for replay.
    """
    entity_keys, tokens = targets(cache, change)
    dead = tombstones(cache, change, entity_keys)
    if change.claims:
        written = yield from _clear(cache, change.claims, dead, tokens)
        cache.counters.add("invalidations", written)
        return
    ttl = cache.server_ttl
    writes: list[Write] = [(key, value, ttl) for key, value in dead.items()]
    writes.extend((key, cache.payloads.token_value(new_token()), cache.token_ttl) for key in tokens)
    yield Call("write_many", writes)
    cache.counters.add("invalidations", len(writes))


def _live_claims(raw: bytes | None, now: float, dropped: set[str]) -> dict[str, float]:
    """The claims of the marker ``raw`` (if it is one) still running at ``now``, but ``dropped``."""
    found = marker_claims(raw)
    if not found:
        return {}
    return {claim: end for claim, end in found.items() if end > now and claim not in dropped}


def mark(cache: ModelCache, change: ModelChanges, claim: Claim) -> Flow[None]:
    """Put ``claim`` in a marker over every key invalidating ``change`` will write.

    Before the database commit. Each key is read, and the marker written by compare-and-set
    against what was read, keeping the claims of other commits still in flight there (their
    own clear must not lift this one's marker, nor this one's theirs). Written with the
    model's server ttl, a tombstone's, so that a marker never leaves an empty key behind
    sooner than a tombstone would: a reader that found the key empty before it was marked
    can never fill what it read before the commit (see :func:`declcache._reads.lagging`).

    Raises:
        KeysKeptChanging: other writers changed the keys in every one of
            :data:`MARK_ATTEMPTS` rounds; a store fault propagates as it is.
    """
    tombstones, tokens = targets(cache, change)
    pending = [*tombstones, *tokens]
    for _ in range(MARK_ATTEMPTS):
        raws = yield Call("get_many", pending)
        now = time.time()
        swaps: list[Swap] = []
        for key, raw in zip(pending, raws, strict=True):
            claims = _live_claims(raw, now, set())
            claims[claim.id] = claim.deadline
            swaps.append((key, raw, marker_value(claims)))
        stored = yield Call("compare_and_set", swaps, cache.server_ttl)
        pending = []
        for (key, _, value), done in zip(swaps, stored, strict=True):
            if done:
                claim.marked[key] = value
            else:
                pending.append(key)
        if not pending:
            return
    raise KeysKeptChanging(f"{cache.name}: {len(pending)} keys changed in every round")


def _clear(
    cache: ModelCache, claims: Sequence[Claim], dead: dict[str, bytes], tokens: list[str]
) -> Flow[int]:
    """Replace the markers of ``claims`` with tombstones and new tokens; how many keys it wrote.

    A key still holding what the one claim wrote there is replaced without reading it first
    (one compare-and-set: the common case). Otherwise, and for the keys that compare
    failed, each key is read and replaced by compare-and-set against what was read: by a
    marker of the other claims still running there, if any (this commit's invalidation
    then happens when they end), else by a tombstone or a new token — also where a writer
    unaware of markers replaced this commit's, since this commit's invalidation must land.
    """
    mine = {claim.id for claim in claims}
    pending = [*dead, *tokens]
    expected = claims[0].marked if len(claims) == 1 else None
    written = 0
    for _ in range(MARK_ATTEMPTS):
        if expected is not None:
            raws = [expected.get(key) for key in pending]
            expected = None
        else:
            raws = yield Call("get_many", pending)
        now = time.time()
        swaps: list[Swap] = []
        for key, raw in zip(pending, raws, strict=True):
            others = _live_claims(raw, now, mine)
            if others:
                value = marker_value(others)
            elif key in dead:
                value = dead[key]
            else:
                value = cache.payloads.token_value(new_token())
            swaps.append((key, raw, value))
        stored = yield Call("compare_and_set", swaps, cache.server_ttl)
        written += sum(stored)
        pending = [key for (key, _, _), done in zip(swaps, stored, strict=True) if not done]
        if not pending:
            return written
    raise KeysKeptChanging(f"{cache.name}: {len(pending)} keys changed in every round")


def pointed_primary_key(cache: ModelCache, key: str) -> Flow[tuple[Any, ...] | None]:
    """The primary key a ``key_fields`` key points to, if the cache knows it."""
    try:
        found = cache.payload((yield Call("get_many", [key]))[0])
    except Exception:
        return None
    return tuple(found.body) if found is not None and found.kind == POINTER else None


def warm(cache: ModelCache, instances: Sequence[object]) -> Flow[int]:
    """Cache ``instances`` unconditionally (warm-up); how many were stored.

    Not under a generation a strict commit of the whole model marked and is still running
    (what was loaded may predate that commit). Entity keys are written blindly, over
    tombstones and markers alike.
    """
    try:
        tokens = cache.keys.generation_keys
        generation = yield from joined_token(cache, tokens, (yield Call("get_many", [*tokens])))
        if marked(generation, time.time()):  # a strict commit of the whole model in flight
            cache.counters.add("fills_refused", len(instances))
            return 0
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
