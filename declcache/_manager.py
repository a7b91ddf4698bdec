"""CacheManager: one dogpile region per cached model, and every read and write of the cache.

The manager is the only place that talks to a backend. Every call into dogpile is guarded: a
fault (the server is down, a payload is corrupt or foreign) is logged, counted and answered as
a miss, so the caller falls back to the database and never sees the cache fail.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from declcache import _backends
from declcache._api import Ident, Lookup
from declcache._codec import ModelCodec, UnencodableValueError
from declcache._keys import KeyBuilder
from declcache._meta import ModelSpec, resolve_spec
from declcache._registry import declared_meta
from declcache._stats import Counters, FaultLog, ModelStats
from declcache.exceptions import SettingsError
from declcache.settings import CacheConfig

if TYPE_CHECKING:
    from dogpile.cache.region import CacheRegion

__all__ = ["CacheManager"]

logger = logging.getLogger("declcache.manager")


def _passthrough(payload: Any) -> Any:
    """Region (de)serializer: payloads are bytes declcache encoded itself."""
    return payload


class _ModelCache:
    """Everything one manager keeps for one cached model."""

    __slots__ = ("codec", "counters", "fingerprint", "format", "keys", "model", "region", "spec")

    def __init__(self, spec: ModelSpec, region: CacheRegion, keys: KeyBuilder) -> None:
        from sqlalchemy import inspect  # noqa: PLC0415 - local to keep start-up imports lean

        self.spec = spec
        self.model = spec.model
        self.region = region
        self.keys = keys
        self.codec = ModelCodec(inspect(spec.model))
        self.format = spec.format
        self.fingerprint = spec.fingerprint
        self.counters = Counters()

    def ident_key(self, ident: Ident) -> str:
        """Key of the entity ``ident`` names: a primary key, or a mapping of a key set."""
        if isinstance(ident, Mapping):
            fields = tuple(ident)
            for key_set in self.spec.key_fields:
                if set(key_set) == set(fields):
                    return self.keys.entity_key(key_set, [ident[name] for name in key_set])
            raise ValueError(
                f"{sorted(fields)} is not a key of {self.model.__name__}; "
                f"keys are {list(self.spec.key_fields)}"
            )
        values = ident if isinstance(ident, tuple) else (ident,)
        return self.keys.entity_key(self.spec.primary_key, values)

    def instance_keys(self, instance: object, *, committed: bool = False) -> list[str]:
        """Every key ``instance`` is cached under: its primary key and each key-field set."""
        from sqlalchemy.orm.attributes import instance_state  # noqa: PLC0415

        state = instance_state(instance)
        source = state.committed_state if committed else {}
        loaded = state.dict
        keys = []
        for key_set in self.spec.key_fields:
            values = [source.get(name, loaded.get(name)) for name in key_set]
            if all(value is not None for value in values):
                keys.append(self.keys.entity_key(key_set, values))
        return keys

    def encode(self, instance: object) -> bytes | None:
        try:
            payload = self.format.dumps([self.fingerprint, *self.codec.encode(instance)])
        except (UnencodableValueError, TypeError, ValueError, OverflowError) as error:
            logger.debug("%s not cached: %s", self.model.__name__, error)
            return None
        return payload.encode() if isinstance(payload, str) else payload

    def not_found_payload(self) -> bytes:
        payload = self.format.dumps([self.fingerprint])
        return payload.encode() if isinstance(payload, str) else payload

    def decode(self, raw: Any) -> Any:
        """An instance, :attr:`Lookup.NOT_FOUND`, or :attr:`Lookup.MISS` for a bad payload."""
        try:
            data = self.format.loads(raw)
            if not isinstance(data, list) or not data or data[0] != self.fingerprint:
                raise ValueError("payload of another model, schema or format")
            if len(data) == 1:
                return Lookup.NOT_FOUND
            return self.codec.decode(data[1:])
        except Exception as error:
            logger.warning(
                "%s: ignoring an undecodable cache payload: %r", self.model.__name__, error
            )
            self.counters.add("errors")
            return Lookup.MISS


class CacheManager:
    """Caches the models that declare a ``CacheMeta``; one dogpile region per model.

    Args:
        config: how to cache; ``None`` means ``CacheConfig()`` (memory backend, defaults).
            Use :meth:`CacheConfig.from_env` to read ``DECLCACHE_*`` variables.

    A disabled config (``enabled=False``), or a missing dogpile.cache, gives a manager that
    caches nothing: every lookup misses and every write is a no-op.
    """

    def __init__(self, config: CacheConfig | None = None) -> None:
        self._config = config if config is not None else CacheConfig()
        self._caches: dict[type, _ModelCache | None] = {}
        self._lock = threading.RLock()
        self._faults = FaultLog(logger)
        self._first_region: CacheRegion | None = None
        self._enabled = self._config.enabled and self._dogpile_available()

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

    def spec(self, model: type) -> ModelSpec | None:
        """The resolved settings of ``model``; ``None`` if it declares no CacheMeta.

        Raises:
            CacheMetaError: the model's CacheMeta is invalid.
            SettingsError: a per-model override of it is invalid.
        """
        from sqlalchemy import inspect  # noqa: PLC0415

        declared = declared_meta(model)
        if declared is None:
            return None
        return resolve_spec(inspect(model), declared, self._config)

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
        from sqlalchemy import inspect  # noqa: PLC0415

        region = self._make_region(spec)
        keys = KeyBuilder(self._config.key_prefix, inspect(model), spec.serializer)
        return _ModelCache(spec, region, keys)

    def _make_region(self, spec: ModelSpec) -> CacheRegion:
        from dogpile.cache import make_region  # noqa: PLC0415
        from dogpile.util import PluginLoader  # noqa: PLC0415

        backend = self._config.backend
        arguments = _backends.backend_arguments(backend, dict(self._config.arguments), spec.ttl)
        if self._first_region is not None:
            arguments = _backends.share_connections(backend, self._first_region.backend, arguments)
        region = make_region(
            name=f"declcache:{spec.model.__name__}",
            serializer=_passthrough,
            deserializer=_passthrough,
        )
        try:
            region.configure(backend, expiration_time=spec.ttl, arguments=arguments)
        except PluginLoader.NotFound:
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

    def is_cached(self, model: type) -> bool:
        """Whether this manager caches ``model`` (it has a CacheMeta and is enabled)."""
        return self._cache(model) is not None

    def _fault(self, cache: _ModelCache, operation: str, error: Exception) -> None:
        cache.counters.add("errors")
        self._faults.warning(
            f"{operation}:{type(error).__name__}",
            "cache %s failed for %s, using the database: %r",
            operation,
            cache.model.__name__,
            error,
        )

    # -- reads ---------------------------------------------------------------------------

    def get(self, model: type, ident: Ident) -> Any:
        """The cached entity ``ident`` names, :attr:`Lookup.NOT_FOUND`, or :attr:`Lookup.MISS`.

        ``ident`` is a primary-key value, a tuple for a composite primary key, or a mapping
        ``{field: value}`` of the primary key or of a ``key_fields`` set.
        """
        cache = self._cache(model)
        if cache is None:
            return Lookup.MISS
        try:
            key = cache.ident_key(ident)
        except (ValueError, TypeError) as error:
            logger.debug("%s: %r cannot be a cache key: %s", model.__name__, ident, error)
            return Lookup.MISS
        return self._read(cache, key)

    def _read(self, cache: _ModelCache, key: str) -> Any:
        from dogpile.cache.api import NO_VALUE  # noqa: PLC0415

        try:
            raw = cache.region.get(key)
        except Exception as error:
            self._fault(cache, "get", error)
            cache.counters.add("misses")
            return Lookup.MISS
        found = Lookup.MISS if raw is NO_VALUE else cache.decode(raw)
        cache.counters.add("misses" if found is Lookup.MISS else "hits")
        return found

    def get_many(self, model: type, idents: Sequence[Ident]) -> list[Any]:
        """:meth:`get` for several entities in one backend round trip, in the order asked."""
        cache = self._cache(model)
        if cache is None or not idents:
            return [Lookup.MISS] * len(idents)
        from dogpile.cache.api import NO_VALUE  # noqa: PLC0415

        keys: list[str | None] = []
        for ident in idents:
            try:
                keys.append(cache.ident_key(ident))
            except (ValueError, TypeError):
                keys.append(None)
        wanted = [key for key in keys if key is not None]
        try:
            found = cache.region.get_multi(wanted)  # type: ignore[no-untyped-call]
            raws = dict(zip(wanted, found, strict=True))
        except Exception as error:
            self._fault(cache, "get_multi", error)
            raws = {}
        results = []
        for key in keys:
            raw = NO_VALUE if key is None else raws.get(key, NO_VALUE)
            results.append(Lookup.MISS if raw is NO_VALUE else cache.decode(raw))
        hits = sum(result is not Lookup.MISS for result in results)
        cache.counters.add("hits", hits)
        cache.counters.add("misses", len(results) - hits)
        return results

    # -- writes --------------------------------------------------------------------------

    def set(self, model: type, instance: object) -> bool:
        """Cache ``instance`` (loaded from the database) under each of its keys.

        Returns:
            Whether it was stored: ``False`` when the model is not cached, a column is not
            loaded or not encodable, or the backend failed.
        """
        return self.set_many(model, [instance]) == 1

    def set_many(self, model: type, instances: Sequence[object]) -> int:
        """Cache several instances in one backend round trip; returns how many were stored."""
        cache = self._cache(model)
        if cache is None:
            return 0
        mapping: dict[str, bytes] = {}
        stored = 0
        for instance in instances:
            payload = cache.encode(instance)
            if payload is None:
                continue
            stored += 1
            mapping.update(dict.fromkeys(cache.instance_keys(instance), payload))
        if not mapping:
            return 0
        try:
            cache.region.set_multi(mapping)
        except Exception as error:
            self._fault(cache, "set", error)
            return 0
        cache.counters.add("fills", stored)
        return stored

    def set_not_found(self, model: type, ident: Ident) -> bool:
        """Remember that ``ident`` names no row (for models with ``cache_not_found``)."""
        cache = self._cache(model)
        if cache is None or not cache.spec.cache_not_found:
            return False
        try:
            key = cache.ident_key(ident)
            cache.region.set(key, cache.not_found_payload())
        except (ValueError, TypeError):
            return False
        except Exception as error:
            self._fault(cache, "set", error)
            return False
        return True

    def _delete(self, cache: _ModelCache, keys: list[str]) -> bool:
        if not keys:
            return True
        try:
            cache.region.delete_multi(keys)
        except Exception as error:
            self._fault(cache, "delete", error)
            return False
        cache.counters.add("invalidations", len(keys))
        return True

    def invalidate(self, model: type, key: Ident) -> bool:
        """Drop the cached entity ``key`` names, under every key it is cached by.

        Args:
            model: the mapped class.
            key: a primary-key value (a tuple for a composite key) or a mapping of a key set.

        Returns:
            ``False`` when the backend could not be reached.
        """
        cache = self._cache(model)
        if cache is None:
            return True
        try:
            primary = cache.ident_key(key)
        except (ValueError, TypeError):
            return True
        keys = [primary]
        cached = self._read(cache, primary)
        if cached is not Lookup.MISS and cached is not Lookup.NOT_FOUND:
            keys = list(dict.fromkeys([primary, *cache.instance_keys(cached)]))
        return self._delete(cache, keys)

    # -- introspection -------------------------------------------------------------------

    def stats(self) -> dict[str, ModelStats]:
        """Counters per cached model name, since this manager started."""
        with self._lock:
            caches = [cache for cache in self._caches.values() if cache is not None]
        return {cache.model.__name__: cache.counters.snapshot() for cache in caches}
