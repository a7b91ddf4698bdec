"""Relationships served from the cache: ``CacheMeta.cached_relationships``.

As Hibernate's collection cache and IdentityCache's ``cache_has_many`` do, a cached
collection (one-to-many, many-to-many) is stored as the primary keys of its members, and the
members are read through the member model's entity cache (one round trip, one query for the
entities it misses). A cached many-to-one needs no entry of its own: the foreign key is in
the parent's row, the target is one entity read.

**Where a collection lives.** In the member model's list namespace, under its *list version*
(``dc:Post:l:<version>:…``), in the session's scope. Every change that can move a member in
or out of a collection bumps that version after its commit, in every process: a member
inserted, deleted or updated (its foreign key among its columns), by the unit of work, a bulk
statement, a Core statement or a database cascade — the paths every list already covers. A
many-to-many collection also changes when only its association table does: the unit of work
records a list change of both models when it writes a collection's history
(:mod:`declcache._association_writes`), and a Core statement on an association table does the
same (:mod:`declcache._association_writes`). A fill writes under the version its look-up read, only
from a database view no older than that look-up, so it cannot bring back a collection that a
commit since replaced.

**How it is read.** The relationship's class-level loader (what SQLAlchemy calls when an
unloaded relationship is accessed) is wrapped by :class:`CacheFirstLoader`: in a session whose
manager caches both models and holds no uncommitted change to either, it answers from the
cache; otherwise, and on a miss, SQLAlchemy's own loader runs — whose collection then fills
the cache. So a hit and a database read serve the relationship alike, with no code at the
call site; :func:`preload` fills it for many parents in one round trip, as ``selectinload``.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, inspect, select
from sqlalchemy.orm import PassiveFlag, RelationshipDirection, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from declcache import _freshness
from declcache._api import Lookup
from declcache._driver import Call, run
from declcache._frames import manager_of
from declcache._keys import normalized, primary_key_names, primary_keys_in
from declcache._listeners import is_writing
from declcache._payload import COLLECTION
from declcache._private_apis import class_loader, in_greenlet, set_class_loader
from declcache._reads import ListProbe, fill_entry, joined_token, lagging

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from sqlalchemy.orm import Mapper, RelationshipProperty, Session
    from sqlalchemy.orm.state import InstanceState

    from declcache._driver import Flow
    from declcache._keys import Scope
    from declcache._manager import CacheManager
    from declcache._model_cache import ModelCache

__all__ = [
    "CacheFirstLoader",
    "install",
    "preload",
    "relationship_problem",
]

logger = logging.getLogger("declcache.relationships")

_REPOSITORIES: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()

#: Loader strategies whose attribute is no loaded collection or reference, or that must not
#: load one on access.
_UNSERVABLE_LAZY = frozenset({"dynamic", "write_only", "noload", "raise", "raise_on_sql"})


def relationship_problem(mapper: Mapper[Any], name: str) -> str | None:
    """Why ``name`` cannot be a cached relationship of ``mapper``'s model; ``None`` if it can."""
    prop = mapper.relationships.get(name)
    model = mapper.class_.__name__
    if prop is None:
        known = sorted(mapper.relationships.keys())
        return f"{name!r} is not a relationship of {model} (relationships: {known})"
    if prop.lazy in _UNSERVABLE_LAZY:
        return f"{name!r} is lazy={prop.lazy!r}: it loads nothing the cache could serve on access"
    if prop.direction is RelationshipDirection.MANYTOMANY and not isinstance(prop.secondary, Table):
        return f"{name!r} is many-to-many over {prop.secondary!r}, not over a plain Table"
    if prop.direction is RelationshipDirection.MANYTOONE:
        target = prop.mapper
        if set(prop.remote_side) != set(target.primary_key) or prop.secondary is not None:
            return (
                f"{name!r} is many-to-one to something other than "
                f"{target.class_.__name__}'s primary key"
            )
    return None


# -- the class-level loader ------------------------------------------------------------------


def install(mapper: Mapper[Any]) -> None:
    """Wrap the class-level loader of every relationship ``mapper`` declares (once).

    Cheap for relationships no manager caches: the wrapper is asked only when an unloaded
    relationship is accessed, which otherwise costs a query, and steps aside at once.
    """
    for prop in mapper.relationships:
        loader = class_loader(mapper, prop.key)
        if loader is not None and not isinstance(loader, CacheFirstLoader):
            set_class_loader(mapper, prop.key, CacheFirstLoader(prop, loader))


class CacheFirstLoader:
    """SQLAlchemy's loader of one relationship, asked only when the cache cannot answer.

    Called as SQLAlchemy calls a class-level loader: ``loader(state, passive)``, returning
    the related instance(s) to set as the attribute's committed value.
    """

    __slots__ = ("fallback", "prop")

    def __init__(self, prop: RelationshipProperty[Any], fallback: Callable[..., Any]) -> None:
        self.prop = prop
        self.fallback = fallback

    def __call__(self, state: InstanceState[Any], passive: PassiveFlag) -> Any:
        read = _read_of(self.prop, state, passive)
        if read is None:
            return self.fallback(state, passive)
        found = read.cached()
        if found is not Lookup.MISS:
            return found
        result = self.fallback(state, passive)
        read.fill(result)
        return result


def _read_of(
    prop: RelationshipProperty[Any], state: InstanceState[Any], passive: PassiveFlag
) -> _RelationshipRead | None:
    """How the cache can answer this access to ``prop``; ``None`` when it must not."""
    if not passive & PassiveFlag.SQL_OK or state.key is None:
        return None  # a flush or a backref asking what is at hand; or a pending parent
    session = state.session
    manager = None if session is None else manager_of(session)
    if session is None or manager is None or _outside_greenlet(session, prop):
        return None
    return _RelationshipRead.plan(manager, session, prop, [state])


def _outside_greenlet(session: Session, prop: RelationshipProperty[Any]) -> bool:
    """Whether this access of an ``AsyncSession``'s instance is a plain attribute access.

    SQLAlchemy's loader raises ``MissingGreenlet`` there; the cache must not answer instead
    only when it hits, or code that works while the cache is warm fails on its first miss.
    ``awaitable_attrs`` and ``preload`` run in the greenlet, where the cache answers.
    """
    if in_greenlet():
        return False
    try:
        return bool(session.get_bind(prop.parent).dialect.is_async)
    except Exception:  # no bind to tell: SQLAlchemy's loader will say what is wrong
        return True


@dataclass
class _RelationshipRead:
    """One cached relationship of some parents, in one session: a look-up and its fill."""

    manager: CacheManager
    session: Session
    prop: RelationshipProperty[Any]
    parents: list[InstanceState[Any]]
    scope: Scope
    seen: ListProbe | None = None

    @classmethod
    def plan(
        cls,
        manager: CacheManager,
        session: Session,
        prop: RelationshipProperty[Any],
        parents: list[InstanceState[Any]],
    ) -> _RelationshipRead | None:
        """The read, if ``manager`` serves ``prop`` to ``session`` now (see the module doc)."""
        parent, target = prop.parent.class_, prop.mapper.class_
        if not _serves(manager, parent, prop.key) or not manager.is_cached(target):
            return None
        if is_writing(session, parent) or is_writing(session, target):
            return None
        scope = manager.scope(session, target)
        return None if scope is None else cls(manager, session, prop, parents, scope)

    @property
    def _cache(self) -> ModelCache | None:
        return self.manager._usable(self.prop.mapper.class_, self.scope)

    def cached(self) -> Any:
        """The first parent's related instance(s) from the cache, or ``Lookup.MISS``."""
        return self.cached_all()[0]

    def cached_all(self) -> list[Any]:
        """Each parent's related instance(s) from the cache, or ``Lookup.MISS``, in order."""
        try:
            if self.prop.direction is RelationshipDirection.MANYTOONE:
                return self._references()
            return self._collections()
        except Exception as error:  # a cache fault: the database answers
            logger.warning("cached relationship %s failed: %r", self.prop, error)
            return [Lookup.MISS] * len(self.parents)

    def _references(self) -> list[Any]:
        idents = [_foreign_key(self.prop, state) for state in self.parents]
        wanted = list(dict.fromkeys(ident for ident in idents if ident is not None))
        found = dict(zip(wanted, _reader(self)(wanted), strict=True))
        return [Lookup.MISS if ident is None else found[ident] for ident in idents]

    def _collections(self) -> list[Any]:
        cache = self._cache
        if cache is None:
            return [Lookup.MISS] * len(self.parents)
        keys = [collection_key(self.prop, state) for state in self.parents]
        members, self.seen = run(_probe(cache, keys), cache.store)
        wanted = list(dict.fromkeys(ident for ids in members if ids is not None for ident in ids))
        found = dict(zip(wanted, _reader(self)(wanted), strict=True)) if wanted else {}
        if any(item is None for item in found.values()):
            return [Lookup.MISS] * len(self.parents)  # a member is gone: ask the database
        return [Lookup.MISS if ids is None else [found[ident] for ident in ids] for ids in members]

    def fill(self, result: Any, index: int = 0) -> None:
        """Cache ``result``, the database's collection of parent ``index``, if still fresh."""
        seen, cache = self.seen, self._cache
        if seen is None or seen.version is None or cache is None or not isinstance(result, list):
            return
        since, lag = _freshness.view(self.session)
        if since < seen.started or lagging(cache, lag, seen, ()):
            cache.counters.add("fills_refused")
            return
        try:
            body = [cache.codec.encode_primary_key(member) for member in result]
        except Exception as error:
            logger.debug("%s not cached: %r", self.prop, error)
            return
        key = cache.keys.list_key(collection_key(self.prop, self.parents[index]))
        payload = cache.fitting(cache.payloads.dump(seen.version, COLLECTION, *body))
        run(fill_entry(cache, key, payload), cache.store)


def _serves(manager: CacheManager, model: type, name: str) -> bool:
    spec = manager.spec(model)
    return spec is not None and name in spec.cached_relationships


def _reader(read: _RelationshipRead) -> Callable[[list[Any]], list[Any]]:
    """``get_many`` of the related model's stock repository in the read's session."""
    repository = _repository_of(read.prop.mapper.class_)(
        session=read.session, cache_manager=read.manager
    )
    return repository.get_many  # type: ignore[no-any-return]


def _repository_of(model: type) -> type:
    """A stock repository class of ``model``, made once per model."""
    found = _REPOSITORIES.get(model)
    if found is None:
        from declcache.repository import SQLAlchemySyncRepository  # noqa: PLC0415 - above us

        found = type(
            f"{model.__name__}Relations", (SQLAlchemySyncRepository,), {"model_type": model}
        )
        _REPOSITORIES[model] = found
    return found


def _foreign_key(prop: RelationshipProperty[Any], state: InstanceState[Any]) -> Any:
    """The target's primary key a many-to-one holds, from the parent's loaded columns."""
    by_remote = {remote: local for local, remote in prop.local_remote_pairs}
    values = []
    for column in prop.mapper.primary_key:
        attribute = prop.parent.get_property_by_column(by_remote[column]).key
        value = state.dict.get(attribute)
        if value is None:
            return None  # unloaded, or no target: SQLAlchemy's loader knows what to do
        values.append(value)
    return values[0] if len(values) == 1 else tuple(values)


def collection_key(prop: RelationshipProperty[Any], state: InstanceState[Any]) -> str:
    """The query key of one parent's collection, in the member model's list namespace."""
    mapper = prop.parent
    assert state.key is not None, "a persistent parent"
    texts = normalized(mapper, primary_key_names(mapper), list(state.key[1]))
    return f"rel:{mapper.class_.__qualname__}.{prop.key}:" + "\x1f".join(texts)


def _probe(cache: ModelCache, query_keys: Sequence[str]) -> Flow[tuple[list[Any], ListProbe]]:
    """The member ids each key holds (``None`` for a miss), and what the look-up saw."""
    tokens = cache.keys.list_version_keys
    started = time.monotonic()
    try:
        raws = yield Call("get_many", [*tokens, *(cache.keys.list_key(k) for k in query_keys)])
        version = yield from joined_token(cache, tokens, raws)
    except Exception as error:
        cache.fault("get", error)
        return [None] * len(query_keys), ListProbe(Lookup.MISS, None)
    members = [_ids(cache, cache.current(raw, version)) for raw in raws[len(tokens) :]]
    hits = sum(ids is not None for ids in members)
    cache.counters.add("hits", hits)
    cache.counters.add("misses", len(members) - hits)
    return members, ListProbe(Lookup.MISS, version, raws[: len(tokens)], started)


def _ids(cache: ModelCache, payload: Any) -> list[Any] | None:
    if payload is None or payload.kind != COLLECTION:
        return None
    try:
        return [cache.codec.decode_primary_key(values) for values in payload.body]
    except (ValueError, TypeError) as error:
        cache.counters.add("errors")
        logger.warning("%s: ignoring an undecodable cached collection: %r", cache.name, error)
        return None


# -- preloading ------------------------------------------------------------------------------


def preload(
    session: Session, manager: CacheManager | None, instances: Iterable[Any], names: Iterable[str]
) -> None:
    """Load relationships ``names`` of ``instances`` from the cache, as ``selectinload`` would.

    One backend round trip per relationship for the collections, one for their members;
    what the cache misses is loaded by one ``selectinload`` query and fills the cache. An
    instance whose relationship is loaded already is left as it is; a relationship the
    cache cannot serve to this session is loaded by ``selectinload`` alone.
    """
    parents = [inspect(item) for item in instances if item is not None]
    for name in names:
        if not parents:
            return
        mapper = parents[0].mapper
        prop = mapper.relationships[name]
        unloaded = [state for state in parents if state.key is not None and name not in state.dict]
        read = None if manager is None else _RelationshipRead.plan(manager, session, prop, unloaded)
        found = read.cached_all() if read is not None and unloaded else []
        missing = []
        for index, state in enumerate(unloaded):
            if index < len(found) and found[index] is not Lookup.MISS:
                set_committed_value(state.obj(), name, found[index])
            else:
                missing.append(state)
        if missing:
            _select_in(session, mapper, prop, missing)
            if read is not None and prop.direction is not RelationshipDirection.MANYTOONE:
                for index, state in enumerate(unloaded):
                    if state in missing and name in state.dict:
                        read.fill(list(state.dict[name]), index)


def _select_in(
    session: Session, mapper: Mapper[Any], prop: RelationshipProperty[Any], states: list[Any]
) -> None:
    """Load ``prop`` of ``states`` (persistent) in one query, as ``selectinload`` does.

    A collection: one query of the members joined through the relationship's own join
    condition (a custom ``primaryjoin`` or an association table included), each row naming its
    parent's key. A many-to-one: the parents again, with ``selectinload``.
    """
    columns = list(mapper.primary_key)
    keys = [state.key[1] for state in states]
    where = primary_keys_in(columns, keys)
    attribute = getattr(mapper.class_, prop.key)
    if prop.direction is RelationshipDirection.MANYTOONE or prop.mapper.common_parent(mapper):
        # a reference, or members of the parent's own class (the join would need aliases)
        session.execute(select(mapper).where(where).options(selectinload(attribute))).unique().all()
        return
    statement = (
        select(*columns, prop.mapper).select_from(mapper).join(attribute).where(where)
    ).order_by(*columns, *(prop.order_by or ()))
    found: dict[tuple[Any, ...], list[Any]] = {key: [] for key in keys}
    for row in session.execute(statement).unique():
        found[tuple(row[: len(columns)])].append(row[-1])
    for state, key in zip(states, keys, strict=True):
        set_committed_value(state.obj(), prop.key, found[key])
