"""Everything one manager keeps for one cached model: its keys, payloads, stores and counters.

A :class:`ModelCache` answers the questions the read and write flows ask about a model without
any I/O: what key an ident has, whether stored bytes are a current entry of this model, which
rows a payload holds (and the instances they make, see :mod:`declcache._assemble`), what a
fill or a tombstone looks like. The flows (:mod:`declcache._reads`,
:mod:`declcache._invalidation`) decide what to ask the backend; its :attr:`store` and
:attr:`astore` are how it is asked.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import cachetools
from sqlalchemy import inspect
from sqlalchemy.orm.attributes import instance_state

from declcache._assemble import Assembler
from declcache._breaker import BackendUnavailable
from declcache._codec import ModelCodec, UnencodableValueError
from declcache._keys import KeyBuilder, normalized
from declcache._payload import ENTITY, POINTER, Payload, PayloadError, Payloads
from declcache._stats import Counters

if TYPE_CHECKING:
    from dogpile.cache.region import CacheRegion
    from sqlalchemy.orm import Mapper, Session

    from declcache._api import AsyncStore, Store
    from declcache._codec import Row
    from declcache._keys import Scope
    from declcache._meta import ModelSpec
    from declcache._stats import FaultLog, StatsHook

__all__ = ["SCOPES_KEPT", "TOKEN_TTL_FLOOR", "ModelCache"]

logger = logging.getLogger("declcache.manager")

#: How long a generation or list-version token lives on the server, at least.
TOKEN_TTL_FLOOR = 86_400
#: Scopes (tenants) a model keeps built keys for; the least recently used are rebuilt.
SCOPES_KEPT = 4096


class ModelCache:
    """One cached model, as one manager caches it.

    Args:
        spec: the model's resolved settings.
        keys: its keys, under the manager's prefix.
        region: its dogpile region (for the distributed fill lock).
        server_ttl: seconds its keys live on the server.
        store: its store, behind the manager's breaker.
        astore: the same for coroutines.
        max_value_bytes: payloads larger than this are not written.
        faults: the manager's rate-limited fault log.
        on_stats: the manager's counter hook.
        named_scopes: whether sessions can read in named scopes (a scope function is
            configured), so writes outside them must reach them too.
    """

    def __init__(
        self,
        spec: ModelSpec,
        keys: KeyBuilder,
        region: CacheRegion,
        store: Store,
        astore: AsyncStore,
        *,
        server_ttl: int,
        max_value_bytes: int,
        faults: FaultLog,
        on_stats: StatsHook | None,
        named_scopes: bool = False,
    ) -> None:
        mapper: Mapper[Any] = inspect(spec.model)
        self.spec = spec
        self.mapper = mapper
        self.model: type = spec.model
        self.name = spec.model.__name__
        self.keys = keys
        self.region = region
        self.store = store
        self.astore = astore
        self.codec = ModelCodec(mapper, allow_pickle=spec.allow_pickle)
        self.assembler = Assembler(mapper, self.codec)
        self.payloads = Payloads(spec.fingerprint, spec.format)
        self.counters = Counters(self.name, on_stats)
        self.ttl = spec.ttl
        self.server_ttl = server_ttl
        self.token_ttl = max(spec.ttl * 10, TOKEN_TTL_FLOOR)
        self._max_value_bytes = max_value_bytes
        self._faults = faults
        self.named_scopes = named_scopes
        self._scopes: cachetools.LRUCache[Scope, ModelCache] = cachetools.LRUCache(SCOPES_KEPT)
        self._scopes_lock = threading.Lock()

    def scoped(self, scope: Scope) -> ModelCache:
        """This model's cache in ``scope``: the same stores, counters and codec; its keys.

        Keys are built for a scope once (while it is among the :data:`SCOPES_KEPT` recent).
        """
        if scope == self.keys.scope:
            return self
        with self._scopes_lock:
            found = self._scopes.get(scope)
            if found is None:
                found = copy.copy(self)
                found.keys = self.keys.scoped(scope)
                self._scopes[scope] = found
            return found

    # -- faults ----------------------------------------------------------------------------

    def fault(self, operation: str, error: Exception) -> None:
        """A backend call failed: count it, log it (rate-limited); the caller degrades."""
        self.counters.add("errors")
        if isinstance(error, BackendUnavailable):  # the breaker is open: nothing was called
            self.counters.add("short_circuited")
            return  # the breaker logged when it opened
        self._faults.warning(
            f"{operation}:{type(error).__name__}",
            "cache %s failed for %s (%s), using the database: %s",
            operation,
            self.name,
            self._faults.target,
            error,
        )

    # -- reading stored values -------------------------------------------------------------

    def payload(self, raw: bytes | None) -> Payload | None:
        """The payload ``raw`` holds, whatever its generation and age; ``None`` if none.

        A value that is not a payload of this model counts as an error and is ``None``.
        """
        try:
            return self.payloads.parse(raw)
        except PayloadError as error:
            self._undecodable(error)
            return None

    def _undecodable(self, error: PayloadError) -> None:
        self.counters.add("errors")
        logger.warning("%s: ignoring an undecodable cache payload: %s", self.name, error)

    def current(self, raw: bytes | None, generation: str) -> Payload | None:
        """The payload ``raw`` holds if written under ``generation`` and not expired."""
        try:
            found = self.payloads.parse(raw)  # not self.payload(): a hit asks this every time
        except PayloadError as error:
            self._undecodable(error)
            return None
        if found is None:
            return None
        if found.generation != generation or time.time() - found.created_at >= self.ttl:
            return None
        return found

    def rows(self, payload: Payload, bodies: list[list[Any]]) -> list[Row] | None:
        """The typed rows of ``bodies`` (a payload's column values); ``None`` if bad.

        They are decoded once per payload; :meth:`instances` makes new instances of them.
        """
        decoded = payload.rows
        if decoded is None:
            try:
                decoded = [self.codec.decode_row(values) for values in bodies]
            except Exception as error:
                self.counters.add("errors")
                logger.warning("%s: ignoring an undecodable cached entity: %r", self.name, error)
                return None
            payload.rows = decoded
        return decoded

    def instances(self, rows: list[Row], session: Session | None) -> list[Any]:
        """Instances of ``rows``: persistent in ``session`` as if it loaded them, else detached.

        See :mod:`declcache._assemble`.
        """
        return self.assembler.instances(rows, session)

    def owns(self, row: Row, key: str) -> bool:
        """Whether ``key`` is one of ``row``'s keys (asked once per remembered payload)."""
        return key in self.keys.of_instance(self.codec.build(row)).values()

    def pointer_target(self, pointer: Payload) -> str | None:
        """The primary-key entry a ``key_fields`` pointer leads to; ``None`` if malformed."""
        if len(pointer.body) != len(self.keys.primary_key):
            return None
        return self.keys.entity_key(self.keys.primary_key, pointer.body)

    # -- writing values --------------------------------------------------------------------

    def fitting(self, payload: bytes | None) -> bytes | None:
        """``payload``, or ``None`` (counted) when it is larger than ``max_value_bytes``."""
        if payload is not None and len(payload) > self._max_value_bytes:
            logger.debug("%s not cached: %d bytes", self.name, len(payload))
            self.counters.add("oversized")
            return None
        return payload

    def entity_payload(self, generation: str, instance: object) -> bytes | None:
        """The payload caching ``instance``; ``None`` when it cannot be cached."""
        if type(instance) is not self.model:  # a polymorphic subclass has other columns
            return None
        try:
            payload = self.payloads.dump(generation, ENTITY, *self.codec.encode(instance))
        except (UnencodableValueError, TypeError, ValueError, OverflowError) as error:
            logger.debug("%s not cached: %s", self.name, error)
            return None
        return self.fitting(payload)

    def pointer_payload(self, generation: str, instance: object) -> bytes:
        """What a ``key_fields`` key holds: the primary key, as canonical text."""
        primary_key = self.keys.primary_key
        loaded = instance_state(instance).dict
        values = normalized(self.mapper, primary_key, [loaded[name] for name in primary_key])
        return self.payloads.dump(generation, POINTER, *values)

    def entity_writes(self, generation: str, instance: object) -> dict[str, bytes] | None:
        """Every key of ``instance`` and what it holds: the entity, and pointers to it."""
        payload = self.entity_payload(generation, instance)
        if payload is None:
            return None
        keys = self.keys.of_instance(instance)
        writes = {keys.pop(self.keys.primary_key): payload}
        if keys:
            pointer = self.pointer_payload(generation, instance)
            writes.update(dict.fromkeys(keys.values(), pointer))
        return writes
