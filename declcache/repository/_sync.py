"""``SQLAlchemySyncRepository``: the repository methods over a ``Session``.

A thin layer over :mod:`declcache.repository._base`, which plans every read; this module runs
the plans with the session and the manager, and coordinates threads (singleflight) and
processes (the backend's distributed lock, when configured).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from declcache._api import Lookup
from declcache._associations import preload
from declcache._keys import match
from declcache._singleflight import ThreadFlights
from declcache.repository._base import CachedRead, ModelT, RepositoryBase, _found
from declcache.repository._updates import updated

if TYPE_CHECKING:
    import builtins
    from collections.abc import Callable, Iterator, Sequence

    from sqlalchemy import Select
    from sqlalchemy.orm import Session

    from declcache._fill_lock import FillLock
    from declcache._manager import CacheManager
    from declcache.repository._base import CacheView

__all__ = ["SQLAlchemySyncRepository"]

logger = logging.getLogger("declcache.repository")

_FLIGHTS = ThreadFlights()


@contextlib.contextmanager
def _held(mutex: FillLock) -> Iterator[None]:
    """Hold the fill lock, or wait for it at most its bound (then fill without it).

    A backend that fails to lock costs the lock, not the read (see :mod:`declcache._fill_lock`).
    """
    try:
        acquired = mutex.acquire(True)
    except Exception as error:
        logger.warning("distributed fill lock unavailable, filling without it: %r", error)
        acquired = False
    try:
        yield
    finally:
        if acquired:
            try:
                mutex.release()
            except Exception as error:  # e.g. it expired (lock_timeout) while we loaded
                logger.debug("distributed fill lock release failed: %r", error)


class SQLAlchemySyncRepository(RepositoryBase[ModelT]):
    """Reads through the cache, writes through the session.

    Args:
        session: the session to use.
        cache_manager: the manager to read through; default: ``session.info["cache_manager"]``
            (set by the config objects). ``None`` there too: no caching.
        auto_expunge: detach returned instances from the session.
        auto_refresh: refresh instances after ``add`` and ``update``.
        auto_commit: commit after writes (else flush).

    An instance served from the cache is persistent in ``session`` as if the session had
    loaded it (the instance the session already holds for that identity, if any): only the
    columns changed afterwards are flushed, and relationships and the attributes the cache
    does not hold load on access. With ``auto_expunge`` it is detached, as a database read
    then expunged.
    """

    def __init__(
        self,
        *,
        session: Session,
        cache_manager: CacheManager | None = None,
        auto_expunge: bool = False,
        auto_refresh: bool = True,
        auto_commit: bool = False,
    ) -> None:
        self.session = session
        super().__init__(
            session,
            cache_manager=cache_manager,
            auto_expunge=auto_expunge,
            auto_refresh=auto_refresh,
            auto_commit=auto_commit,
        )

    # -- entity reads ------------------------------------------------------------------------

    def get(
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
            item = self.session.get(self.model_type, item_id)
        else:
            item = self._held(item_id)
            if item is None:
                item = self._read_entity(cache, item_id)
        found = self.check_not_found(item, item_id)
        self._preload([found], preload, use_cache)
        self._expunge([found], auto_expunge)
        return found

    def get_many(
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
            items = match(
                self._mapper, idents, self._all(self._many_statement(idents, reload=False))
            )
        else:
            held = [self._held(ident) for ident in idents]
            rest = [ident for ident, item in zip(idents, held, strict=True) if item is None]
            loaded = iter(self._load_many(cache, rest) if rest else [])
            items = [next(loaded) if item is None else item for item in held]
        self._preload(items, preload, use_cache)
        self._expunge(items, auto_expunge)
        return items

    def _load_many(self, cache: CacheView, idents: builtins.list[Any]) -> builtins.list[Any]:
        """The cached or loaded instances of ``idents``, sharing loads with other threads.

        One look-up for all; then each missing id is either led (nobody loads it: this
        thread loads all it leads in one query) or followed (another thread's ``get`` or
        ``get_many`` loads it: this one waits for it, after landing its own). A follower
        takes the leader's result when it is its own session's (or no row), else reads the
        cache the leader filled, like :meth:`get`'s followers.
        """
        model, session = self.model_type, self.session

        def loader(missing: builtins.list[Any]) -> builtins.list[Any]:
            return self._all(self._many_statement(missing, reload=True))

        landed = _FLIGHTS.landed
        probe = cache.probe(model, idents, session)
        results = list(probe.results)
        misses = [i for i, found in enumerate(results) if found is Lookup.MISS]
        if not misses:
            return [_found(found) for found in results]
        keys = {i: self._entity_flight_key(cache, idents[i]) for i in misses}
        led, followed = _FLIGHTS.claim([key for key in keys.values() if key is not None], session)
        mine = [i for i in misses if keys[i] not in followed]  # led, or not shareable
        if mine:
            # Nothing landed since the look-up: the leader may fill against it, no second look.
            fresh = probe if len(mine) == len(misses) and _FLIGHTS.landed == landed else None
            try:
                loaded = self._lead_many(cache, idents, mine, fresh, loader)
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
            outcome = _FLIGHTS.wait(followed[keys[i]])
            if self._reusable(outcome):
                results[i] = outcome.result()
            else:
                again.append(i)
        if again:  # the leaders filled the cache: normally hits
            found_again = cache.load_many(model, [idents[i] for i in again], loader, session)
            for i, found in zip(again, found_again, strict=True):
                results[i] = found
        return [_found(found) for found in results]

    def _lead_many(
        self,
        cache: CacheView,
        idents: builtins.list[Any],
        mine: builtins.list[int],
        probe: Any,
        loader: Callable[[builtins.list[Any]], builtins.list[Any]],
    ) -> builtins.list[Any]:
        """Load ``idents`` at the positions ``mine`` (this thread leads them): one query.

        ``probe``: the look-up of every ident, when the leader may fill against it. With the
        backend's distributed lock, the ids whose lock is free are locked and loaded in one
        query (looked up again under the locks); for the others another process is
        loading, so this one waits for each lock (bounded), then reads what was filled.
        """
        model, session = self.model_type, self.session
        mutexes = [cache.manager.fill_mutex(model, idents[i], scope=cache.scope) for i in mine]
        if all(mutex is None for mutex in mutexes):
            if probe is not None:
                every = cache.load_many(model, idents, loader, session, probe=probe)
                return [every[i] for i in mine]
            return cache.load_many(model, [idents[i] for i in mine], loader, session)
        taken: builtins.list[FillLock] = []
        busy: dict[int, FillLock] = {}
        for i, mutex in zip(mine, mutexes, strict=True):
            if mutex is None:
                continue
            try:
                if mutex.acquire(False):
                    taken.append(mutex)
                else:
                    busy[i] = mutex
            except Exception as error:  # load it without the lock
                logger.warning("distributed fill lock unavailable, filling without it: %r", error)
        values: dict[int, Any] = {}
        now = [i for i in mine if i not in busy]
        try:
            if now:
                loaded = cache.load_many(model, [idents[i] for i in now], loader, session)
                values.update(zip(now, loaded, strict=True))
        finally:
            for mutex in taken:
                with contextlib.suppress(Exception):  # it expires with its lock_timeout
                    mutex.release()
        if busy:
            for mutex in busy.values():  # another process fills it: wait for it to end
                with _held(mutex):
                    pass
            later = list(busy)
            loaded = cache.load_many(model, [idents[i] for i in later], loader, session)
            values.update(zip(later, loaded, strict=True))
        return [values[i] for i in mine]

    def get_one(
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
        item = self.get_one_or_none(
            *filters, use_cache=use_cache, auto_expunge=auto_expunge, preload=preload, **fields
        )
        return self.check_not_found(item, fields or None)

    def get_one_or_none(
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
                item = self._read_entity(cache, ident)
        else:
            item = self._one_or_none(self._select(filters, fields))
        self._preload([item], preload, use_cache)
        self._expunge([item], auto_expunge)
        return item

    def _read_entity(self, cache: CacheView, ident: Any) -> Any:
        landed = _FLIGHTS.landed
        probe = cache.probe(self.model_type, [ident], self.session)
        found = probe.results[0]
        if found is not Lookup.MISS:  # a hit: no plan, no singleflight, no statement
            return _found(found)

        def loader() -> Any:
            return self._one_or_none(self._entity_statement(ident))

        return self._run(self._entity_read(cache, ident), loader, probe, landed)

    # -- queries -----------------------------------------------------------------------------

    def list(
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
        items: builtins.list[ModelT] = self._cached_query("list", statement, use_cache)
        self._preload(items, preload, use_cache)
        self._expunge(items, auto_expunge)
        return items

    def list_and_count(
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
        items = self.list(
            *filters,
            order_by=order_by,
            limit=limit,
            offset=offset,
            use_cache=use_cache,
            auto_expunge=auto_expunge,
            preload=preload,
            **fields,
        )
        return items, self.count(*filters, use_cache=use_cache, **fields)

    def count(self, *filters: Any, use_cache: bool = True, **fields: Any) -> int:
        """How many rows match; cached under the model's list version."""
        statement = self._count_statement(filters, fields)
        counted: int = self._cached_query("count", statement, use_cache)
        return counted

    def exists(self, *filters: Any, use_cache: bool = True, **fields: Any) -> bool:
        """Whether a row matches; cached under the model's list version."""
        statement = self._exists_statement(filters, fields)
        return bool(self._cached_query("exists", statement, use_cache))

    def _cached_query(self, kind: str, statement: Select[Any], use_cache: bool) -> Any:
        cache = self._cache_for(use_cache)
        key = None if cache is None else self._query_key(cache, kind, statement)
        if cache is None or key is None:
            return self._query(kind, statement, reload=False)
        landed = _FLIGHTS.landed
        probe = cache.probe_list(self.model_type, key, self.session)
        if probe.result is not Lookup.MISS:
            return probe.result
        read = self._query_read(cache, key)
        return self._run(read, lambda: self._query(kind, statement, reload=True), probe, landed)

    def _query(self, kind: str, statement: Select[Any], *, reload: bool) -> Any:
        if kind == "list":
            return self._all(statement.execution_options(populate_existing=reload))
        value = self.session.execute(statement).scalar()
        return int(value or 0)

    def _all(self, statement: Select[Any]) -> builtins.list[Any]:
        """The instances ``statement`` selects, each once (see :meth:`_one_or_none`)."""
        return list(self.session.execute(statement).unique().scalars().all())

    def _one_or_none(self, statement: Select[Any]) -> Any:
        """The instance ``statement`` selects, or ``None``.

        ``unique()``: a model may load a collection ``lazy="joined"``, which repeats the row
        once per member; SQLAlchemy refuses such a result without it.
        """
        return self.session.execute(statement).unique().scalars().one_or_none()

    # -- running a cached read ---------------------------------------------------------------

    def _run(self, read: CachedRead, loader: Callable[[], Any], probe: Any, landed: int) -> Any:
        """Run a read that missed: singleflight in this process, the fill lock across processes.

        ``probe`` is what the missed look-up saw, when :attr:`ThreadFlights.landed` was
        ``landed``; the leader fills against it unless a flight landed since (it may have
        filled the entry) or it takes the fill lock: then it looks again.
        """

        def lead() -> Any:
            mutex = read.mutex()
            if mutex is None:
                return read.load(loader, probe if _FLIGHTS.landed == landed else None)
            with _held(mutex):
                return read.load(loader, None)

        if read.flight_key is None:
            return lead()
        outcome = _FLIGHTS.run(read.flight_key, self.session, lead)
        if self._reusable(outcome):
            return outcome.result()
        return read.load(loader, None)  # the leader filled the cache: normally a hit

    def _preload(self, items: Sequence[Any], names: Sequence[str], use_cache: bool) -> None:
        """Load relationships ``names`` of ``items`` together, from the cache when it may."""
        if names:
            preload(self.session, self._manager if use_cache else None, items, names)

    # -- writes ------------------------------------------------------------------------------

    def add(
        self,
        data: ModelT,
        *,
        auto_commit: bool | None = None,
        auto_expunge: bool | None = None,
        auto_refresh: bool | None = None,
    ) -> ModelT:
        """Add ``data``; flush, or commit with ``auto_commit``."""
        self.session.add(data)
        self._flush_or_commit(auto_commit)
        self._refresh(data, auto_refresh)
        self._expunge([data], auto_expunge)
        return data

    def add_many(
        self,
        data: Sequence[ModelT],
        *,
        auto_commit: bool | None = None,
        auto_expunge: bool | None = None,
    ) -> builtins.list[ModelT]:
        """Add every instance of ``data``; flush, or commit with ``auto_commit``."""
        items = list(data)
        self.session.add_all(items)
        self._flush_or_commit(auto_commit)
        self._expunge(items, auto_expunge)
        return items

    def update(
        self,
        data: ModelT,
        *,
        auto_commit: bool | None = None,
        auto_expunge: bool | None = None,
        auto_refresh: bool | None = None,
    ) -> ModelT:
        """Write ``data``'s changes; flush, or commit with ``auto_commit``.

        ``data`` the session holds is flushed as it is. Of an instance with an identity it
        does not hold (detached, or another session's), only the attributes changed since
        it was loaded are written, onto the row as it is now; a transient one is merged.

        Raises:
            StaleDataError: the row was deleted, or (with a ``version_id_col``) changed
                since ``data`` was loaded.
        """
        item = updated(self.session, data)
        self._flush_or_commit(auto_commit)
        self._refresh(item, auto_refresh)
        self._expunge([item], auto_expunge)
        return item

    def delete(
        self, item_id: Any, *, auto_commit: bool | None = None, auto_expunge: bool | None = None
    ) -> ModelT:
        """Delete the row with primary key ``item_id`` and return its instance.

        Raises:
            NotFoundError: there is no such row.
        """
        item = self.check_not_found(self.session.get(self.model_type, item_id), item_id)
        self.session.delete(item)
        self._flush_or_commit(auto_commit)
        self._expunge([item], auto_expunge)
        return item

    def delete_many(
        self,
        item_ids: Sequence[Any],
        *,
        auto_commit: bool | None = None,
        auto_expunge: bool | None = None,
    ) -> builtins.list[ModelT]:
        """Delete the rows of ``item_ids`` (one SELECT for all) and return their instances."""
        idents = list(item_ids)
        items = self._all(self._many_statement(idents, reload=False)) if idents else []
        for item in items:
            self.session.delete(item)
        self._flush_or_commit(auto_commit)
        self._expunge(items, auto_expunge)
        return items

    def _flush_or_commit(self, auto_commit: bool | None) -> None:
        if self._flag(auto_commit, self.auto_commit):
            self.session.commit()
        else:
            self.session.flush()

    def _refresh(self, item: ModelT, auto_refresh: bool | None) -> None:
        if self._flag(auto_refresh, self.auto_refresh):
            self.session.refresh(item)
