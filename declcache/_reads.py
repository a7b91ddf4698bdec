"""Reads through the cache as flows: what to ask the backend, and what its answers mean. No I/O.

Each flow is a generator that yields :class:`~declcache._driver.Call` requests (a store
method and its arguments, or :data:`~declcache._driver.LOAD` for the database) and receives
their results; :mod:`declcache._driver` runs it on a sync store and loader or awaits it on an
async one, so the decisions below exist once for both. A store fault raised into a flow is
answered here (counted, logged, degraded to the database); a loader's exception is not.

How a read stays correct (see docs/invalidation.md):

* every entity payload carries the model's *generation* token, read in the same round trip
  (``MGET generation, key``); a bulk statement or ``invalidate_model`` draws a new random
  token, which turns every older entry of the model into a miss at once;
* invalidating an entity overwrites its keys with a unique *tombstone*; a fill after a database
  read is a compare-and-set against exactly what the reader saw before querying, so a reader
  that queried before a commit can never write the old row over the commit's tombstone;
* a fill is refused for a row read before the look-up or from a snapshot older than it
  (:mod:`declcache._freshness`), and for a read that took longer than the ttl (the tombstones
  it raced with may have expired);
* a row read from a replica that declares a lag of ``L`` seconds is only filled over values
  and tokens written more than ``L`` seconds before the look-up: a younger tombstone or token
  marks a commit the replica may not have applied yet (see :func:`lagging`);
* a look-up that saw a strict commit's *marker* still running (a commit in flight,
  :mod:`declcache._strict`) never fills: it reads the database, which may not have that
  commit yet (see :func:`lagging`); a marker reads as a miss, so it is never a hit either;
* every list payload carries the model's *list version* token, replaced on every change.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import inspect

from declcache import _freshness
from declcache._api import Lookup
from declcache._codec import Row, UnencodableValueError
from declcache._driver import LOAD, Call
from declcache._keys import match
from declcache._payload import (
    ENTITY,
    LIST,
    MARKER,
    NOT_FOUND,
    POINTER,
    PayloadError,
    is_marker,
    is_tombstone,
    marker_claims,
    new_token,
    token_claims,
    unwrap,
)

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from sqlalchemy.orm import Session

    from declcache._api import Ident, Swap
    from declcache._driver import Flow
    from declcache._model_cache import ModelCache
    from declcache._payload import Payload

__all__ = [
    "ListProbe",
    "Probe",
    "Ticket",
    "created_token",
    "fill_entry",
    "joined_token",
    "lagging",
    "load",
    "load_list",
    "marked",
    "missed",
    "probe",
    "probe_list",
]

logger = logging.getLogger("declcache.manager")


@dataclass
class Ticket:
    """What a read saw, so that the fill after the database query can be refused if stale.

    Attributes:
        generation: the model's generation token when looked up.
        observed: every key looked up, and the raw value it held.
        started: when the look-up began (monotonic).
        tokens: the raw values of the generation token keys (``None`` where it was missing
            and created): their write time bounds fills from a lagging replica.
    """

    generation: str
    observed: dict[str, bytes | None]
    started: float
    tokens: Sequence[bytes | None] = ()


class Probe(NamedTuple):
    """What a look-up found, and what it saw: a miss passes it on to fill without a 2nd look.

    Attributes:
        results: per ident, the instance, ``Lookup.NOT_FOUND`` or ``Lookup.MISS``.
        ticket: what the backend held when looked up; ``None`` when it was not asked.
        keys: per ident, its cache key (``None`` when it cannot have one).
    """

    results: list[Any]
    ticket: Ticket | None
    keys: list[str | None]


class ListProbe(NamedTuple):
    """A cached query result (or ``Lookup.MISS``) and the list version it was looked up under.

    Attributes:
        result: the cached result, or ``Lookup.MISS``.
        version: the list version (``None`` when the backend was not asked).
        tokens: the raw values of the list version keys, for a fill's replica-lag check.
        started: when the look-up began (monotonic), for a fill's freshness check.
    """

    result: Any
    version: str | None
    tokens: Sequence[bytes | None] = ()
    started: float = float("inf")


def missed(idents: Sequence[Ident]) -> Probe:
    """The probe of a look-up that asked nothing: every ident a miss, nothing to fill against."""
    return Probe([Lookup.MISS] * len(idents), None, [None] * len(idents))


# -- tokens ---------------------------------------------------------------------------------------


def created_token(cache: ModelCache, key: str) -> Flow[str]:
    """A new token at ``key``, where none (or garbage) was found; or another writer's.

    Callers parse the token they read first: ``payloads.token(raw) or (yield from …)``.
    """
    fresh = new_token()
    value = cache.payloads.token_value(fresh)
    if (yield Call("add", key, value, cache.token_ttl)):
        return fresh
    found = cache.payloads.token((yield Call("get_many", [key]))[0])
    if found is not None:
        return found
    yield Call("write_many", [(key, value, cache.token_ttl)])
    return fresh


def joined_token(cache: ModelCache, keys: Sequence[str], raws: Sequence[bytes | None]) -> Flow[str]:
    """The token an entry is written under, from the token ``keys`` (``raws``: what they hold).

    One key outside a named scope; in a named scope, its own token and the outside one, so a
    change to either turns the scope's entries into misses. Missing tokens are created.
    """
    found = []
    for key, raw in zip(keys, raws, strict=False):
        found.append(cache.payloads.token(raw) or (yield from created_token(cache, key)))
    return "|".join(found)


# -- entities -------------------------------------------------------------------------------------


def _keys_of(cache: ModelCache, idents: Sequence[Ident]) -> tuple[list[str | None], list[str]]:
    """The cache key of each ident (``None`` if it can have none), and each key once."""
    keys: list[str | None] = []
    for ident in idents:
        try:
            keys.append(cache.keys.of_ident(ident)[1])
        except (ValueError, TypeError, KeyError) as error:
            logger.debug("%s: %r cannot be a cache key: %s", cache.name, ident, error)
            keys.append(None)
    if len(keys) == 1:
        return keys, [] if keys[0] is None else [keys[0]]
    return keys, list(dict.fromkeys(key for key in keys if key is not None))


def probe(
    cache: ModelCache, idents: Sequence[Ident], session: Session | None = None
) -> Flow[Probe]:
    """Look ``idents`` up: one ``MGET`` of the generation token and their keys.

    A ``key_fields`` key holds a pointer to the primary key; pointers are followed in a
    second round trip. Returns a :class:`Probe`; a fault makes every ident a miss. Hits are
    persistent in ``session`` as if it had loaded them, or detached without one.
    """
    keys, wanted = _keys_of(cache, idents)
    tokens = cache.keys.generation_keys
    try:
        started = time.monotonic()
        raws = yield Call("get_many", [*tokens, *wanted])
        if len(tokens) == 1:  # unscoped, the common case: inline
            generation = cache.payloads.token(raws[0]) or (
                yield from created_token(cache, tokens[0])
            )
        else:
            generation = yield from joined_token(cache, tokens, raws)
        stored = raws[len(tokens) :]
        ticket = Ticket(
            generation, dict(zip(wanted, stored, strict=True)), started, raws[: len(tokens)]
        )
        parsed = [cache.current(raw, generation) for raw in stored]
        pointers = _pointers(cache, parsed, stored)
        if pointers:
            targets = list(dict.fromkeys(pointers.values()))
            found = dict(zip(targets, (yield Call("get_many", targets)), strict=True))
            ticket.observed.update(found)
            _follow(cache, parsed, pointers, found, generation)
        answers = [
            _entity(cache, key, item, via_pointer=index in pointers)
            for index, (key, item) in enumerate(zip(wanted, parsed, strict=True))
        ]
    except Exception as error:
        cache.fault("get", error)
        cache.counters.add("misses", len(idents))
        return missed(idents)
    results = _instances(cache, answers, session)
    if len(wanted) != len(keys):  # an ident without a key, or two idents of one key
        by_key = dict(zip(wanted, results, strict=True))
        results = [Lookup.MISS if key is None else by_key[key] for key in keys]
    misses = results.count(Lookup.MISS)
    if misses < len(results):
        cache.counters.add("hits", len(results) - misses)
    if misses:
        cache.counters.add("misses", misses)
    return Probe(results, ticket, keys)


def _pointers(
    cache: ModelCache, parsed: list[Payload | None], stored: Sequence[bytes | None]
) -> dict[int, str]:
    """Index of each ``key_fields`` pointer among ``parsed``, and the key it leads to.

    A miss whose key holds a tombstone naming a primary key (``stored``: the raw values) is
    one too: the entry it names is looked up with the live pointers' targets (so never on a
    hit), not to answer the read but so that the fill after its database read replaces
    what was seen there: else that fill, expecting nothing at the entry it did not look at,
    would meet the very commit's tombstone and be refused, and the next read would query
    again.
    """
    pointers = {}
    for index, current in enumerate(parsed):
        item = current
        if item is None:
            raw = stored[index]
            if raw is None:
                continue
            try:
                item = cache.payloads.parse(raw)  # remembered by current(): a dict look-up
            except PayloadError:
                continue
            if item is None or not is_tombstone(item):
                continue
        if item.kind == POINTER:
            target = cache.pointer_target(item)
            if target is not None:
                pointers[index] = target
    return pointers


def _follow(
    cache: ModelCache,
    parsed: list[Payload | None],
    pointers: dict[int, str],
    found: dict[str, bytes | None],
    generation: str,
) -> None:
    """Put in place of each pointer the entity it leads to (``found``), or ``None``.

    A tombstone naming a primary key (``None`` in ``parsed``) stays a miss: the entry it
    names was only looked up for the fill.
    """
    for index, target in pointers.items():
        if parsed[index] is None:
            continue
        item = cache.current(found[target], generation)
        parsed[index] = item if item is not None and item.kind == ENTITY else None


def _entity(cache: ModelCache, key: str, parsed: Payload | None, *, via_pointer: bool) -> Any:
    """What an entity key's payload answers: its :class:`Row`, ``NOT_FOUND`` or ``MISS``.

    An entity is only returned under a key it really has: a payload copied under another
    row's key is a foreign value, hence a miss.
    """
    if parsed is None:
        return Lookup.MISS
    kind = parsed.kind
    if kind == NOT_FOUND:
        return Lookup.NOT_FOUND
    if kind == POINTER:  # a pointer that did not lead to an entity
        return Lookup.MISS
    if kind != ENTITY:
        cache.counters.add("errors")
        logger.warning("%s: ignoring a cache payload of unknown kind %r", cache.name, kind)
        return Lookup.MISS
    rows = cache.rows(parsed, [parsed.body])
    if rows is None:
        return Lookup.MISS
    if parsed.owner == key:  # these very bytes were already found to be this row's
        return rows[0]
    if cache.owns(rows[0], key):
        parsed.owner = key
        return rows[0]
    if via_pointer:  # the row's key field changed while its old value was unknown
        logger.debug("%s: %s points to a row that no longer has it", cache.name, key)
        return Lookup.MISS
    cache.counters.add("errors")
    logger.warning("%s: ignoring a cache payload that does not belong to %s", cache.name, key)
    return Lookup.MISS


def _instances(cache: ModelCache, answers: list[Any], session: Session | None) -> list[Any]:
    """``answers`` with an instance in place of each :class:`Row`, all made at once.

    Persistent in ``session`` as if it loaded them, or detached without one.
    """
    rows = [item for item in answers if isinstance(item, Row)]
    if not rows:
        return answers
    made = iter(cache.instances(rows, session))
    return [next(made) if isinstance(item, Row) else item for item in answers]


def load(
    cache: ModelCache | None,
    model: type,
    idents: Sequence[Ident],
    seen: Probe | None,
    session: Session | None = None,
) -> Flow[list[Any]]:
    """Entities in the order asked (``None`` where no row); one database load for all misses.

    ``seen`` is the probe of ``idents`` the caller already made, if any; ``cache`` is ``None``
    when the cache may not answer (every ident is then loaded, nothing filled). Hits of a
    new probe enter ``session`` (see :func:`probe`).
    """
    if seen is None:
        seen = missed(idents) if cache is None else (yield from probe(cache, idents, session))
    results, ticket, keys = list(seen.results), seen.ticket, seen.keys
    missing = [index for index, result in enumerate(results) if result is Lookup.MISS]
    if missing:
        asked = [idents[i] for i in missing]
        loaded = [item for item in (yield Call(LOAD, asked)) if item is not None]
        mapper = inspect(model) if cache is None else cache.mapper
        for index, found in zip(missing, match(mapper, asked, loaded), strict=True):
            results[index] = found
        if cache is not None and ticket is not None:
            absent = [keys[i] for i in missing if results[i] is None]
            yield from _fill(cache, ticket, loaded, absent)
    return [None if result is Lookup.NOT_FOUND else result for result in results]


def _fill(
    cache: ModelCache, ticket: Ticket, loaded: list[Any], absent: list[str | None]
) -> Flow[None]:
    """Cache what the database returned, unless the look-up's view of it went stale."""
    if time.monotonic() - ticket.started >= cache.ttl:
        return  # tombstones this read may have raced with could be gone: do not fill
    try:
        swaps = _fill_swaps(cache, ticket, loaded, absent)
        if not swaps:
            return
        stored = yield Call("compare_and_set", swaps, cache.server_ttl)
    except Exception as error:
        cache.fault("fill", error)
        return
    written = sum(len(swap[2]) for swap, done in zip(swaps, stored, strict=True) if done)
    cache.counters.add("bytes", written)
    cache.counters.add("fills", sum(stored))
    cache.counters.add("fills_refused", len(stored) - sum(stored))


def _fill_swaps(
    cache: ModelCache, ticket: Ticket, loaded: list[Any], absent: list[str | None]
) -> list[Swap]:
    """One compare-and-set per key to fill, against what the look-up saw there."""
    swaps: list[Swap] = []
    for instance in loaded:
        if not _freshness.read_since(instance, ticket.started):
            logger.debug("%s not cached: read before the cache look-up", cache.name)
            cache.counters.add("fills_refused")
            continue
        writes = cache.entity_writes(ticket.generation, instance)
        if writes is None:
            continue
        expected = {key: ticket.observed.get(key) for key in writes}
        if lagging(cache, _freshness.replica_lag(instance), ticket, expected.values()):
            cache.counters.add("fills_refused")
            continue
        swaps.extend((key, expected[key], value) for key, value in writes.items())
    if cache.spec.cache_not_found:
        keys = [key for key in absent if key]
        seen = [ticket.observed.get(key) for key in keys]
        if keys and lagging(cache, _freshness.replica_lag_seen(), ticket, seen):
            cache.counters.add("fills_refused", len(keys))
            return swaps
        not_found = cache.payloads.dump(ticket.generation, NOT_FOUND)
        swaps.extend((key, raw, not_found) for key, raw in zip(keys, seen, strict=True))
    return swaps


def lagging(
    cache: ModelCache,
    lag: float,
    ticket: Ticket | ListProbe,
    seen: Collection[bytes | None],
) -> bool:
    """Whether a row read after this look-up may miss a commit, so must not be cached.

    Two kinds of commit can be missing from what the database answered:

    * one a strict writer had marked but maybe not yet committed: the look-up saw a marker
      still running, in a token or in one of the keys ``seen``; asked of every fill in every
      mode, at the price of one character test per token and one byte test per key;
    * one a replica lagging by up to ``lag`` seconds has not applied yet: the look-up saw a
      value in the keys (a tombstone, above all) or a token written less than ``lag``
      seconds before it. An empty key means no commit for ttl + grace seconds (a
      tombstone's life), so a lag longer than the ttl never fills. Wall clocks of
      different hosts are compared here: the declared lag must cover their skew.
    """
    version = ticket.generation if isinstance(ticket, Ticket) else ticket.version
    saw_marker = (version is not None and MARKER in version) or any(map(is_marker, seen))
    if saw_marker and _marked_at_look_up(ticket, version, seen):
        return True
    if lag <= 0:
        return False
    if lag >= cache.ttl:
        return True
    if None in ticket.tokens:
        return True  # created by this very look-up: as young as can be
    looked_up = time.time() - (time.monotonic() - ticket.started)
    for raw in (*ticket.tokens, *seen):
        if raw is None:
            continue
        try:
            written = unwrap(raw)[0]
        except ValueError:
            return True  # a value of unknown age
        if looked_up - written < lag:
            return True
    return False


def marked(version: str, at: float) -> bool:
    """Whether the token ``version`` holds a strict marker still running at ``at`` (wall clock)."""
    return MARKER in version and any(end > at for end in token_claims(version).values())


def _marked_at_look_up(
    ticket: Ticket | ListProbe, version: str | None, seen: Collection[bytes | None]
) -> bool:
    """Whether a marker the look-up saw was still running when it looked (then: no fill).

    Judged at the look-up, not now: a marker running then means the database read that
    followed may predate its commit, even if the marker ran out since.
    """
    if not math.isfinite(ticket.started):
        return True
    looked_up = time.time() - (time.monotonic() - ticket.started)
    if version is not None and marked(version, looked_up):
        return True
    for raw in seen:
        claims = marker_claims(raw)
        if claims and any(end > looked_up for end in claims.values()):
            return True
    return False


# -- query results --------------------------------------------------------------------------------


def probe_list(
    cache: ModelCache, query_key: str, session: Session | None = None
) -> Flow[ListProbe]:
    """The cached result of the query ``query_key`` names (or ``MISS``), and the list version.

    A cached list's instances are persistent in ``session``, or detached without one.
    """
    key = cache.keys.list_key(query_key)
    tokens = cache.keys.list_version_keys
    try:
        started = time.monotonic()
        raws = yield Call("get_many", [*tokens, key])
        version = yield from joined_token(cache, tokens, raws)
    except Exception as error:
        cache.fault("get", error)
        return ListProbe(Lookup.MISS, None)
    cached = _listed(cache, cache.current(raws[-1], version), session)
    if cached is not Lookup.MISS:
        cache.counters.add("hits")
        return ListProbe(cached, version)
    cache.counters.add("misses")
    return ListProbe(cached, version, raws[: len(tokens)], started)


def _listed(cache: ModelCache, parsed: Payload | None, session: Session | None) -> Any:
    if parsed is None or parsed.kind != LIST:
        return Lookup.MISS
    body = parsed.body
    if len(body) == 1 and type(body[0]) is int:
        return body[0]
    rows = cache.rows(parsed, body)
    return Lookup.MISS if rows is None else cache.instances(rows, session)


def load_list(
    cache: ModelCache, query_key: str, seen: ListProbe | None, session: Session | None = None
) -> Flow[Any]:
    """The cached result of ``query_key``, else the loader's, cached under the list version.

    The loader returns a list of instances or an ``int`` (a count). A list of instances is
    cached as their column values, so a hit makes instances of them anew (see
    :func:`probe_list`).
    """
    if seen is None:
        seen = yield from probe_list(cache, query_key, session)
    if seen.result is not Lookup.MISS:
        return seen.result
    result = yield Call(LOAD)
    if seen.version is not None and _list_fresh(cache, seen, result):
        yield from _store_list(cache, cache.keys.list_key(query_key), seen.version, result)
    return result


def _list_fresh(cache: ModelCache, seen: ListProbe, result: Any) -> bool:
    """Whether a loaded query result may be cached under the version the look-up saw.

    Its instances must have been read after the look-up, from a view no older than it, and
    no replica they came from may lag a version change. A count or an empty list names no
    session: the largest lag any replica of this process declared bounds it.
    """
    items = result if isinstance(result, list) else []
    if not all(_freshness.read_since(item, seen.started) for item in items if _mapped(item)):
        logger.debug("%s list not cached: read before the cache look-up", cache.name)
        cache.counters.add("fills_refused")
        return False
    lags = [_freshness.replica_lag(item) for item in items if _mapped(item)]
    lag = max(lags) if lags else _freshness.replica_lag_seen()
    if lagging(cache, lag, seen, ()):
        cache.counters.add("fills_refused")
        return False
    return True


def _mapped(item: Any) -> bool:
    return hasattr(item, "_sa_instance_state")


def _store_list(cache: ModelCache, key: str, version: str, result: Any) -> Flow[None]:
    if isinstance(result, int) and not isinstance(result, bool):
        body: list[Any] = [result]
    else:
        try:
            body = [cache.codec.encode(item) for item in result if type(item) is cache.model]
        except (UnencodableValueError, TypeError, ValueError) as error:
            logger.debug("%s list not cached: %s", cache.name, error)
            return
        if len(body) != len(result):
            return
    try:
        payload = cache.fitting(cache.payloads.dump(version, LIST, *body))
    except Exception as error:  # a custom format's dumps: never the caller's failure
        logger.debug("%s list not cached: %r", cache.name, error)
        cache.counters.add("errors")
        return
    yield from fill_entry(cache, key, payload)


def fill_entry(cache: ModelCache, key: str, payload: bytes | None) -> Flow[None]:
    """Write one list-versioned entry (``None``: nothing fits); a fault is counted, not raised."""
    if payload is None:
        return
    try:
        yield Call("write_many", [(key, payload, cache.server_ttl)])
    except Exception as error:
        cache.fault("set", error)
        return
    cache.counters.add("bytes", len(payload))
    cache.counters.add("fills")
