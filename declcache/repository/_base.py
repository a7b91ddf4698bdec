"""What the sync and async repositories share: statements, idents, cache policy. No I/O.

The two repositories are thin layers over :class:`RepositoryBase`, the way httpx's ``Client``
and ``AsyncClient`` share ``BaseClient``: this module decides *what* to run and *whether* the
cache may answer; ``_sync`` and ``_async`` only run it.

When the cache is used (see :meth:`RepositoryBase._cache_for`):

* only for models the manager caches, and unless ``use_cache=False``;
* never while the session holds changes to the model — pending, or flushed and not yet
  committed. The cache holds committed rows only: such a session reads the database (and
  sees its own writes), and never fills the cache with rows another transaction cannot see;
* always in the session's scope (:mod:`declcache._scope`): its schema and tenant are part of
  every key it reads and fills, and of every singleflight key, so one tenant never receives
  what another read; a session whose scope cannot be told reads the database.

A database read on the cached path reloads the row (``populate_existing``): an instance the
session loaded earlier must not put its older state into the cache.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Select, func, inspect, literal, select

from declcache._api import Ident, Lookup
from declcache._keys import (
    UNSCOPED,
    ident_parts,
    normalized,
    primary_key_names,
    primary_key_values,
    primary_keys_in,
)
from declcache._listeners import SESSION_MANAGER_KEY, is_writing
from declcache._scope import translate_map
from declcache.exceptions import NotFoundError
from declcache.repository._statement_key import query_key

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.orm import Mapper, Session
    from sqlalchemy.sql.selectable import TableClause

    from declcache._keys import Scope
    from declcache._manager import CacheManager
    from declcache._meta import ModelSpec
    from declcache._reads import ListProbe, Probe
    from declcache._singleflight import Outcome

__all__ = ["CacheView", "CachedRead", "ModelT", "RepositoryBase"]

logger = logging.getLogger("declcache.repository")

ModelT = TypeVar("ModelT")

_specs: weakref.WeakKeyDictionary[CacheManager, dict[type, ModelSpec | None]] = (
    weakref.WeakKeyDictionary()
)


def _spec(manager: CacheManager, model: type) -> ModelSpec | None:
    """The manager's resolved spec of ``model``, resolved once per manager."""
    per_manager = _specs.setdefault(manager, {})
    if model not in per_manager:
        per_manager[model] = manager.spec(model)
    return per_manager[model]


def _found(result: Any) -> Any:
    """A manager lookup result as the repository returns it: ``NOT_FOUND`` becomes ``None``."""
    return None if result is Lookup.NOT_FOUND else result


@dataclass(frozen=True, slots=True)
class CacheView:
    """The manager as one session's reads use it: in that session's scope.

    Equal views are one scope of one manager, so a singleflight key holding a view is a
    key per scope: a read in one tenant never lands on another tenant's flight. The session
    itself is not part of the view (sessions of one scope share flights); each read names
    the session its hits enter.
    """

    manager: CacheManager
    scope: Scope

    def probe(self, model: type, idents: Sequence[Ident], session: Session) -> Probe:
        """:meth:`CacheManager.probe` in this scope, its hits entering ``session``."""
        return self.manager.probe(model, idents, scope=self.scope, session=session)

    async def aprobe(self, model: type, idents: Sequence[Ident], session: Session) -> Probe:
        """:meth:`CacheManager.aprobe` in this scope, its hits entering ``session``."""
        return await self.manager.aprobe(model, idents, scope=self.scope, session=session)

    def load_many(
        self,
        model: type,
        idents: Sequence[Ident],
        loader: Callable[[list[Ident]], Any],
        session: Session,
        *,
        probe: Probe | None = None,
    ) -> list[Any]:
        """:meth:`CacheManager.load_many` in this scope, its hits entering ``session``."""
        return self.manager.load_many(
            model, idents, loader, probe=probe, scope=self.scope, session=session
        )

    async def aload_many(
        self,
        model: type,
        idents: Sequence[Ident],
        loader: Callable[[list[Ident]], Awaitable[Iterable[Any]]],
        session: Session,
        *,
        probe: Probe | None = None,
    ) -> list[Any]:
        """:meth:`CacheManager.aload_many` in this scope, its hits entering ``session``."""
        return await self.manager.aload_many(
            model, idents, loader, probe=probe, scope=self.scope, session=session
        )

    def probe_list(self, model: type, query_key: str, session: Session) -> ListProbe:
        """:meth:`CacheManager.probe_list` in this scope, its hits entering ``session``."""
        return self.manager.probe_list(model, query_key, scope=self.scope, session=session)

    async def aprobe_list(self, model: type, query_key: str, session: Session) -> ListProbe:
        """:meth:`CacheManager.aprobe_list` in this scope, its hits entering ``session``."""
        return await self.manager.aprobe_list(model, query_key, scope=self.scope, session=session)


@dataclass(frozen=True)
class CachedRead:
    """One read-through after a look-up missed, planned: what the sync and async layers run.

    A hit never gets this far: the repositories answer it straight from the manager's
    probe. On a miss, the leader of :attr:`flight_key` runs :attr:`load` (or :attr:`aload`)
    with a database loader and the probe (or, holding :attr:`mutex`, with ``None``: it must
    look again under the lock); the manager fills the cache.

    Attributes:
        flight_key: names the read for singleflight; ``None`` when it cannot be named.
        load: ``load(loader, probe)``: the cached value, else ``loader()``'s, filled in the
            cache; ``probe`` is what the missed look-up saw, so it is not looked up again.
        aload: the same for coroutines: ``await aload(loader, probe)``, ``loader`` async.
        mutex: the backend's distributed fill lock, or ``None``.
    """

    flight_key: Hashable | None
    load: Callable[[Callable[..., Any], Any], Any]
    aload: Callable[[Callable[..., Awaitable[Any]], Any], Awaitable[Any]]
    mutex: Callable[[], Any]


@functools.cache
def _model_shape(model: type) -> tuple[Mapper[Any], list[Any], tuple[str, ...]]:
    """``(mapper, primary-key columns, primary-key attribute names)``, worked out once."""
    mapper: Mapper[Any] = inspect(model)
    return mapper, list(mapper.primary_key), primary_key_names(mapper)


class RepositoryBase(Generic[ModelT]):
    """State and planning common to the sync and async repositories.

    Subclasses set ``model_type`` to the mapped class they serve.
    """

    model_type: type[ModelT]

    def __init__(
        self,
        sync_session: Session,
        *,
        cache_manager: CacheManager | None,
        auto_expunge: bool,
        auto_refresh: bool,
        auto_commit: bool,
    ) -> None:
        model = getattr(type(self), "model_type", None)
        if not isinstance(model, type):
            raise TypeError(f"{type(self).__name__} must set model_type to a mapped class")
        self.auto_expunge = auto_expunge
        self.auto_refresh = auto_refresh
        self.auto_commit = auto_commit
        self._sync_session = sync_session
        self._mapper, self._pk_columns, self._pk_names = _model_shape(model)
        self._dialect: Dialect | None = None
        self._manager = self._attach_manager(sync_session, cache_manager)
        self._views: dict[Scope, CacheView] = {}
        self._unscoped: CacheView | None = None

    @staticmethod
    def _attach_manager(session: Session, explicit: CacheManager | None) -> CacheManager | None:
        """The manager to use: the one passed, else the session's.

        A manager passed explicitly is also recorded in ``session.info`` when the session
        names none, so the session listeners invalidate what this session commits.
        """
        named: CacheManager | None = session.info.get(SESSION_MANAGER_KEY)
        if explicit is None:
            return named
        if named is None:
            session.info[SESSION_MANAGER_KEY] = explicit
        elif named is not explicit:
            logger.warning(
                "the repository's cache_manager is not the session's: commits of this "
                "session invalidate the session's manager only"
            )
        return explicit

    @property
    def cache_manager(self) -> CacheManager | None:
        """The manager this repository reads through, if any."""
        return self._manager

    # -- policy ----------------------------------------------------------------------------

    def _cache_for(self, use_cache: bool) -> CacheView | None:
        """The cache in the session's scope when it may answer this read (see the module doc)."""
        manager = self._manager
        if not use_cache or manager is None or not manager.is_cached(self.model_type):
            return None
        if is_writing(self._sync_session, self.model_type):
            logger.debug("%s read from the database: this session is writing it", self._name)
            return None
        scope = manager.scope(self._sync_session, self.model_type)
        if scope is None:
            return None
        # most reads are unscoped: no hashing of the scope for them
        view = self._unscoped if scope is UNSCOPED else self._views.get(scope)
        if view is None or view.manager is not manager:
            view = CacheView(manager, scope)
            if scope is UNSCOPED:
                self._unscoped = view
            else:
                self._views[scope] = view
        return view

    @staticmethod
    def _flag(value: bool | None, default: bool) -> bool:
        return default if value is None else value

    @property
    def _name(self) -> str:
        return self.model_type.__name__

    # -- idents and entity reads -------------------------------------------------------------

    def _ident_where(self, ident: Ident) -> list[ColumnElement[bool]]:
        if isinstance(ident, Mapping):
            return [getattr(self.model_type, name) == value for name, value in ident.items()]
        values = primary_key_values(ident)
        if len(values) != len(self._pk_columns):
            raise ValueError(
                f"{self._name} has a primary key of {len(self._pk_columns)} columns, got {ident!r}"
            )
        return [column == value for column, value in zip(self._pk_columns, values, strict=True)]

    def _held(self, ident: Ident) -> Any:
        """The instance the session holds for primary key ``ident``, unless expired; or ``None``.

        Like ``session.get``, a read of an identity the session holds returns that instance
        without asking the cache. An expired one (after a commit) is refilled from the
        cache instead of by a query: a hit of that identity enters the session as that very
        instance (:mod:`declcache._assemble`).
        """
        if isinstance(ident, Mapping):
            if set(ident) != set(self._pk_names):
                return None
            values: tuple[Any, ...] = tuple(ident[name] for name in self._pk_names)
        else:
            values = primary_key_values(ident)
        identity_map = self._sync_session.identity_map
        if not identity_map:  # a fresh session, as for most requests
            return None
        try:
            key = self._mapper.identity_key_from_primary_key(values)
            item = identity_map.get(key)
        except (TypeError, KeyError):  # an unhashable or malformed ident
            return None
        if item is None or inspect(item).expired:
            return None
        return item

    def _entity_statement(self, ident: Ident) -> Select[Any]:
        """One row by key, reloaded even if the session holds it (see the module doc)."""
        return (
            select(self.model_type)
            .where(*self._ident_where(ident))
            .execution_options(populate_existing=True)
        )

    def _many_statement(self, idents: Sequence[Ident], *, reload: bool) -> Select[Any]:
        """All rows of ``idents`` (primary keys) in one query."""
        tuples = [primary_key_values(ident) for ident in idents]
        statement = select(self.model_type).where(primary_keys_in(self._pk_columns, tuples))
        return statement.execution_options(populate_existing=True) if reload else statement

    def _key_ident(
        self, cache: CacheView, filters: Sequence[Any], fields: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """``fields`` as a cache ident when they are exactly a key of the model, else ``None``."""
        if filters or not fields or any(value is None for value in fields.values()):
            return None
        spec = _spec(cache.manager, self.model_type)
        if spec is None or not any(set(keys) == set(fields) for keys in spec.key_fields):
            return None
        return dict(fields)

    def _entity_flight_key(self, cache: CacheView, ident: Ident) -> Hashable | None:
        fields, values = ident_parts(ident, self._pk_names)
        try:
            named = sorted(zip(fields, values, strict=True), key=lambda pair: pair[0])
            names = tuple(name for name, _ in named)  # a key set named in any order
            texts = normalized(self._mapper, names, [value for _, value in named])
            return (cache, self.model_type, names, texts)
        except (ValueError, TypeError, KeyError):
            return None

    def _entity_read(self, cache: CacheView, ident: Ident) -> CachedRead:
        model, manager, scope = self.model_type, cache.manager, cache.scope
        session = self._sync_session
        return CachedRead(
            flight_key=self._entity_flight_key(cache, ident),
            load=lambda loader, probe: manager.load(
                model, ident, loader, probe=probe, scope=scope, session=session
            ),
            aload=lambda loader, probe: manager.aload(
                model, ident, loader, probe=probe, scope=scope, session=session
            ),
            mutex=lambda: manager.fill_mutex(model, ident, scope=scope),
        )

    # -- queries -----------------------------------------------------------------------------

    def _select(self, filters: Sequence[Any], fields: Mapping[str, Any]) -> Select[Any]:
        return select(self.model_type).where(*filters).filter_by(**fields)

    def _list_statement(
        self,
        filters: Sequence[Any],
        fields: Mapping[str, Any],
        order_by: Any,
        limit: int | None,
        offset: int | None,
    ) -> Select[Any]:
        statement = self._select(filters, fields)
        if order_by is not None:
            columns = order_by if isinstance(order_by, (list, tuple)) else [order_by]
            statement = statement.order_by(*columns)
        if limit is not None:
            statement = statement.limit(limit)
        if offset is not None:
            statement = statement.offset(offset)
        return statement

    def _count_statement(self, filters: Sequence[Any], fields: Mapping[str, Any]) -> Select[Any]:
        return select(func.count()).select_from(self.model_type).where(*filters).filter_by(**fields)

    def _exists_statement(self, filters: Sequence[Any], fields: Mapping[str, Any]) -> Select[Any]:
        return (
            select(literal(1))
            .select_from(self.model_type)
            .where(*filters)
            .filter_by(**fields)
            .limit(1)
        )

    def _query_key(self, cache: CacheView, kind: str, statement: Select[Any]) -> str | None:
        """The cache key of a query result, or ``None`` when the query cannot be keyed.

        In a translated schema, the whole schema map is part of it: a query may join tables
        the map sends elsewhere than the model's.
        """
        schemas = None
        if cache.scope.schema:
            schemas = translate_map(self._sync_session, self._mapper)
        return query_key(kind, statement, self._get_dialect(), self._tables, schemas)

    def _query_read(self, cache: CacheView, key: str) -> CachedRead:
        """The read-through of the query result cached under ``key``."""
        model, manager, scope = self.model_type, cache.manager, cache.scope
        session = self._sync_session
        return CachedRead(
            flight_key=(cache, model, key),
            load=lambda loader, probe: manager.load_list(
                model, key, loader, probe=probe, scope=scope, session=session
            ),
            aload=lambda loader, probe: manager.aload_list(
                model, key, loader, probe=probe, scope=scope, session=session
            ),
            mutex=lambda: manager.fill_mutex(model, query_key=key, scope=scope),
        )

    def _get_dialect(self) -> Dialect:
        if self._dialect is None:
            self._dialect = self._sync_session.get_bind(mapper=self._mapper).dialect
        return self._dialect

    @property
    def _tables(self) -> frozenset[TableClause]:
        """The tables whose changes reach this model's list version."""
        return frozenset(
            table for mapper in self._mapper.self_and_descendants for table in mapper.tables
        )

    # -- results -----------------------------------------------------------------------------

    def _reusable(self, outcome: Outcome[Any]) -> bool:
        """Whether a singleflight follower may return the leader's result as it is.

        Instances belong to the leader's session: another session's follower reads the
        cache the leader filled instead. ``None`` (no row) and counts belong to nobody.
        """
        if outcome.leader or outcome.owner is self._sync_session:
            return True
        value = outcome.value
        return outcome.error is None and (value is None or isinstance(value, int))

    def _expunge(self, items: Iterable[Any], auto_expunge: bool | None) -> None:
        """Detach ``items`` the session holds, when auto-expunge is on."""
        if not self._flag(auto_expunge, self.auto_expunge):
            return
        session = self._sync_session
        for item in items:
            if item is not None and item in session:
                session.expunge(item)

    def check_not_found(self, item: ModelT | None, ident: Any = None) -> ModelT:
        """Return ``item``, or raise :class:`~declcache.exceptions.NotFoundError` if ``None``."""
        if item is None:
            named = "" if ident is None else f" for {ident!r}"
            raise NotFoundError(f"no {self._name} found{named}")
        return item
