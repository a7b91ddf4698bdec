"""CacheManager: one dogpile region per cached model, and every read and write of the cache.

The manager is the only place that talks to a backend. Every backend call is guarded: a fault
(the server is down, a payload is corrupt or foreign) is logged, counted and answered as a miss,
so the caller falls back to the database and never sees the cache fail.

How a read stays correct (see docs/invalidation.md):

* every entity payload carries the model's *generation* token, read in the same round trip
  (``MGET generation, key``); a bulk statement or ``invalidate_model`` draws a new random
  token, which turns every older entry of the model into a miss at once;
* invalidating an entity overwrites its keys with a unique *tombstone*; a fill after a database
  read is a compare-and-set against exactly what the reader saw before querying, so a reader
  that queried before a commit can never write the old row over the commit's tombstone;
* every list payload carries the model's *list version* token, replaced on every change.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import inspect
from sqlalchemy.orm.attributes import instance_state

from declcache import _backends, _freshness, _wire
from declcache._aio import AsyncReader, async_reader_for
from declcache._api import Ident, Lookup
from declcache._breaker import BackendUnavailable, Breaker, BreakerStats, GuardedStore
from declcache._codec import ModelCodec, Row, UnencodableValueError
from declcache._keys import KeyBuilder, normalized
from declcache._lru import LRUDict
from declcache._meta import ModelSpec, resolve_spec
from declcache._near import NearCache, NearCacheStats, NearStore
from declcache._registry import cached_models, declared_meta
from declcache._replay import ReplayQueue
from declcache._stats import Counters, FaultLog, ModelStats, StatsHook
from declcache._store import Store, Swap, store_for
from declcache.exceptions import SettingsError
from declcache.settings import CacheConfig

if TYPE_CHECKING:
    from dogpile.cache.region import CacheRegion
    from sqlalchemy.orm import Mapper

__all__ = ["CacheManager", "ModelChanges"]

logger = logging.getLogger("declcache.manager")

#: How long a generation or list-version token lives on the server, at least.
TOKEN_TTL_FLOOR = 86_400

_ENTITY, _NOT_FOUND, _POINTER, _LIST = "e", "n", "p", "l"

#: Parsed tokens each model remembers (its generation and list version, and a few old ones).
_REMEMBERED_TOKENS = 8
#: Parsed payloads each model remembers by their raw bytes, so that a hot entry is parsed and
#: decoded once rather than on every read; the memo is emptied when either bound is reached.
REMEMBERED_PAYLOADS = 4096
REMEMBERED_PAYLOAD_BYTES = 8 * 1024 * 1024


def _passthrough(payload: Any) -> Any:
    """Region (de)serializer: payloads are bytes declcache encoded itself."""
    return payload


@dataclass
class ModelChanges:
    """What one transaction changed in one model, collected by the session listeners.

    Attributes:
        keys: ``(key fields, values)`` of every entity key to invalidate, old and new.
        whole_model: a bulk or textual statement wrote rows nobody listed.
    """

    keys: set[tuple[tuple[str, ...], tuple[Any, ...]]] = field(default_factory=set)
    whole_model: bool = False

    def merge(self, other: ModelChanges) -> None:
        """Add ``other``'s changes to these."""
        self.keys |= other.keys
        self.whole_model |= other.whole_model

    @property
    def size(self) -> int:
        """How many keys invalidating these changes writes."""
        return len(self.keys) + 1


@dataclass
class _Ticket:
    """What a read saw, so that the fill after the database query can be refused if stale."""

    generation: str
    observed: dict[str, bytes | None]
    started: float


@dataclass(slots=True)
class _Entry:
    """A stored payload, parsed; remembered by its raw bytes (see ``_ModelCache.entry``).

    Attributes:
        created_at: when it was written (dogpile's metadata).
        generation: the generation (or list version) it was written under.
        kind: entity, not found, pointer or list.
        body: what follows the kind: column values, a primary key, rows or a count.
        rows: the typed rows of an entity or a list, decoded on the first read that needs them.
        owner: the key an entity was last found to belong to (see ``_ModelCache.owns``).
    """

    created_at: float
    generation: Any
    kind: Any
    body: list[Any]
    rows: list[Row] | None = None
    owner: str | None = None


class Probe(NamedTuple):
    """What a look-up found, and what it saw: a miss passes it on to fill without a 2nd look.

    Attributes:
        results: per ident, the instance, ``Lookup.NOT_FOUND`` or ``Lookup.MISS``.
        ticket: what the backend held when looked up; ``None`` when it was not asked.
        keys: per ident, its cache key (``None`` when it cannot have one).
    """

    results: list[Any]
    ticket: _Ticket | None
    keys: list[str | None]


class ListProbe(NamedTuple):
    """A cached query result (or ``Lookup.MISS``) and the list version it was looked up under."""

    result: Any
    version: str | None


class _ModelCache:
    """Everything one manager keeps for one cached model."""

    def __init__(
        self,
        spec: ModelSpec,
        region: CacheRegion,
        keys: KeyBuilder,
        breaker: Breaker,
        on_stats: StatsHook | None,
        *,
        near: NearCache | None = None,
    ) -> None:
        mapper: Mapper[Any] = inspect(spec.model)
        self.spec = spec
        self.mapper = mapper
        self.model: type = spec.model
        self.name = spec.model.__name__
        self.region = region
        store: Store = store_for(region.backend)
        self.near: NearStore | None = None
        if near is not None:
            store = self.near = near.wrap(store, region.backend)
        self.store = GuardedStore(store, breaker)
        self.keys = keys
        self.codec = ModelCodec(mapper)
        self.format = spec.format
        self.fingerprint = spec.fingerprint
        self.counters = Counters(self.name, on_stats)
        self.ttl = spec.ttl
        self.server_ttl = spec.ttl + _backends.SERVER_EXPIRY_GRACE
        self.token_ttl = max(spec.ttl * 10, TOKEN_TTL_FLOOR)
        self.generation_key = keys.named_key("generation")
        self.version_key = keys.named_key("list-version")
        self._tokens: dict[bytes, str] = {}
        self.reader: AsyncReader | None = None
        self._entries: dict[bytes, _Entry] = {}
        self._entry_bytes = 0

    # -- keys ----------------------------------------------------------------------------

    def key_of(self, fields: tuple[str, ...], values: Sequence[Any]) -> str:
        return self.keys.entity_key(fields, values)

    def ident_key(self, ident: Ident) -> tuple[tuple[str, ...], str]:
        """``(key fields, key)`` of the entity ``ident`` names.

        Raises:
            ValueError: ``ident`` names no key of this model or cannot be normalised.
        """
        if isinstance(ident, Mapping):
            for key_set in self.spec.key_fields:
                if set(key_set) == set(ident):
                    return key_set, self.key_of(key_set, [ident[name] for name in key_set])
            known = list(self.spec.key_fields)
            raise ValueError(f"{sorted(ident)} is not a key of {self.name}; keys are {known}")
        values = ident if isinstance(ident, tuple) else (ident,)
        return self.spec.primary_key, self.key_of(self.spec.primary_key, values)

    def owns(self, instance: object, key: str) -> bool:
        """Whether ``key`` is one of ``instance``'s keys (asked once per remembered payload)."""
        return key in self.entity_keys(instance).values()

    def entity_keys(self, instance: object) -> dict[tuple[str, ...], str]:
        """Every key ``instance`` is known by, per key-field set (``None`` values skipped)."""
        loaded = _state_dict(instance)
        keys = {}
        for key_set in self.spec.key_fields:
            values = [loaded.get(name) for name in key_set]
            if all(value is not None for value in values):
                keys[key_set] = self.key_of(key_set, values)
        return keys

    # -- payloads ------------------------------------------------------------------------

    def dump(self, generation: str, kind: str, *body: Any) -> bytes:
        payload = self.format.dumps([self.fingerprint, generation, kind, *body])
        return _wire.wrap(payload.encode() if isinstance(payload, str) else payload)

    def entity_payload(self, generation: str, instance: object) -> bytes | None:
        if type(instance) is not self.model:  # a polymorphic subclass has other columns
            return None
        try:
            return self.dump(generation, _ENTITY, *self.codec.encode(instance))
        except (UnencodableValueError, TypeError, ValueError, OverflowError) as error:
            logger.debug("%s not cached: %s", self.name, error)
            return None

    def pointer_payload(self, generation: str, instance: object) -> bytes:
        """What a ``key_fields`` key holds: the primary key, as canonical text."""
        primary_key = self.spec.primary_key
        values = [_state_dict(instance)[name] for name in primary_key]
        return self.dump(generation, _POINTER, *normalized(self.mapper, primary_key, values))

    def tombstone(self) -> bytes:
        payload = self.format.dumps([self.fingerprint, _wire.tombstone_marker()])
        return _wire.wrap(payload.encode() if isinstance(payload, str) else payload)

    def parse(self, raw: bytes | None, generation: str) -> _Entry | None:
        """The payload ``raw``, if current; ``None`` for absent, stale or expired ones.

        A payload that cannot be decoded at all counts as an error and is also ``None``.
        """
        entry = self.entry(raw)
        if entry is None:
            return None
        if entry.generation != generation or time.time() - entry.created_at >= self.ttl:
            return None
        return entry

    def entry(self, raw: bytes | None) -> _Entry | None:
        """The payload ``raw``, parsed, whatever its generation and age; ``None`` if none.

        Remembered by its raw bytes: equal bytes are the same payload, so parsing and
        decoding a hot entry once serves every later read of it, in every thread.
        """
        if raw is None:
            return None
        if type(raw) is bytes:
            remembered = self._entries.get(raw)
            if remembered is not None:
                return remembered
        try:
            created_at, payload = _wire.unwrap(raw)
            data = self.format.loads(payload)
            if type(data) is not list or len(data) < 2 or data[0] != self.fingerprint:
                raise ValueError("a payload of another model, schema or format")
        except Exception as error:
            self.counters.add("errors")
            logger.warning("%s: ignoring an undecodable cache payload: %r", self.name, error)
            return None
        if len(data) < 3:  # a tombstone
            return None
        entry = _Entry(created_at, data[1], data[2], data[3:])
        if type(raw) is bytes:
            self._remember(raw, entry)
        return entry

    def _remember(self, raw: bytes, entry: _Entry) -> None:
        if (
            len(self._entries) >= REMEMBERED_PAYLOADS
            or self._entry_bytes + len(raw) > REMEMBERED_PAYLOAD_BYTES
        ):
            self._entries.clear()
            self._entry_bytes = 0
        self._entries[raw] = entry
        self._entry_bytes += len(raw)

    def instances(self, entry: _Entry, rows: list[list[Any]]) -> list[Any] | None:
        """Fresh detached instances of ``rows`` (an entry's column values); ``None`` if bad.

        The rows are decoded once per entry; each call builds new instances from them.
        """
        decoded = entry.rows
        if decoded is None:
            try:
                decoded = [self.codec.decode_row(values) for values in rows]
            except Exception as error:
                self.counters.add("errors")
                logger.warning("%s: ignoring an undecodable cached entity: %r", self.name, error)
                return None
            entry.rows = decoded
        build = self.codec.build
        return [build(row) for row in decoded]

    def token(self, raw: bytes | None) -> str | None:
        """The token a stored token value holds; ``None`` for none or garbage.

        Remembered by its raw bytes: every read parses the generation token, which changes
        only when the whole model is invalidated.
        """
        if raw is None:
            return None
        try:
            return self._tokens[raw]
        except (KeyError, TypeError):
            pass
        token = _parse_token(raw)
        if token is not None and isinstance(raw, bytes):
            if len(self._tokens) >= _REMEMBERED_TOKENS:
                self._tokens.clear()
            self._tokens[raw] = token
        return token


def _missed(idents: Sequence[Ident]) -> Probe:
    """The probe of a look-up that asked nothing: every ident a miss, nothing to fill against."""
    return Probe([Lookup.MISS] * len(idents), None, [None] * len(idents))


def _state_dict(instance: object) -> dict[str, Any]:
    loaded: dict[str, Any] = instance_state(instance).dict
    return loaded


def _match(model: type, idents: Sequence[Ident], loaded: list[Any]) -> list[Any]:
    """For each ident, the loaded instance it names, or ``None``."""
    mapper: Mapper[Any] = inspect(model)
    primary_key = tuple(mapper.get_property_by_column(column).key for column in mapper.primary_key)
    indexes: dict[tuple[str, ...], dict[tuple[str, ...], Any]] = {}
    matches = []
    for ident in idents:
        fields = tuple(ident) if isinstance(ident, Mapping) else primary_key
        if isinstance(ident, Mapping):
            values = tuple(ident.values())
        else:
            values = ident if isinstance(ident, tuple) else (ident,)
        if fields not in indexes:
            index = indexes[fields] = {}
            for item in loaded:
                state = _state_dict(item)
                index[normalized(mapper, fields, [state.get(name) for name in fields])] = item
        try:
            matches.append(indexes[fields].get(normalized(mapper, fields, values)))
        except (ValueError, TypeError, KeyError):
            matches.append(None)
    return matches


def _parse_token(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return _wire.unwrap(raw)[1].decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None


class CacheManager:
    """Caches the models that declare a ``CacheMeta``; one dogpile region per model.

    Args:
        config: how to cache; ``None`` means ``CacheConfig()`` (memory backend, defaults).
            Use :meth:`CacheConfig.from_env` to read ``DECLCACHE_*`` variables.
        on_stats: called with ``(model name, counter name, amount)`` on every increment of
            a :meth:`stats` counter, e.g. to add it to an OpenTelemetry or Prometheus
            counter. It runs in the caller's thread and must be quick; what it raises is
            logged and ignored.

    A disabled config (``enabled=False``), or a missing dogpile.cache, gives a manager that
    caches nothing: every lookup misses and every write is a no-op.
    """

    def __init__(
        self, config: CacheConfig | None = None, *, on_stats: StatsHook | None = None
    ) -> None:
        self._config = config if config is not None else CacheConfig()
        self._on_stats = on_stats
        self._caches: dict[type, _ModelCache | None] = {}
        self._lock = threading.RLock()
        self._faults = FaultLog(logger)
        self._first_region: CacheRegion | None = None
        self._readers: list[tuple[Any, AsyncReader]] = []  # (sync pool, its async twin)
        self._memory = LRUDict(self._config.memory_max_entries)
        self._breaker = Breaker(self._config.breaker_interval)
        self._enabled = self._config.enabled and self._dogpile_available()
        self._near = (
            NearCache(self._config.key_prefix, self._config.near_cache_max_entries)
            if self._enabled and self._config.near_cache
            else None
        )
        if self._enabled:
            _freshness.install()
        self._queue = ReplayQueue(self._write_replayed)

    @staticmethod
    def _dogpile_available() -> bool:
        try:
            import dogpile.cache  # noqa: F401, PLC0415 - optional at run time by contract
        except ImportError:
            logger.warning("dogpile.cache is not installed: caching is off (pip install declcache)")
            return False
        return True

    @property
    def config(self) -> CacheConfig:
        """The configuration this manager was built with."""
        return self._config

    @property
    def enabled(self) -> bool:
        """``False`` when caching is off or dogpile.cache is missing: everything misses."""
        return self._enabled

    @property
    def blocking(self) -> bool:
        """Whether backend calls do network or file I/O (async callers run them in a thread)."""
        return self._enabled and self._config.backend not in {
            "dogpile.cache.memory",
            "dogpile.cache.null",
        }

    def spec(self, model: type) -> ModelSpec | None:
        """The resolved settings of ``model``; ``None`` if it declares no CacheMeta.

        Raises:
            CacheMetaError: the model's CacheMeta is invalid.
            SettingsError: a per-model override of it is invalid.
        """
        cache = self._caches.get(model)
        if cache is not None:
            return cache.spec
        declared = declared_meta(model)
        if declared is None:
            return None
        return resolve_spec(inspect(model), declared, self._config)

    def is_cached(self, model: type) -> bool:
        """Whether this manager caches ``model`` (it has a CacheMeta and is enabled)."""
        return self._cache(model) is not None

    def _cache(self, model: type) -> _ModelCache | None:
        try:
            return self._caches[model]
        except KeyError:
            pass
        with self._lock:
            if model not in self._caches:
                self._caches[model] = self._build_cache(model)
            return self._caches[model]

    def _build_cache(self, model: type) -> _ModelCache | None:
        if not self._enabled:
            return None
        spec = self.spec(model)
        if spec is None or not spec.enabled:
            return None
        region = self._make_region(spec)
        keys = KeyBuilder(self._config.key_prefix, inspect(model), spec.serializer)
        cache = _ModelCache(spec, region, keys, self._breaker, self._on_stats, near=self._near)
        if self._near is None:  # with a near cache, a look-up may well need no I/O at all
            cache.reader = self._reader_for(region.backend)
        return cache

    def _reader_for(self, backend: Any) -> AsyncReader | None:
        """The async twin of ``backend``'s connection pool; one per pool.

        Models that share the sync pool (:func:`_backends.share_connections`) share their
        async connections too, and a breaker probe's reset reaches all of them.
        """
        pool = getattr(getattr(backend, "reader_client", None), "connection_pool", None)
        for known, reader in self._readers:
            if known is pool:
                return reader
        found = async_reader_for(backend, self._breaker)
        if found is not None:
            self._readers.append((pool, found))
        return found

    def _make_region(self, spec: ModelSpec) -> CacheRegion:
        from dogpile.cache import make_region  # noqa: PLC0415
        from dogpile.cache.exception import PluginNotFound  # noqa: PLC0415

        backend = self._config.backend
        arguments = _backends.backend_arguments(backend, dict(self._config.arguments), spec.ttl)
        if backend == "dogpile.cache.memory":
            arguments.setdefault("cache_dict", self._memory)
        if self._first_region is not None:
            arguments = _backends.share_connections(backend, self._first_region.backend, arguments)
        region = make_region(
            name=f"declcache:{spec.model.__name__}",
            serializer=_passthrough,
            deserializer=_passthrough,
        )
        try:
            region.configure(
                _backends.dogpile_backend_name(backend),
                expiration_time=spec.ttl,
                arguments=arguments,
            )
        except PluginNotFound:
            raise SettingsError(
                self._config.setting_name("backend"),
                f"unknown dogpile backend {backend!r} (memory, redis, pymemcache, dbm, null…)",
            ) from None
        except ImportError as error:
            raise SettingsError(
                self._config.setting_name("backend"),
                f"{backend!r} needs a client library: {error} (pip install 'declcache[all]')",
            ) from None
        if self._first_region is None:
            self._first_region = region
        return region

    def _fault(self, cache: _ModelCache, operation: str, error: Exception) -> None:
        cache.counters.add("errors")
        if isinstance(error, BackendUnavailable):  # the breaker is open: nothing was called
            cache.counters.add("short_circuited")
            return  # the breaker logged when it opened
        self._faults.warning(
            f"{operation}:{type(error).__name__}",
            "cache %s failed for %s, using the database: %r",
            operation,
            cache.name,
            error,
        )

    def _usable(self, model: type) -> _ModelCache | None:
        """The model's cache, unless its invalidations are still waiting for the backend."""
        cache = self._cache(model)
        if cache is None:
            return None
        if self._queue:
            self._queue.replay()
            if self._queue.holds(model):
                return None
        return cache

    # -- tokens --------------------------------------------------------------------------

    def _token(self, cache: _ModelCache, key: str, raw: bytes | None) -> str:
        """The token stored at ``key``, creating one when there is none (or garbage)."""
        token = cache.token(raw)
        if token is not None:
            return token
        fresh = _wire.new_token()
        wrapped = _wire.wrap(fresh.encode("ascii"))
        if cache.store.add(key, wrapped, cache.token_ttl):
            return fresh
        token = cache.token(cache.store.get_many([key])[0])
        if token is not None:
            return token
        cache.store.set_many({key: wrapped}, cache.token_ttl)
        return fresh

    # -- entity reads ----------------------------------------------------------------------

    def _read(self, cache: _ModelCache, keys: list[str]) -> tuple[list[Any], _Ticket]:
        """Look ``keys`` up; results are instances, ``NOT_FOUND`` or ``MISS``.

        A ``key_fields`` key holds a pointer to the primary key; pointers are followed in a
        second round trip. An entity is only returned under a key it really has: a payload
        copied under another row's key is a foreign value, hence a miss.
        """
        started = time.monotonic()
        raws = cache.store.get_many([cache.generation_key, *keys])
        return self._read_raws(cache, keys, raws, started)

    def _read_raws(
        self, cache: _ModelCache, keys: list[str], raws: list[bytes | None], started: float
    ) -> tuple[list[Any], _Ticket]:
        """:meth:`_read` of the values fetched at ``started``: the token's, then the keys'.

        Creates the generation token if there is none, and follows pointers.
        """
        generation = self._token(cache, cache.generation_key, raws[0])
        read = self._resolve(
            cache, keys, raws[1:], generation, started, follow=cache.store.get_many
        )
        assert read is not None  # with a way to follow pointers, it always resolves
        return read

    def _resolve(
        self,
        cache: _ModelCache,
        keys: list[str],
        raws: list[bytes | None],
        generation: str,
        started: float,
        *,
        follow: Callable[[list[str]], list[bytes | None]] | None,
    ) -> tuple[list[Any], _Ticket] | None:
        """What ``raws`` (the values of ``keys``) hold, read under ``generation``.

        ``follow`` fetches the entities pointers lead to; without it (an awaited look-up
        cannot call the backend again) a pointer makes the result ``None``.
        """
        ticket = _Ticket(generation, dict(zip(keys, raws, strict=True)), started)
        parsed = [cache.parse(raw, generation) for raw in raws]
        pointers = {
            index: cache.key_of(cache.spec.primary_key, item.body)
            for index, item in enumerate(parsed)
            if item is not None
            and item.kind == _POINTER
            and len(item.body) == len(cache.spec.primary_key)
        }
        if pointers:
            if follow is None:
                return None
            targets = list(dict.fromkeys(pointers.values()))
            target_raws = follow(targets)
            ticket.observed.update(zip(targets, target_raws, strict=True))
            found = dict(zip(targets, target_raws, strict=True))
            for index, target in pointers.items():
                item = cache.parse(found[target], generation)
                parsed[index] = item if item is not None and item.kind == _ENTITY else None
        results = [
            self._entity_result(cache, key, item, via_pointer=index in pointers)
            for index, (key, item) in enumerate(zip(keys, parsed, strict=True))
        ]
        return results, ticket

    @staticmethod
    def _entity_result(
        cache: _ModelCache, key: str, parsed: _Entry | None, *, via_pointer: bool
    ) -> Any:
        if parsed is None:
            return Lookup.MISS
        kind = parsed.kind
        if kind == _NOT_FOUND:
            return Lookup.NOT_FOUND
        if kind == _POINTER:  # a pointer that did not lead to an entity
            return Lookup.MISS
        if kind != _ENTITY:
            cache.counters.add("errors")
            logger.warning("%s: ignoring a cache payload of unknown kind %r", cache.name, kind)
            return Lookup.MISS
        built = cache.instances(parsed, [parsed.body])
        if built is None:
            return Lookup.MISS
        instance = built[0]
        if parsed.owner == key:  # these very bytes were already found to be this row's
            return instance
        if cache.owns(instance, key):
            parsed.owner = key
            return instance
        if via_pointer:  # the row's key field changed while its old value was unknown
            logger.debug("%s: %s points to a row that no longer has it", cache.name, key)
            return Lookup.MISS
        cache.counters.add("errors")
        logger.warning("%s: ignoring a cache payload that does not belong to %s", cache.name, key)
        return Lookup.MISS

    def get(self, model: type, ident: Ident) -> Any:
        """The cached entity ``ident`` names, :attr:`Lookup.NOT_FOUND`, or :attr:`Lookup.MISS`.

        ``ident`` is a primary-key value, a tuple for a composite primary key, or a mapping
        ``{field: value}`` of the primary key or of a ``key_fields`` set.
        """
        return self.probe(model, [ident]).results[0]

    def get_many(self, model: type, idents: Sequence[Ident]) -> list[Any]:
        """:meth:`get` for several entities in one backend round trip, in the order asked."""
        return self.probe(model, idents).results

    def probe(self, model: type, idents: Sequence[Ident]) -> Probe:
        """:meth:`get_many`, keeping what the backend held for a fill after a miss.

        A caller that answers hits itself and loads only on a miss (the repositories) hands
        the probe to :meth:`load_many`, so a miss costs one look-up, not two.
        """
        cache = self._usable(model)
        if cache is None or not idents:
            return _missed(idents)
        keys, wanted = self._keys(cache, idents)
        try:
            found, ticket = self._read(cache, wanted)
        except Exception as error:
            self._fault(cache, "get", error)
            cache.counters.add("misses", len(idents))
            return _missed(idents)
        return self._probed(cache, keys, wanted, found, ticket)

    async def aprobe(self, model: type, idents: Sequence[Ident]) -> Probe:
        """:meth:`probe` for a coroutine: never blocks the event loop.

        On a single Redis server the look-up is awaited through ``redis.asyncio``; with a
        near cache that holds every key, it is answered on the loop; the memory backend
        answers on the loop too. Other backends with I/O run :meth:`probe` in a worker
        thread; so does what an awaited look-up leaves to do (a token to create, a pointer
        to follow), with the values it already fetched.
        """
        cache = self._usable(model)
        if cache is None or not idents:
            return _missed(idents)
        if not self.blocking:
            return self.probe(model, idents)
        if not self._loop_readable(cache):
            return await asyncio.to_thread(self.probe, model, idents)
        keys, wanted = self._keys(cache, idents)
        try:
            started = time.monotonic()
            raws = await self._raws_on_loop(cache, [cache.generation_key, *wanted])
            if raws is None:  # the near cache lacks a key
                return await asyncio.to_thread(self.probe, model, idents)
            generation = cache.token(raws[0])
            read = None
            if generation is not None:
                read = self._resolve(cache, wanted, raws[1:], generation, started, follow=None)
            if read is None:  # a token to create or a pointer to follow: more backend calls
                read = await asyncio.to_thread(self._read_raws, cache, wanted, raws, started)
        except Exception as error:
            self._fault(cache, "get", error)
            cache.counters.add("misses", len(idents))
            return _missed(idents)
        return self._probed(cache, keys, wanted, *read)

    @staticmethod
    def _loop_readable(cache: _ModelCache) -> bool:
        """Whether a look-up can be tried on the event loop: an awaited Redis or a near cache."""
        return cache.reader is not None or cache.near is not None

    @staticmethod
    async def _raws_on_loop(cache: _ModelCache, keys: list[str]) -> list[bytes | None] | None:
        """The raw values of ``keys``, fetched without blocking the loop; ``None`` if it cannot.

        An awaited ``MGET`` on Redis, or the near cache when it holds every key.
        """
        if cache.reader is not None:
            return await cache.reader.get_many(keys)
        return None if cache.near is None else cache.near.peek_many(keys)

    @staticmethod
    def _keys(cache: _ModelCache, idents: Sequence[Ident]) -> tuple[list[str | None], list[str]]:
        """The cache key of each ident (``None`` if it can have none), and each key once."""
        keys: list[str | None] = []
        for ident in idents:
            try:
                keys.append(cache.ident_key(ident)[1])
            except (ValueError, TypeError, KeyError) as error:
                logger.debug("%s: %r cannot be a cache key: %s", cache.name, ident, error)
                keys.append(None)
        if len(keys) == 1:
            return keys, [] if keys[0] is None else [keys[0]]
        return keys, list(dict.fromkeys(key for key in keys if key is not None))

    @staticmethod
    def _probed(
        cache: _ModelCache,
        keys: list[str | None],
        wanted: list[str],
        found: list[Any],
        ticket: _Ticket,
    ) -> Probe:
        if len(wanted) == len(keys):  # every ident has a key, each its own: in order already
            results = found
        else:
            by_key = dict(zip(wanted, found, strict=True))
            results = [Lookup.MISS if key is None else by_key[key] for key in keys]
        misses = results.count(Lookup.MISS)
        if misses < len(results):
            cache.counters.add("hits", len(results) - misses)
        if misses:
            cache.counters.add("misses", misses)
        return Probe(results, ticket, keys)

    # -- read-through ----------------------------------------------------------------------

    def load(
        self, model: type, ident: Ident, loader: Callable[[], Any], *, probe: Probe | None = None
    ) -> Any:
        """The entity ``ident`` names, from the cache or else from ``loader()``; ``None`` if none.

        ``loader`` queries the database and returns the instance or ``None``. Its result is
        cached unless the entity was invalidated while it ran (no stale fill). ``probe`` is
        the :meth:`probe` of ``[ident]`` the caller already made, if any.
        """
        return self.load_many(model, [ident], lambda _missing: [loader()], probe=probe)[0]

    def load_many(
        self,
        model: type,
        idents: Sequence[Ident],
        loader: Callable[[list[Ident]], Iterable[Any]],
        *,
        probe: Probe | None = None,
    ) -> list[Any]:
        """Entities in the order asked (``None`` where no row), one query for all misses.

        ``loader(missing)`` receives the idents the cache could not answer and returns the
        instances the database has for them (in any order, ``None`` entries ignored).
        ``probe``: the :meth:`probe` of ``idents`` the caller just made; otherwise one is made.
        """
        if probe is None:
            probe = self.probe(model, idents)
        results, ticket, keys = list(probe.results), probe.ticket, probe.keys
        missing = [index for index, result in enumerate(results) if result is Lookup.MISS]
        if missing:
            loaded = [item for item in loader([idents[i] for i in missing]) if item is not None]
            matches = _match(model, [idents[i] for i in missing], loaded)
            for index, found in zip(missing, matches, strict=True):
                results[index] = found
            cache = self._cache(model)
            if cache is not None and ticket is not None:
                absent = [keys[i] for i in missing if results[i] is None]
                self._fill(cache, ticket, loaded, absent)
        return [None if result is Lookup.NOT_FOUND else result for result in results]

    def _fill(
        self, cache: _ModelCache, ticket: _Ticket, loaded: list[Any], absent: list[str | None]
    ) -> None:
        if time.monotonic() - ticket.started >= cache.ttl:
            return  # tombstones this read may have raced with could be gone: do not fill
        try:
            self._store_fill(cache, ticket, loaded, absent)
        except Exception as error:
            self._fault(cache, "fill", error)

    def _store_fill(
        self, cache: _ModelCache, ticket: _Ticket, loaded: list[Any], absent: list[str | None]
    ) -> None:
        swaps: list[Swap] = []
        for instance in loaded:
            if not _freshness.read_since(instance, ticket.started):
                logger.debug("%s not cached: read before the cache look-up", cache.name)
                cache.counters.add("fills_refused")
                continue
            payload = self._fitting(cache, cache.entity_payload(ticket.generation, instance))
            if payload is None:
                continue
            keys = cache.entity_keys(instance)
            primary = keys.pop(cache.spec.primary_key)
            swaps.append((primary, ticket.observed.get(primary), payload))
            if keys:
                pointer = cache.pointer_payload(ticket.generation, instance)
                swaps.extend((key, ticket.observed.get(key), pointer) for key in keys.values())
        if cache.spec.cache_not_found:
            not_found = cache.dump(ticket.generation, _NOT_FOUND)
            swaps.extend((key, ticket.observed.get(key), not_found) for key in absent if key)
        if not swaps:
            return
        stored = cache.store.compare_and_set(swaps, cache.server_ttl)
        written = sum(len(swap[2]) for swap, done in zip(swaps, stored, strict=True) if done)
        cache.counters.add("bytes", written)
        cache.counters.add("fills", sum(stored))
        cache.counters.add("fills_refused", len(stored) - sum(stored))

    def _fitting(self, cache: _ModelCache, payload: bytes | None) -> bytes | None:
        """``payload``, or ``None`` (counted) when it is larger than ``max_value_bytes``."""
        if payload is not None and len(payload) > self._config.max_value_bytes:
            logger.debug("%s not cached: %d bytes", cache.name, len(payload))
            cache.counters.add("oversized")
            return None
        return payload

    def set(self, model: type, instance: object) -> bool:
        """Cache ``instance`` (loaded from the database) under each of its keys; warm-up use.

        Returns:
            Whether it was stored: ``False`` when the model is not cached, a column is not
            loaded or not encodable, or the backend failed.
        """
        return self.set_many(model, [instance]) == 1

    def set_many(self, model: type, instances: Sequence[object]) -> int:
        """Cache several instances unconditionally; returns how many were stored."""
        cache = self._usable(model)
        if cache is None:
            return 0
        try:
            raw = cache.store.get_many([cache.generation_key])[0]
            generation = self._token(cache, cache.generation_key, raw)
            mapping: dict[str, bytes] = {}
            stored = 0
            for instance in instances:
                payload = self._fitting(cache, cache.entity_payload(generation, instance))
                if payload is None:
                    continue
                stored += 1
                keys = cache.entity_keys(instance)
                primary = keys.pop(cache.spec.primary_key)
                mapping[primary] = payload
                if keys:
                    pointer = cache.pointer_payload(generation, instance)
                    mapping.update(dict.fromkeys(keys.values(), pointer))
            if mapping:
                cache.store.set_many(mapping, cache.server_ttl)
        except Exception as error:
            self._fault(cache, "set", error)
            return 0
        cache.counters.add("bytes", sum(len(value) for value in mapping.values()))
        cache.counters.add("fills", stored)
        return stored

    # -- lists -----------------------------------------------------------------------------

    def load_list(
        self,
        model: type,
        query_key: str,
        loader: Callable[[], Any],
        *,
        probe: ListProbe | None = None,
    ) -> Any:
        """A cached query result for ``query_key``, else ``loader()``'s, cached under the version.

        ``loader`` returns a list of instances or an ``int`` (a count). A list result of
        instances is cached as their column values, so a hit builds fresh detached instances.
        ``probe``: the :meth:`probe_list` of ``query_key`` the caller just made, if any.
        """
        cache = self._usable(model)
        if cache is None:
            return loader()
        if probe is None:
            probe = self._probe_list(cache, query_key)
        if probe.result is not Lookup.MISS:
            return probe.result
        result = loader()
        if probe.version is not None:
            self._store_list(cache, cache.keys.named_key(f"q:{query_key}"), probe.version, result)
        return result

    def probe_list(self, model: type, query_key: str) -> ListProbe:
        """The cached result :meth:`load_list` would return for ``query_key``, or ``MISS``.

        The list version it was looked up under comes with it: :meth:`load_list` fills
        against it after a miss, without looking up again.
        """
        cache = self._usable(model)
        if cache is None:
            return ListProbe(Lookup.MISS, None)
        return self._probe_list(cache, query_key)

    async def aprobe_list(self, model: type, query_key: str) -> ListProbe:
        """:meth:`probe_list` for a coroutine: never blocks the event loop (see :meth:`aprobe`)."""
        cache = self._usable(model)
        if cache is None:
            return ListProbe(Lookup.MISS, None)
        if not self.blocking:
            return self._probe_list(cache, query_key)
        if not self._loop_readable(cache):
            return await asyncio.to_thread(self._probe_list, cache, query_key)
        key = cache.keys.named_key(f"q:{query_key}")
        try:
            raws = await self._raws_on_loop(cache, [cache.version_key, key])
            if raws is None:  # the near cache lacks a key
                return await asyncio.to_thread(self._probe_list, cache, query_key)
            if cache.token(raws[0]) is None:  # no list version yet: creating one is a write
                return await asyncio.to_thread(self._list_from_raws, cache, raws)
            return self._list_from_raws(cache, raws)
        except Exception as error:
            self._fault(cache, "get", error)
            return ListProbe(Lookup.MISS, None)

    def _probe_list(self, cache: _ModelCache, query_key: str) -> ListProbe:
        key = cache.keys.named_key(f"q:{query_key}")
        try:
            return self._list_from_raws(cache, cache.store.get_many([cache.version_key, key]))
        except Exception as error:
            self._fault(cache, "get", error)
            return ListProbe(Lookup.MISS, None)

    def _list_from_raws(self, cache: _ModelCache, raws: list[bytes | None]) -> ListProbe:
        """What the list version's and the query key's values hold (the version made if none)."""
        version = self._token(cache, cache.version_key, raws[0])
        return ListProbe(self._listed(cache, raws[1], version), version)

    def _listed(self, cache: _ModelCache, raw: bytes | None, version: str) -> Any:
        """The query result ``raw`` holds under ``version`` (counted), or ``MISS``."""
        cached = self._decode_list(cache, cache.parse(raw, version))
        cache.counters.add("misses" if cached is Lookup.MISS else "hits")
        return cached

    def fill_mutex(
        self, model: type, ident: Ident | None = None, *, query_key: str | None = None
    ) -> Any:
        """The backend's distributed lock for filling one entry; ``None`` when there is none.

        Only when the backend arguments say ``distributed_lock=True`` (dogpile's Redis and
        Memcached backends): a process holding it fills the entry ``ident`` (or the cached
        query ``query_key``) names while other processes wait, then read what it filled.
        The object has dogpile's mutex interface: ``acquire(wait=True)`` and ``release()``.
        """
        if not self._config.arguments.get("distributed_lock"):
            return None
        if self._breaker.state != "closed":  # the lock lives on the backend that failed
            return None
        cache = self._usable(model)
        if cache is None:
            return None
        try:
            if query_key is not None:
                key = cache.keys.named_key(f"q:{query_key}")
            else:
                key = cache.ident_key(ident)[1]
        except (ValueError, TypeError):
            return None
        return cache.region.backend.get_mutex(key)

    @staticmethod
    def _decode_list(cache: _ModelCache, parsed: _Entry | None) -> Any:
        if parsed is None or parsed.kind != _LIST:
            return Lookup.MISS
        body = parsed.body
        if len(body) == 1 and type(body[0]) is int:
            return body[0]
        items = cache.instances(parsed, body)
        return Lookup.MISS if items is None else items

    def _store_list(self, cache: _ModelCache, key: str, version: str, result: Any) -> None:
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
        payload = self._fitting(cache, cache.dump(version, _LIST, *body))
        if payload is None:
            return
        try:
            cache.store.set_many({key: payload}, cache.server_ttl)
        except Exception as error:
            self._fault(cache, "set", error)
            return
        cache.counters.add("bytes", len(payload))
        cache.counters.add("fills")

    # -- invalidation ----------------------------------------------------------------------

    def apply(self, changes: Mapping[type, ModelChanges]) -> None:
        """Invalidate what a committed transaction changed; never raises.

        What the backend cannot take now is queued and replayed when it answers again.
        """
        for model, change in changes.items():
            cache = self._cache(model)
            if cache is None:
                continue
            if self._queue:  # keep the order: nothing overtakes what is already queued
                self._enqueue(model, change)
                continue
            try:
                self._write_invalidation(cache, change)
            except Exception as error:
                self._fault(cache, "invalidate", error)
                self._enqueue(model, change)
        if self._queue:
            self._queue.replay()

    def _write_invalidation(self, cache: _ModelCache, change: ModelChanges) -> None:
        """Tombstones and new tokens in one ``write_many``: one round trip on Redis."""
        entries = []
        for fields_, values in change.keys:
            try:
                entries.append((cache.key_of(fields_, values), cache.tombstone(), cache.server_ttl))
            except (ValueError, TypeError):
                continue
        tokens = [cache.version_key]
        if change.whole_model:
            tokens.append(cache.generation_key)
        for key in tokens:
            entries.append((key, _wire.wrap(_wire.new_token().encode("ascii")), cache.token_ttl))
        cache.store.write_many(entries)
        cache.counters.add("invalidations", len(entries))

    def _enqueue(self, model: type, change: ModelChanges) -> None:
        cache = self._cache(model)
        kept = self._queue.add(model, change)
        if cache is not None:
            cache.counters.add("invalidations_queued" if kept else "invalidations_overflowed")

    def _write_replayed(self, model: type, change: ModelChanges | None) -> None:
        cache = self._cache(model)
        if cache is not None:
            self._write_invalidation(cache, change or ModelChanges(whole_model=True))

    def invalidate(self, model: type, key: Ident) -> bool:
        """Drop the cached entity ``key`` names, and every cached list of the model.

        Args:
            model: the mapped class.
            key: a primary-key value (a tuple for a composite key) or a mapping of a key set.

        Returns:
            ``False`` when the backend could not be reached (the invalidation is queued).
        """
        cache = self._cache(model)
        if cache is None:
            return True
        try:
            fields_, entity_key = cache.ident_key(key)
        except (ValueError, TypeError):
            return True
        values = tuple(key[name] for name in fields_) if isinstance(key, Mapping) else key
        values = values if isinstance(values, tuple) else (values,)
        change = ModelChanges(keys={(fields_, values)})
        if fields_ != cache.spec.primary_key:
            primary_key = self._pointed_primary_key(cache, entity_key)
            if primary_key is None:  # cached under a primary key we cannot know: drop all
                change.whole_model = True
            else:
                change.keys.add((cache.spec.primary_key, primary_key))
        return self._invalidate_now(model, change)

    def _pointed_primary_key(self, cache: _ModelCache, key: str) -> tuple[Any, ...] | None:
        """The primary key a ``key_fields`` key points to, if the cache knows it."""
        try:
            entry = cache.entry(cache.store.get_many([key])[0])
        except Exception:
            return None
        return tuple(entry.body) if entry is not None and entry.kind == _POINTER else None

    def invalidate_model(self, model: type) -> bool:
        """Drop every cached entity and list of ``model`` at once (a new generation token).

        Use it after writing the model's table outside the ORM (Core on a bare connection).
        """
        return self._invalidate_now(model, ModelChanges(whole_model=True))

    def clear(self) -> bool:
        """Drop everything this manager cached, for every model with a CacheMeta.

        Only this key prefix's tokens are replaced: nothing is scanned or flushed, so other
        applications on the same server are untouched.
        """
        results = [self.invalidate_model(model) for model in cached_models()]
        return all(results)

    def _invalidate_now(self, model: type, change: ModelChanges) -> bool:
        cache = self._cache(model)
        if cache is None:
            return True
        before = cache.counters.snapshot().invalidations_queued
        self.apply({model: change})
        return cache.counters.snapshot().invalidations_queued == before

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close this manager's connections to the backend; it reconnects on its next use.

        Call it when a process is done with the cache, as Django's ``cache.close()``
        (``SQLAlchemySyncConfig.dispose`` does). Invalidations queued during an outage get a
        last attempt first, so a process that exits does not take them along. Nothing
        cached is dropped. An async app awaits :meth:`aclose` instead.
        """
        if self._queue:
            self._queue.replay(now=True)
            if self._queue:
                logger.warning(
                    "closing with %d invalidations the backend has not taken: other processes"
                    " may read those rows from the cache until their ttl ends",
                    self._queue.size,
                )
        for cache in self._built_caches():
            cache.store.reset_connections()
        for _, reader in self._readers:
            reader.forget()
        if self._near is not None:
            self._near.close()

    async def aclose(self) -> None:
        """:meth:`close`, and close the running event loop's async Redis connections."""
        for _, reader in self._readers:
            try:
                await reader.aclose()
            except Exception as error:  # the connections are being given up either way
                logger.debug("closing an async Redis client: %r", error)
        await asyncio.to_thread(self.close)

    # -- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, ModelStats]:
        """Counters per cached model name, since this manager started."""
        return {cache.name: cache.counters.snapshot() for cache in self._built_caches()}

    def _built_caches(self) -> list[_ModelCache]:
        with self._lock:
            return [cache for cache in self._caches.values() if cache is not None]

    def breaker_stats(self) -> BreakerStats:
        """The circuit breaker in front of the backend: state, times opened, calls refused."""
        return self._breaker.stats()

    def near_cache_stats(self) -> NearCacheStats | None:
        """The near cache's hits, misses, size and tracking state; ``None`` without one."""
        return None if self._near is None else self._near.stats()

    @property
    def pending_invalidations(self) -> int:
        """Invalidations waiting for the backend to come back (0 when all is well)."""
        return self._queue.size
