"""CacheManager: the facade an application and the repositories talk to.

It builds what each cached model needs once (a dogpile region on the configured backend, its
keys, its stores behind the circuit breaker: :class:`~declcache._model_cache.ModelCache`) and
runs the read and invalidation flows on them — :func:`~declcache._driver.run` for threads,
:func:`~declcache._driver.arun` for coroutines. What a read or an invalidation decides lives in
:mod:`declcache._reads` and :mod:`declcache._invalidation`; which backend does what, in
:mod:`declcache.backends`.

Every backend call is guarded: a fault (the server is down, a payload is corrupt or foreign) is
logged, counted and answered as a miss, so the caller falls back to the database and never
sees the cache fail. Invalidations the backend cannot take are queued and replayed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect
from sqlalchemy.orm import Session

from declcache import _freshness, _invalidation, _reads, backends
from declcache._api import Lookup
from declcache._breaker import (
    AsyncGuardedStore,
    BackendUnavailable,
    Breaker,
    BreakerStats,
    GuardedStore,
)
from declcache._driver import arun, run
from declcache._invalidation import ModelChanges
from declcache._keys import UNSCOPED, KeyBuilder, Scope, primary_key_values
from declcache._meta import ModelSpec, resolve_spec
from declcache._model_cache import ModelCache
from declcache._near import AsyncNearStore, NearCache, NearCacheStats
from declcache._registry import cached_models, declared_meta, watch
from declcache._replay import Invalidator
from declcache._scope import scope_of, scope_warnings
from declcache._secrets import describe_target
from declcache._stats import FaultLog, ModelStats, StatsHook
from declcache.exceptions import ConfigurationError, SettingsError
from declcache.settings import CacheConfig

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Sequence

    from dogpile.cache.region import CacheRegion
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncSession

    from declcache._api import AsyncStore, Ident, Store
    from declcache._reads import ListProbe, Probe

__all__ = ["CacheManager"]

logger = logging.getLogger("declcache.manager")


def _orm_session(session: Session | AsyncSession | None) -> Session | None:
    """The ``Session`` hits enter: ``session``, or the one an ``AsyncSession`` runs on."""
    if session is None or isinstance(session, Session):
        return session
    return session.sync_session


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

    Raises:
        SettingsError: a ``DECLCACHE_MODELS`` override is invalid for a model already
            configured (the others are checked when SQLAlchemy configures their mappers).
    """

    def __init__(
        self, config: CacheConfig | None = None, *, on_stats: StatsHook | None = None
    ) -> None:
        self._config = config if config is not None else CacheConfig()
        watch(self._config)  # its DECLCACHE_MODELS fail now or at mapper configuration
        self._on_stats = on_stats
        self._caches: dict[type, ModelCache | None] = {}
        self._lock = threading.RLock()
        target = describe_target(self._config.arguments)
        self._faults = FaultLog(logger, secrets=self._config.secrets, target=target)
        self._scope_warnings = scope_warnings()
        self._breaker = Breaker(
            self._config.breaker_interval, secrets=self._config.secrets, target=target
        )
        self._enabled = self._config.enabled and self._dogpile_available()
        self._backend = (
            backends.open_backend(self._config.backend, self._config.arguments, self._config)
            if self._enabled
            else None
        )
        self._near = (
            NearCache(
                self._config.key_prefix,
                self._config.near_cache_max_entries,
                breaker=self._breaker,
            )
            if self._enabled and self._config.near_cache
            else None
        )
        if self._enabled:
            _freshness.install()
        self._invalidations = Invalidator(self._cache)

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
        return self._backend is not None and self._backend.blocking

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
        """Whether this manager caches ``model`` (it has a CacheMeta and is enabled).

        While the backend is too far gone for the model's cache to be built, the settings
        decide: a write must still be recorded for invalidation.
        """
        try:
            return self._cache(model) is not None
        except BackendUnavailable:
            spec = self.spec(model)
            return spec is not None and spec.enabled

    # -- building a model's cache ------------------------------------------------------------

    def _cache(self, model: type) -> ModelCache | None:
        """The model's cache, built on first use; ``None`` when this manager does not cache it.

        Raises:
            BackendUnavailable: building it needed the backend, which failed (a Redis Cluster
                client connects as it is made): nothing is kept, the next use tries again.
        """
        try:
            return self._caches[model]
        except KeyError:
            pass
        with self._lock:
            if model not in self._caches:
                started = self._breaker._clock()
                try:
                    self._caches[model] = self._build_cache(model)
                except ConfigurationError:
                    raise
                except Exception as error:
                    self._breaker.failed(error, started)
                    self._faults.warning(
                        f"build:{type(error).__name__}",
                        "cache of %s not built (%s), using the database: %s",
                        model.__name__,
                        self._faults.target,
                        error,
                    )
                    raise BackendUnavailable(
                        f"the cache of {model.__name__} could not be built"
                    ) from error
            return self._caches[model]

    def _build_cache(self, model: type) -> ModelCache | None:
        backend = self._backend
        if backend is None:
            return None
        spec = self.spec(model)
        if spec is None or not spec.enabled:
            return None
        region = self._region(backend, spec)
        raw = backend.store(region)
        store: Store = GuardedStore(raw, self._breaker)
        astore: AsyncStore
        if self._near is None:
            astore = AsyncGuardedStore(backend.async_store(region, raw), self._breaker)
        else:  # in front of the breaker: an L1 hit is no answer from the backend
            store = self._near.wrap(store, backend.tracking_pool(region))
            astore = AsyncNearStore(store)
        return ModelCache(
            spec,
            KeyBuilder(self._config.key_prefix, inspect(model), spec.key_fields),
            region,
            store,
            astore,
            server_ttl=backend.server_ttl(spec.ttl),
            max_value_bytes=self._config.max_value_bytes,
            faults=self._faults,
            on_stats=self._on_stats,
            named_scopes=self._config.scope is not None,
        )

    def _region(self, backend: backends.Backend, spec: ModelSpec) -> CacheRegion:
        from dogpile.cache.exception import PluginNotFound  # noqa: PLC0415

        try:
            return backend.make_region(spec.model.__name__, spec.ttl)
        except PluginNotFound:
            raise SettingsError(
                self._config.setting_name("backend"),
                f"unknown dogpile backend {backend.name!r} (memory, redis, pymemcache, dbm, null…)",
            ) from None
        except ImportError as error:
            raise SettingsError(
                self._config.setting_name("backend"),
                f"{backend.name!r} needs a client library: {error} (pip install 'declcache[all]')",
            ) from None

    def _usable(self, model: type, scope: Scope) -> ModelCache | None:
        """The model's cache in ``scope``, unless its invalidations wait for the backend.

        Never calls the backend, so coroutines call it too.
        """
        cache = self._built(model)
        if cache is None or self._invalidations.holds(model):
            return None
        return cache.scoped(scope)

    def _scoped(self, model: type, scope: Scope) -> ModelCache | None:
        cache = self._built(model)
        return None if cache is None else cache.scoped(scope)

    def _built(self, model: type) -> ModelCache | None:
        """:meth:`_cache`, or ``None`` while it cannot be built: a read goes to the database."""
        try:
            return self._cache(model)
        except BackendUnavailable:
            return None

    # -- scopes ----------------------------------------------------------------------------

    def scope(
        self,
        session: Session,
        model: type,
        *,
        connection: Connection | None = None,
        schemas: Mapping[str | None, str | None] | None = None,
        reading: bool = True,
    ) -> Scope | None:
        """The scope ``session``'s reads (or writes) of ``model`` use: its keys' namespace.

        The schema its ``schema_translate_map`` sends the model's table to, and the name
        :attr:`CacheConfig.scope` gives the session. ``None``: this read must not use the
        cache (a ``do_orm_execute`` listener rewrites the session's statements and no scope
        function accounts for it, or the scope function failed). A write always has one.
        ``connection``: the one a flush writes with; ``schemas``: a statement's own schema
        map. See docs/tenancy.md.
        """
        cache = self._built(model)
        return scope_of(
            session,
            inspect(model) if cache is None else cache.mapper,
            self._config.scope,
            self._scope_warnings,
            connection=connection,
            schemas=schemas,
            reading=reading,
        )

    # -- entity reads ----------------------------------------------------------------------
    #
    # Given a ``session``, every hit is persistent in it as if it had loaded the row
    # (:mod:`declcache._assemble`); without one, a hit is detached.

    def get(
        self,
        model: type,
        ident: Ident,
        *,
        scope: Scope = UNSCOPED,
        session: Session | AsyncSession | None = None,
    ) -> Any:
        """The cached entity ``ident`` names, :attr:`Lookup.NOT_FOUND`, or :attr:`Lookup.MISS`.

        ``ident`` is a primary-key value, a tuple for a composite primary key, or a mapping
        ``{field: value}`` of the primary key or of a ``key_fields`` set. A hit is an
        instance of ``session`` (the one it already holds for that identity, if any), as if
        the session had loaded it; without a session, a detached instance.
        """
        return self.probe(model, [ident], scope=scope, session=session).results[0]

    def get_many(
        self,
        model: type,
        idents: Sequence[Ident],
        *,
        scope: Scope = UNSCOPED,
        session: Session | AsyncSession | None = None,
    ) -> list[Any]:
        """:meth:`get` for several entities in one backend round trip, in the order asked."""
        return self.probe(model, idents, scope=scope, session=session).results

    def probe(
        self,
        model: type,
        idents: Sequence[Ident],
        *,
        scope: Scope = UNSCOPED,
        session: Session | AsyncSession | None = None,
    ) -> Probe:
        """:meth:`get_many`, keeping what the backend held for a fill after a miss.

        A caller that answers hits itself and loads only on a miss (the repositories) hands
        the probe to :meth:`load_many`, so a miss costs one look-up, not two.
        """
        cache = self._usable(model, scope)
        if cache is None or not idents:
            return _reads.missed(idents)
        return run(_reads.probe(cache, idents, _orm_session(session)), cache.store)

    async def aprobe(
        self,
        model: type,
        idents: Sequence[Ident],
        *,
        scope: Scope = UNSCOPED,
        session: Session | AsyncSession | None = None,
    ) -> Probe:
        """:meth:`probe` for a coroutine: awaited on the manager's async store.

        Natively on a single Redis (``redis.asyncio``); on the loop for the memory backend
        and near-cache hits; in a worker thread for clients without asyncio.
        """
        cache = self._usable(model, scope)
        if cache is None or not idents:
            return _reads.missed(idents)
        flow = _reads.probe(cache, idents, _orm_session(session))
        if not self.blocking:  # in process: nothing to await, so no coroutine layers either
            return run(flow, cache.store)
        return await arun(flow, cache.astore)

    def load(
        self,
        model: type,
        ident: Ident,
        loader: Callable[[], Any],
        *,
        probe: Probe | None = None,
        scope: Scope = UNSCOPED,
        session: Session | AsyncSession | None = None,
    ) -> Any:
        """The entity ``ident`` names, from the cache or else from ``loader()``; ``None`` if none.

        ``loader`` queries the database and returns the instance or ``None``. Its result is
        cached unless the entity was invalidated while it ran (no stale fill). ``probe`` is
        the :meth:`probe` of ``[ident]`` the caller already made, if any. A hit enters
        ``session`` (see :meth:`get`); ``loader`` should load into that session too.
        """
        return self.load_many(
            model,
            [ident],
            lambda _missing: [loader()],
            probe=probe,
            scope=scope,
            session=session,
        )[0]

    async def aload(
        self,
        model: type,
        ident: Ident,
        loader: Callable[[], Awaitable[Any]],
        *,
        probe: Probe | None = None,
        scope: Scope = UNSCOPED,
        session: Session | AsyncSession | None = None,
    ) -> Any:
        """:meth:`load` for a coroutine; ``loader`` is awaited on the loop."""

        async def load_one(_missing: list[Ident]) -> list[Any]:
            return [await loader()]

        found = await self.aload_many(
            model, [ident], load_one, probe=probe, scope=scope, session=session
        )
        return found[0]

    def load_many(
        self,
        model: type,
        idents: Sequence[Ident],
        loader: Callable[[list[Ident]], Iterable[Any]],
        *,
        probe: Probe | None = None,
        scope: Scope = UNSCOPED,
        session: Session | AsyncSession | None = None,
    ) -> list[Any]:
        """Entities in the order asked (``None`` where no row), one query for all misses.

        ``loader(missing)`` receives the idents the cache could not answer and returns the
        instances the database has for them (in any order, ``None`` entries ignored).
        ``probe``: the :meth:`probe` of ``idents`` the caller just made; otherwise one is made,
        its hits entering ``session`` (see :meth:`get`).
        """
        if not idents:
            return []
        cache = self._usable(model, scope) if probe is None else self._scoped(model, scope)
        flow = _reads.load(cache, model, idents, probe, _orm_session(session))
        return run(flow, None if cache is None else cache.store, loader)

    async def aload_many(
        self,
        model: type,
        idents: Sequence[Ident],
        loader: Callable[[list[Ident]], Awaitable[Iterable[Any]]],
        *,
        probe: Probe | None = None,
        scope: Scope = UNSCOPED,
        session: Session | AsyncSession | None = None,
    ) -> list[Any]:
        """:meth:`load_many` for a coroutine; ``loader`` is awaited on the loop."""
        if not idents:
            return []
        cache = self._usable(model, scope) if probe is None else self._scoped(model, scope)
        flow = _reads.load(cache, model, idents, probe, _orm_session(session))
        return await arun(flow, None if cache is None else cache.astore, loader)

    # -- query results ---------------------------------------------------------------------

    def probe_list(
        self,
        model: type,
        query_key: str,
        *,
        scope: Scope = UNSCOPED,
        session: Session | AsyncSession | None = None,
    ) -> ListProbe:
        """The cached result :meth:`load_list` would return for ``query_key``, or ``MISS``.

        The list version it was looked up under comes with it: :meth:`load_list` fills
        against it after a miss, without looking up again. A cached list's instances are
        persistent in ``session`` (see :meth:`get`), or detached without one.
        """
        cache = self._usable(model, scope)
        if cache is None:
            return _reads.ListProbe(Lookup.MISS, None)
        return run(_reads.probe_list(cache, query_key, _orm_session(session)), cache.store)

    async def aprobe_list(
        self,
        model: type,
        query_key: str,
        *,
        scope: Scope = UNSCOPED,
        session: Session | AsyncSession | None = None,
    ) -> ListProbe:
        """:meth:`probe_list` for a coroutine (see :meth:`aprobe`)."""
        cache = self._usable(model, scope)
        if cache is None:
            return _reads.ListProbe(Lookup.MISS, None)
        flow = _reads.probe_list(cache, query_key, _orm_session(session))
        if not self.blocking:  # see aprobe
            return run(flow, cache.store)
        return await arun(flow, cache.astore)

    def load_list(
        self,
        model: type,
        query_key: str,
        loader: Callable[[], Any],
        *,
        probe: ListProbe | None = None,
        scope: Scope = UNSCOPED,
        session: Session | AsyncSession | None = None,
    ) -> Any:
        """A cached query result for ``query_key``, else ``loader()``'s, cached under the version.

        ``loader`` returns a list of instances or an ``int`` (a count). A list result of
        instances is cached as their column values, so a hit makes new instances of them:
        persistent in ``session`` (see :meth:`get`), or detached without one.
        ``probe``: the :meth:`probe_list` of ``query_key`` the caller just made, if any.
        """
        cache = self._usable(model, scope)
        if cache is None:
            return loader()
        flow = _reads.load_list(cache, query_key, probe, _orm_session(session))
        return run(flow, cache.store, loader)

    async def aload_list(
        self,
        model: type,
        query_key: str,
        loader: Callable[[], Awaitable[Any]],
        *,
        probe: ListProbe | None = None,
        scope: Scope = UNSCOPED,
        session: Session | AsyncSession | None = None,
    ) -> Any:
        """:meth:`load_list` for a coroutine; ``loader`` is awaited on the loop."""
        cache = self._usable(model, scope)
        if cache is None:
            return await loader()
        flow = _reads.load_list(cache, query_key, probe, _orm_session(session))
        return await arun(flow, cache.astore, loader)

    def fill_mutex(
        self,
        model: type,
        ident: Ident | None = None,
        *,
        query_key: str | None = None,
        scope: Scope = UNSCOPED,
    ) -> Any:
        """The backend's distributed lock for filling one entry; ``None`` when there is none.

        Only when the backend arguments say ``distributed_lock=True`` (dogpile's Redis and
        Memcached backends): a process holding it fills the entry ``ident`` (or the cached
        query ``query_key``) names while other processes wait, then read what it filled.
        The object is a :class:`~declcache._fill_lock.FillLock`, with dogpile's mutex
        interface (``acquire(wait=True)``, ``release()``) and its async twins: a wait lasts
        at most ``lock_blocking_timeout`` seconds (2 unless configured), after which
        ``acquire`` returns ``False`` and the reader reads the database.
        """
        if not self._config.arguments.get("distributed_lock"):
            return None
        if self._breaker.state != "closed":  # the lock lives on the backend that failed
            return None
        cache = self._scoped(model, scope)  # no replay: async repositories call it on the loop
        if cache is None or self._invalidations.holds(model):
            return None
        try:
            if query_key is not None:
                key = cache.keys.list_key(query_key)
            else:
                key = cache.keys.of_ident(ident)[1]
        except (ValueError, TypeError):
            return None
        from declcache._fill_lock import fill_lock  # noqa: PLC0415 - only with distributed_lock

        return fill_lock(cache.region.backend, key, self._config.arguments)

    # -- warming -----------------------------------------------------------------------------

    def set(self, model: type, instance: object, *, scope: Scope = UNSCOPED) -> bool:
        """Cache ``instance`` (loaded from the database) under each of its keys; warm-up use.

        Returns:
            Whether it was stored: ``False`` when the model is not cached, a column is not
            loaded or not encodable, or the backend failed.
        """
        return self.set_many(model, [instance], scope=scope) == 1

    def set_many(self, model: type, instances: Sequence[object], *, scope: Scope = UNSCOPED) -> int:
        """Cache several instances unconditionally; returns how many were stored."""
        cache = self._usable(model, scope)
        if cache is None:
            return 0
        return run(_invalidation.warm(cache, instances), cache.store)

    # -- invalidation ----------------------------------------------------------------------

    def apply(self, changes: Mapping[type, ModelChanges]) -> None:
        """Invalidate what a committed transaction changed; never raises.

        What the backend cannot take now is queued and replayed when it answers again.
        """
        self._invalidations.apply(changes)

    async def aapply(self, changes: Mapping[type, ModelChanges]) -> None:
        """:meth:`apply` for a coroutine, awaited on the async store."""
        await self._invalidations.aapply(changes)

    def invalidate(
        self, model: type, key: Ident, *, scope: str | None = None, schema: str = ""
    ) -> bool:
        """Drop the cached entity ``key`` names, and every cached list of the model.

        Args:
            model: the mapped class.
            key: a primary-key value (a tuple for a composite key) or a mapping of a key set.
            scope: the named scope (tenant) whose entry to drop; ``None``: the row was
                written outside every named scope, so every scope drops it.
            schema: the schema a ``schema_translate_map`` sends the table to, if any.

        Returns:
            ``False`` when the backend could not be reached (the invalidation is queued).
        """
        where = Scope(schema, scope)
        cache = self._scoped(model, where)
        if cache is None:
            return True
        try:
            fields, entity_key = cache.keys.of_ident(key)
        except (ValueError, TypeError):
            return True
        if isinstance(key, Mapping):
            values = tuple(key[name] for name in fields)
        else:
            values = primary_key_values(key)
        change = ModelChanges(keys={(fields, values)}, scopes={where})
        primary_key = cache.keys.primary_key
        if fields != primary_key:
            pointed = run(_invalidation.pointed_primary_key(cache, entity_key), cache.store)
            if pointed is None:  # cached under a primary key we cannot know: drop all
                change.whole_model = True
            else:
                change.keys.add((primary_key, pointed))
        return self._invalidations.applied(model, change)

    def invalidate_model(self, model: type, *, scope: str | None = None, schema: str = "") -> bool:
        """Drop every cached entity and list of ``model`` at once (a new generation token).

        Use it after writing the model's table outside the ORM (Core on a bare connection).
        ``scope`` names the one scope (tenant) to drop; ``None`` drops every scope of
        ``schema`` (the schema a ``schema_translate_map`` sends the table to, if any).
        """
        change = ModelChanges(whole_model=True, scopes={Scope(schema, scope)})
        return self._invalidations.applied(model, change)

    def clear(self, *, schema: str = "") -> bool:
        """Drop everything this manager cached in ``schema``, for every model with a CacheMeta.

        Only this key prefix's tokens are replaced: nothing is scanned or flushed, so other
        applications on the same server are untouched. Every named scope is dropped; a
        schema-per-tenant application clears each tenant's schema by name.
        """
        results = [self.invalidate_model(model, schema=schema) for model in cached_models()]
        return all(results)

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close this manager's connections to the backend; it reconnects on its next use.

        Call it when a process is done with the cache, as Django's ``cache.close()``
        (``SQLAlchemySyncConfig.dispose`` does). Invalidations queued during an outage get a
        last attempt first, so a process that exits does not take them along. Nothing
        cached is dropped. An async app awaits :meth:`aclose` instead.
        """
        self._invalidations.flush()
        for cache in self._built_caches():
            cache.store.reset_connections()
        if self._backend is not None:
            self._backend.forget_async()
        if self._near is not None:
            self._near.close()

    async def aclose(self) -> None:
        """:meth:`close`, and close the running event loop's async connections."""
        if self._backend is not None:
            try:
                await self._backend.aclose()
            except Exception as error:  # the connections are being given up either way
                logger.debug("closing async backend connections: %r", error)
        await asyncio.to_thread(self.close)

    # -- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, ModelStats]:
        """Counters per cached model name, since this manager started."""
        return {cache.name: cache.counters.snapshot() for cache in self._built_caches()}

    def _built_caches(self) -> list[ModelCache]:
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
        return self._invalidations.pending
