"""``SQLAlchemyAsyncRepository``: the repository methods over an ``AsyncSession``.

The same plans as the sync repository (:mod:`declcache.repository._base`), run without
blocking the event loop:

* every cache call is awaited on the manager's async store (natively on a single Redis,
  inline for the memory backend and near-cache hits, in a worker thread for the others);
* a read-through awaits its own query on the ``AsyncSession``, on the loop;
* concurrent reads of one key await the leader's future (singleflight), so ``asyncio.gather``
  over one session makes one query; the queries a session runs for the cache are serialized
  by a lock kept in ``session.info``, as an ``AsyncSession`` cannot run two at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from declcache._api import Lookup
from declcache._associations import preload
from declcache._keys import match
from declcache._singleflight import AsyncFlights
from declcache.repository._base import CachedRead, ModelT, RepositoryBase, _found
from declcache.repository._updates import updated

if TYPE_CHECKING:
    import builtins
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from sqlalchemy import Select
    from sqlalchemy.ext.asyncio import AsyncSession

    from declcache._fill_lock import FillLock
    from declcache._manager import CacheManager
    from declcache.repository._base import CacheView

__all__ = ["SQLAlchemyAsyncRepository"]

logger = logging.getLogger("declcache.repository")

_FLIGHTS = AsyncFlights()
#: ``session.info`` key of the lock that serializes the queries a session runs for the cache.
_QUERY_LOCK_KEY = "_declcache_query_lock"


@contextlib.asynccontextmanager
async def _held(mutex: FillLock) -> AsyncIterator[None]:
    """Hold the fill lock, or wait for it at most its bound (then fill without it).

    Each attempt and the release run in a worker thread; the wait between attempts is an
    ``asyncio.sleep``, so a waiting reader holds no thread (see :mod:`declcache._fill_lock`).
    """
    try:
        acquired = await mutex.aacquire()
    except Exception as error:
        logger.warning("distributed fill lock unavailable, filling without it: %r", error)
        acquired = False
    try:
        yield
    finally:
        if acquired:
            try:
                await mutex.arelease()
            except Exception as error:  # e.g. it expired (lock_timeout) while we loaded
                logger.debug("distributed fill lock release failed: %r", error)


class SQLAlchemyAsyncRepository(RepositoryBase[ModelT]):
    """Reads through the cache, writes through the ``AsyncSession``; never blocks the loop.

    Args:
        session: the ``AsyncSession`` to use.
        cache_manager: the manager to read through; default: ``session.info["cache_manager"]``
            (set by the config objects). ``None`` there too: no caching.
        auto_expunge: detach returned instances from the session.
        auto_refresh: refresh instances after ``add`` and ``update``.
        auto_commit: commit after writes (else flush).

    An instance served from the cache is persistent in ``session`` as if the session had
    loaded it (the instance the session already holds for that identity, if any): only the
    columns changed afterwards are flushed, and relationships and the attributes the cache
    does not hold load on access (through ``AsyncAttrs.awaitable_attrs``, as for any
    instance of an ``AsyncSession``). With ``auto_expunge`` it is detached, as a database
    read then expunged.
    """

    def __init__(
        self,
        *,
        session: AsyncSession,
        cache_manager: CacheManager | None = None,
        auto_expunge: bool = False,
        auto_refresh: bool = True,
        auto_commit: bool = False,
    ) -> None:
        self.session = session
        super().__init__(
            session.sync_session,
            cache_manager=cache_manager,
            auto_expunge=auto_expunge,
            auto_refresh=auto_refresh,
            auto_commit=auto_commit,
        )

    # -- entity reads ------------------------------------------------------------------------

    async def get(
        self,
        item_id: Any,
        *,
        use_cache: bool = True,
        auto_expunge: bool | None = None,
        preload: Sequence[str] = (),
    ) -> ModelT:
        """The instance with primary key ``item_id`` (a tuple for a composite key).

        Raises:
            NotFoundError: there is no such row.
        """
        cache = self._cache_for(use_cache)
        if cache is None:
            item = await self.session.get(self.model_type, item_id)
        else:
            item = self._held(item_id)
            if item is None:
                item = await self._read_entity(cache, item_id)
        found = self.check_not_found(item, item_id)
        await self._preload([found], preload, use_cache)
        self._expunge([found], auto_expunge)
        return found

    async def get_many(
        self,
        item_ids: Sequence[Any],
        *,
        use_cache: bool = True,
        auto_expunge: bool | None = None,
        preload: Sequence[str] = (),
    ) -> builtins.list[ModelT | None]:
        """Instances for ``item_ids`` in that order, ``None`` where there is no row.

        One backend round trip, and one query for everything the cache did not answer.
        """
        idents = list(item_ids)
        if not idents:
            return []
        cache = self._cache_for(use_cache)
        if cache is None:
            loaded = await self._all(self._many_statement(idents, reload=False))
            items = match(self._mapper, idents, loaded)
        else:
            items = await self._load_many(cache, idents)
        await self._preload(items, preload, use_cache)
        self._expunge(items, auto_expunge)
        return items

    async def _load_many(self, cache: CacheView, idents: builtins.list[Any]) -> builtins.list[Any]:
        held = [self._held(ident) for ident in idents]
        rest = [ident for ident, item in zip(idents, held, strict=True) if item is None]
        loaded = iter(await self._load_rest(cache, rest) if rest else [])
        return [next(loaded) if item is None else item for item in held]

    async def _load_rest(self, cache: CacheView, idents: builtins.list[Any]) -> builtins.list[Any]:
        """The cached or loaded instances of ``idents``, sharing loads with other coroutines.

        See the sync repository's ``_load_many``: the missing ids nobody loads are led (one
        query for all of them), the others followed once this coroutine's own have landed.
        """
        model, session = self.model_type, self._sync_session

        async def loader(missing: builtins.list[Any]) -> builtins.list[Any]:
            loaded: builtins.list[Any] = await self._locked(
                self._all(self._many_statement(missing, reload=True))
            )
            return loaded

        landed = _FLIGHTS.landed
        probe = await cache.aprobe(model, idents, session)
        results = list(probe.results)
        misses = [i for i, found in enumerate(results) if found is Lookup.MISS]
        if not misses:  # no query
            return [_found(found) for found in results]
        keys = {i: self._entity_flight_key(cache, idents[i]) for i in misses}
        led, followed = _FLIGHTS.claim([key for key in keys.values() if key is not None], session)
        mine = [i for i in misses if keys[i] not in followed]  # led, or not shareable
        if mine:
            fresh = probe if len(mine) == len(misses) and _FLIGHTS.landed == landed else None
            try:
                loaded = await self._lead_many(cache, idents, mine, fresh, loader)
            except BaseException as error:
                _FLIGHTS.land(led, {}, error)
                raise
            for i, found in zip(mine, loaded, strict=True):
                results[i] = _found(found)
            _FLIGHTS.land(led, {keys[i]: results[i] for i in mine if keys[i] in led})
        again = []
        for i in misses:
            if i in mine:
                continue
            outcome = await _FLIGHTS.wait(followed[keys[i]])
            if outcome is not None and self._reusable(outcome):
                results[i] = outcome.result()
            else:  # another session's instance, or the leader was cancelled
                again.append(i)
        if again:  # the leaders filled the cache: normally hits
            found_again = await cache.aload_many(model, [idents[i] for i in again], loader, session)
            for i, found in zip(again, found_again, strict=True):
                results[i] = found
        return [_found(found) for found in results]

    async def _lead_many(
        self,
        cache: CacheView,
        idents: builtins.list[Any],
        mine: builtins.list[int],
        probe: Any,
        loader: Callable[[builtins.list[Any]], Awaitable[builtins.list[Any]]],
    ) -> builtins.list[Any]:
        """The sync repository's ``_lead_many`` for a coroutine (lock attempts in threads)."""
        model, session = self.model_type, self._sync_session
        mutexes = [cache.manager.fill_mutex(model, idents[i], scope=cache.scope) for i in mine]
        if all(mutex is None for mutex in mutexes):
            if probe is not None:
                every = await cache.aload_many(model, idents, loader, session, probe=probe)
                return [every[i] for i in mine]
            return await cache.aload_many(model, [idents[i] for i in mine], loader, session)
        taken: builtins.list[FillLock] = []
        busy: dict[int, FillLock] = {}
        for i, mutex in zip(mine, mutexes, strict=True):
            if mutex is None:
                continue
            try:
                if await asyncio.to_thread(mutex.acquire, False):
                    taken.append(mutex)
                else:
                    busy[i] = mutex
            except Exception as error:  # load it without the lock
                logger.warning("distributed fill lock unavailable, filling without it: %r", error)
        values: dict[int, Any] = {}
        now = [i for i in mine if i not in busy]
        try:
            if now:
                loaded = await cache.aload_many(model, [idents[i] for i in now], loader, session)
                values.update(zip(now, loaded, strict=True))
        finally:
            for mutex in taken:
                with contextlib.suppress(Exception):  # it expires with its lock_timeout
                    await mutex.arelease()
        if busy:
            for mutex in busy.values():  # another process fills it: wait for it to end
                async with _held(mutex):
                    pass
            later = list(busy)
            loaded = await cache.aload_many(model, [idents[i] for i in later], loader, session)
            values.update(zip(later, loaded, strict=True))
        return [values[i] for i in mine]

    async def get_one(
        self,
        *filters: Any,
        use_cache: bool = True,
        auto_expunge: bool | None = None,
        preload: Sequence[str] = (),
        **fields: Any,
    ) -> ModelT:
        """The one instance matching; from the cache when ``fields`` are exactly a key.

        Raises:
            NotFoundError: no row matches.
        """
        item = await self.get_one_or_none(
            *filters, use_cache=use_cache, auto_expunge=auto_expunge, preload=preload, **fields
        )
        return self.check_not_found(item, fields or None)

    async def get_one_or_none(
        self,
        *filters: Any,
        use_cache: bool = True,
        auto_expunge: bool | None = None,
        preload: Sequence[str] = (),
        **fields: Any,
    ) -> ModelT | None:
        """The one instance matching, or ``None``.

        Served from the cache when there are no ``filters`` and ``fields`` are exactly the
        primary key or a ``key_fields`` set of the model; otherwise a query.
        """
        cache = self._cache_for(use_cache)
        ident = None if cache is None else self._key_ident(cache, filters, fields)
        item: ModelT | None
        if cache is not None and ident is not None:
            item = self._held(ident)
            if item is None:
                item = await self._read_entity(cache, ident)
        else:
            item = await self._one_or_none(self._select(filters, fields))
        await self._preload([item], preload, use_cache)
        self._expunge([item], auto_expunge)
        return item

    async def _read_entity(self, cache: CacheView, ident: Any) -> Any:
        landed = _FLIGHTS.landed
        probe = await cache.aprobe(self.model_type, [ident], self._sync_session)
        found = probe.results[0]
        if found is Lookup.MISS:
            query = lambda: self._one_or_none(self._entity_statement(ident))  # noqa: E731
            found = await self._run(self._entity_read(cache, ident), query, probe, landed)
        return _found(found)

    # -- queries -----------------------------------------------------------------------------

    async def list(
        self,
        *filters: Any,
        order_by: Any = None,
        limit: int | None = None,
        offset: int | None = None,
        use_cache: bool = True,
        auto_expunge: bool | None = None,
        preload: Sequence[str] = (),
        **fields: Any,
    ) -> builtins.list[ModelT]:
        """Instances matching ``filters`` and ``fields``; cached under the model's list version."""
        statement = self._list_statement(filters, fields, order_by, limit, offset)
        items: builtins.list[ModelT] = await self._cached_query("list", statement, use_cache)
        await self._preload(items, preload, use_cache)
        self._expunge(items, auto_expunge)
        return items

    async def list_and_count(
        self,
        *filters: Any,
        order_by: Any = None,
        limit: int | None = None,
        offset: int | None = None,
        use_cache: bool = True,
        auto_expunge: bool | None = None,
        preload: Sequence[str] = (),
        **fields: Any,
    ) -> tuple[builtins.list[ModelT], int]:
        """:meth:`list`, and how many rows match without ``limit`` and ``offset``."""
        items = await self.list(
            *filters,
            order_by=order_by,
            limit=limit,
            offset=offset,
            use_cache=use_cache,
            auto_expunge=auto_expunge,
            preload=preload,
            **fields,
        )
        return items, await self.count(*filters, use_cache=use_cache, **fields)

    async def count(self, *filters: Any, use_cache: bool = True, **fields: Any) -> int:
        """How many rows match; cached under the model's list version."""
        statement = self._count_statement(filters, fields)
        counted: int = await self._cached_query("count", statement, use_cache)
        return counted

    async def exists(self, *filters: Any, use_cache: bool = True, **fields: Any) -> bool:
        """Whether a row matches; cached under the model's list version."""
        statement = self._exists_statement(filters, fields)
        return bool(await self._cached_query("exists", statement, use_cache))

    async def _cached_query(self, kind: str, statement: Select[Any], use_cache: bool) -> Any:
        cache = self._cache_for(use_cache)
        key = None if cache is None else self._query_key(cache, kind, statement)
        if cache is None or key is None:
            return await self._query(kind, statement, reload=False)
        landed = _FLIGHTS.landed
        probe = await cache.aprobe_list(self.model_type, key, self._sync_session)
        if probe.result is not Lookup.MISS:
            return probe.result
        read = self._query_read(cache, key)
        query = lambda: self._query(kind, statement, reload=True)  # noqa: E731
        return await self._run(read, query, probe, landed)

    async def _query(self, kind: str, statement: Select[Any], *, reload: bool) -> Any:
        if kind == "list":
            return await self._all(statement.execution_options(populate_existing=reload))
        value = (await self.session.execute(statement)).scalar()
        return int(value or 0)

    async def _all(self, statement: Select[Any]) -> builtins.list[Any]:
        """The instances ``statement`` selects, each once (see :meth:`_one_or_none`)."""
        return list((await self.session.execute(statement)).unique().scalars().all())

    async def _one_or_none(self, statement: Select[Any]) -> Any:
        """The instance ``statement`` selects, or ``None``; ``unique()`` as the sync one's."""
        return (await self.session.execute(statement)).unique().scalars().one_or_none()

    # -- running a cached read ---------------------------------------------------------------

    async def _run(
        self, read: CachedRead, query: Callable[[], Awaitable[Any]], probe: Any, landed: int
    ) -> Any:
        """Run a read that missed: singleflight on this loop, the fill lock across processes.

        ``probe`` is what the missed look-up saw when :attr:`AsyncFlights.landed` was
        ``landed`` (see the sync repository's ``_run``).
        """

        async def loader() -> Any:
            return await self._locked(query())

        async def lead() -> Any:
            mutex = read.mutex()
            if mutex is None:
                return await read.aload(loader, probe if _FLIGHTS.landed == landed else None)
            async with _held(mutex):
                return await read.aload(loader, None)

        if read.flight_key is None:
            return await lead()
        outcome = await _FLIGHTS.run(read.flight_key, self._sync_session, lead)
        if self._reusable(outcome):
            return outcome.result()
        return await read.aload(loader, None)  # the leader filled the cache: normally a hit

    async def _locked(self, work: Awaitable[Any]) -> Any:
        """Await ``work`` alone on this session: an AsyncSession runs one query at a time."""
        lock = self._sync_session.info.get(_QUERY_LOCK_KEY)
        if lock is None:
            lock = self._sync_session.info[_QUERY_LOCK_KEY] = asyncio.Lock()
        async with lock:
            return await work

    async def _preload(self, items: Sequence[Any], names: Sequence[str], use_cache: bool) -> None:
        """Load relationships ``names`` of ``items`` together, from the cache when it may.

        In the session's greenlet, as SQLAlchemy runs every load of an ``AsyncSession``.
        """
        if names:
            manager = self._manager if use_cache else None
            await self.session.run_sync(preload, manager, items, names)

    # -- writes ------------------------------------------------------------------------------

    async def add(
        self,
        data: ModelT,
        *,
        auto_commit: bool | None = None,
        auto_expunge: bool | None = None,
        auto_refresh: bool | None = None,
    ) -> ModelT:
        """Add ``data``; flush, or commit with ``auto_commit``."""
        self.session.add(data)
        await self._flush_or_commit(auto_commit)
        await self._refresh(data, auto_refresh)
        self._expunge([data], auto_expunge)
        return data

    async def add_many(
        self,
        data: Sequence[ModelT],
        *,
        auto_commit: bool | None = None,
        auto_expunge: bool | None = None,
    ) -> builtins.list[ModelT]:
        """Add every instance of ``data``; flush, or commit with ``auto_commit``."""
        items = list(data)
        self.session.add_all(items)
        await self._flush_or_commit(auto_commit)
        self._expunge(items, auto_expunge)
        return items

    async def update(
        self,
        data: ModelT,
        *,
        auto_commit: bool | None = None,
        auto_expunge: bool | None = None,
        auto_refresh: bool | None = None,
    ) -> ModelT:
        """Write ``data``'s changes; flush, or commit with ``auto_commit``.

        As the sync repository's ``update``: ``data`` the session holds is flushed as it
        is, an instance with an identity it does not hold has only its changes written, a
        transient one is merged.

        Raises:
            StaleDataError: the row was deleted, or (with a ``version_id_col``) changed
                since ``data`` was loaded.
        """
        item = await self.session.run_sync(updated, data)
        await self._flush_or_commit(auto_commit)
        await self._refresh(item, auto_refresh)
        self._expunge([item], auto_expunge)
        return item

    async def delete(
        self, item_id: Any, *, auto_commit: bool | None = None, auto_expunge: bool | None = None
    ) -> ModelT:
        """Delete the row with primary key ``item_id`` and return its instance.

        Raises:
            NotFoundError: there is no such row.
        """
        item = self.check_not_found(await self.session.get(self.model_type, item_id), item_id)
        await self.session.delete(item)
        await self._flush_or_commit(auto_commit)
        self._expunge([item], auto_expunge)
        return item

    async def delete_many(
        self,
        item_ids: Sequence[Any],
        *,
        auto_commit: bool | None = None,
        auto_expunge: bool | None = None,
    ) -> builtins.list[ModelT]:
        """Delete the rows of ``item_ids`` (one SELECT for all) and return their instances."""
        idents = list(item_ids)
        items = await self._all(self._many_statement(idents, reload=False)) if idents else []
        for item in items:
            await self.session.delete(item)
        await self._flush_or_commit(auto_commit)
        self._expunge(items, auto_expunge)
        return items

    async def _flush_or_commit(self, auto_commit: bool | None) -> None:
        if self._flag(auto_commit, self.auto_commit):
            await self.session.commit()
        else:
            await self.session.flush()

    async def _refresh(self, item: ModelT, auto_refresh: bool | None) -> None:
        if self._flag(auto_refresh, self.auto_refresh):
            await self.session.refresh(item)
