"""Session listeners: collect what a transaction changes, invalidate it after the commit.

Bookkeeping lives in ``session.info`` as a stack of frames, one per transaction or savepoint
that flushed something:

* the mapper events ``after_insert``/``after_update``/``after_delete`` record, for every row of
  a cached model a flush writes (cascades and delete-orphans included), each of its keys — old
  and new values when a key field changed — in the frame of the innermost transaction;
* ``do_orm_execute`` marks the whole model (bases and subclasses too) for ORM bulk
  ``insert``/``update``/``delete`` statements and for textual SQL that names its models with
  the ``invalidate_models`` execution option;
* ``after_soft_rollback`` drops the rolled-back transaction's frame and those of the
  savepoints inside it, so a rolled-back savepoint forgets only its own changes;
* ``after_commit`` of the outermost transaction hands all remaining frames to the manager.

Under ``AsyncSession`` the listeners run inside SQLAlchemy's greenlet; there, the invalidation
is awaited on the manager's async store before ``await session.commit()`` returns, so the event
loop keeps running and no later read can overtake the invalidation.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import TYPE_CHECKING, Any, ParamSpec

from sqlalchemy import event, inspect
from sqlalchemy.orm import Mapper, Session, attributes
from sqlalchemy.orm.base import PassiveFlag

from declcache._invalidation import ModelChanges
from declcache._keys import UNSCOPED, primary_key_names
from declcache._private_apis import await_only, in_greenlet
from declcache._registry import cached_models
from declcache._scope import OWN_LISTENERS
from declcache.exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import ORMExecuteState, SessionTransaction

    from declcache._manager import CacheManager

__all__ = [
    "INVALIDATE_MODELS_OPTION",
    "SESSION_MANAGER_KEY",
    "has_uncommitted_changes",
    "setup_cache_listeners",
]

#: ``session.info`` key of the session's CacheManager (the name advanced-alchemy uses).
SESSION_MANAGER_KEY = "cache_manager"
#: Execution option naming the models a textual statement writes, e.g.
#: ``session.execute(text("UPDATE users …"), execution_options={"invalidate_models": [User]})``.
INVALIDATE_MODELS_OPTION = "invalidate_models"
_FRAMES_KEY = "_declcache_frames"

Changes = dict[type, ModelChanges]
_P = ParamSpec("_P")
logger = logging.getLogger("declcache.listeners")
_state: dict[str, Any] = {"registered": False, "default": None}
_register_lock = threading.Lock()


def setup_cache_listeners(default_manager: CacheManager | None = None) -> None:
    """Install the session listeners; call once at start-up (calling again is harmless).

    Args:
        default_manager: the manager for sessions whose ``info`` names none
            (``Session(engine, info={"cache_manager": manager})`` names one; the config
            objects and repositories do it for you).
    """
    with _register_lock:
        if default_manager is not None:
            _state["default"] = default_manager
        if _state["registered"]:
            return
        for row_event in ("after_insert", "after_update", "after_delete"):
            event.listen(Mapper, row_event, _after_row_written)
        event.listen(Session, "do_orm_execute", _do_orm_execute)
        OWN_LISTENERS.add(_do_orm_execute)
        event.listen(Session, "after_soft_rollback", _after_soft_rollback)
        event.listen(Session, "after_commit", _after_commit)
        event.listen(Session, "after_transaction_end", _after_transaction_end)
        _state["registered"] = True


def _manager_of(session: Session) -> CacheManager | None:
    manager: CacheManager | None = session.info.get(SESSION_MANAGER_KEY) or _state["default"]
    return manager if manager is not None and manager.enabled else None


def _frame(session: Session) -> Changes:
    """The changes of the innermost open transaction (a savepoint or the outermost one)."""
    transaction = session.get_nested_transaction() or session.get_transaction()
    frames: list[tuple[SessionTransaction | None, Changes]] = session.info.setdefault(
        _FRAMES_KEY, []
    )
    if frames and frames[-1][0] is transaction:
        return frames[-1][1]
    changes: Changes = {}
    frames.append((transaction, changes))
    return changes


def _change(
    session: Session,
    manager: CacheManager,
    model: type,
    *,
    connection: Connection | None = None,
    schemas: Mapping[str | None, str | None] | None = None,
) -> ModelChanges:
    """The innermost frame's changes of ``model``, noting the scope this write is made in."""
    change = _frame(session).setdefault(model, ModelChanges())
    scope = manager.scope(session, model, connection=connection, schemas=schemas, reading=False)
    change.scopes.add(UNSCOPED if scope is None else scope)
    return change


def _is_cached(manager: CacheManager, mapper: Mapper[Any]) -> bool:
    """Whether ``manager`` caches ``mapper``'s class; a cache it cannot build caches nothing.

    Configurations are checked before any flush (``_registry.watch``); one that slipped
    through is logged here, and the other models of the row are still recorded.
    """
    try:
        return manager.is_cached(mapper.class_)
    except ConfigurationError:
        logger.exception("%s is not cached: its configuration is invalid", mapper.class_.__name__)
        return False


def _cached_lineage(manager: CacheManager, mapper: Mapper[Any]) -> list[Mapper[Any]]:
    """The mapper and its inherited mappers that this manager caches (a row is all of them)."""
    return [m for m in mapper.iterate_to_root() if _is_cached(manager, m)]


def _cached_family(manager: CacheManager, mapper: Mapper[Any]) -> list[Mapper[Any]]:
    """Every cached mapper a statement on ``mapper``'s tables can touch: bases and subclasses."""
    family = {*mapper.iterate_to_root(), *mapper.self_and_descendants}
    return [m for m in family if _is_cached(manager, m)]


def has_uncommitted_changes(session: Session, model: type) -> bool:
    """Whether ``session`` flushed changes to ``model`` (or a related class) not yet committed.

    Such a session sees rows no other session sees yet: what it reads must not be cached.
    """
    for _, changes in session.info.get(_FRAMES_KEY, ()):
        if any(issubclass(changed, model) or issubclass(model, changed) for changed in changes):
            return True
    return False


_UNKNOWN = object()


def _old_and_new(instance: object, fields: tuple[str, ...]) -> set[tuple[Any, ...]] | None:
    """The key values before and after this flush; ``None`` when one cannot be known.

    A key with a ``None`` value names no cache entry and is left out.
    """
    state = inspect(instance)
    identity = (
        dict(zip(primary_key_names(state.mapper), state.key[1], strict=True)) if state.key else {}
    )
    old, new = [], []
    for name in fields:
        history = attributes.get_history(instance, name, passive=PassiveFlag.PASSIVE_NO_INITIALIZE)
        current = [*history.added, *history.unchanged]
        if current:
            value = current[0]
        elif name in state.dict:
            value = state.dict[name]
        else:
            value = identity.get(name, _UNKNOWN)
        if value is _UNKNOWN:
            return None
        new.append(value)
        old.append(history.deleted[0] if history.deleted else value)
    return {values for values in (tuple(old), tuple(new)) if None not in values}


def _never_failing_the_database(record: Callable[_P, None]) -> Callable[_P, None]:
    """Run a listener that records writes so that nothing it raises reaches the flush.

    A cache configuration must never fail a database write; configurations are checked
    when the mappers are configured, so this only guards against what slipped through.
    Nothing was ever cached for a model whose cache cannot be built: nothing goes stale.
    """

    @functools.wraps(record)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            record(*args, **kwargs)
        except Exception:
            logger.exception("declcache could not record a write for invalidation")

    return guarded


@_never_failing_the_database
def _after_row_written(mapper: Mapper[Any], connection: Connection, target: object) -> None:
    """Record the keys of a row the unit of work inserted, updated or deleted.

    Mapper events see every row a flush writes, including cascades and delete-orphans that
    never appear in ``session.deleted``.
    """
    session = inspect(target).session
    manager = _manager_of(session) if session is not None else None
    if session is None or manager is None:
        return
    for cached in _cached_lineage(manager, mapper):
        spec = manager.spec(cached.class_)
        if spec is None:
            continue
        change = _change(session, manager, cached.class_, connection=connection)
        for fields in spec.key_fields:
            keys = _old_and_new(target, fields)
            if keys is None:  # a key value we cannot know: drop the whole model
                change.whole_model = True
            else:
                change.keys.update((fields, values) for values in keys)


def _written_mappers(state: ORMExecuteState) -> list[Mapper[Any]]:
    if state.is_update or state.is_delete or state.is_insert:
        if state.all_mappers:
            return list(state.all_mappers)
        table = getattr(state.statement, "table", None)  # Core DML on a Table, via a session
        return [
            inspect(model)
            for model in cached_models()
            if table is not None and table in inspect(model).tables
        ]
    return []


@_never_failing_the_database
def _do_orm_execute(state: ORMExecuteState) -> None:
    manager = _manager_of(state.session)
    if manager is None:
        return
    named = state.execution_options.get(INVALIDATE_MODELS_OPTION) or ()
    mappers = [*_written_mappers(state), *(inspect(model) for model in named)]
    schemas = state.execution_options.get("schema_translate_map")
    for mapper in mappers:
        for cached in _cached_family(manager, mapper):
            _change(state.session, manager, cached.class_, schemas=schemas).whole_model = True


def _inside(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    frames = session.info.get(_FRAMES_KEY)
    if frames:
        frames[:] = [f for f in frames if not _inside(f[0], previous_transaction)]


def _after_commit(session: Session) -> None:
    if session.get_nested_transaction() is not None:
        return  # a savepoint was released: its frame waits for the outermost commit
    frames = session.info.pop(_FRAMES_KEY, None)
    manager = _manager_of(session)
    if not frames or manager is None:
        return
    merged: Changes = {}
    for _, changes in frames:
        for model, change in changes.items():
            merged.setdefault(model, ModelChanges()).merge(change)
    if in_greenlet():
        await_only(manager.aapply(merged))
    else:
        manager.apply(merged)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction ended without a commit
        session.info.pop(_FRAMES_KEY, None)
