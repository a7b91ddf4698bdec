"""What a session's transaction has changed so far, kept as a stack of frames in ``session.info``.

One frame per transaction or savepoint that wrote something, each mapping a model to its
:class:`~declcache._invalidation.ModelChanges`. Every listener that sees a write — mapper
events, ORM and Core statements, database cascades — records it here, in the frame of the
innermost open transaction; the session events of :mod:`declcache._listeners` drop the frames
of what rolled back and take all the others at the outermost commit.

A session that writes before a manager is attached to it (manual set-up: the repository puts
its manager into ``session.info`` later) is still tracked: without a manager, a write records
its models whole, and whichever manager the session carries at commit applies it.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, ParamSpec

from sqlalchemy import inspect
from sqlalchemy.orm import Mapper, attributes
from sqlalchemy.orm.base import PassiveFlag

from declcache._invalidation import ModelChanges
from declcache._keys import UNSCOPED, Scope, primary_key_names
from declcache._private_apis import await_only, in_greenlet
from declcache._scope import translate_map, translated_schema

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session, SessionTransaction

    from declcache._manager import CacheManager

__all__ = [
    "SESSION_MANAGER_KEY",
    "Changes",
    "apply_changes",
    "drop_rolled_back",
    "forget_frames",
    "manager_of",
    "merged_frames",
    "never_failing_the_database",
    "pending_changes",
    "record_keys",
    "record_model",
    "take_frames",
    "use_default_manager",
]

#: ``session.info`` key of the session's CacheManager (the name advanced-alchemy uses).
SESSION_MANAGER_KEY = "cache_manager"
_FRAMES_KEY = "_declcache_frames"

Changes = dict[type, ModelChanges]
_P = ParamSpec("_P")
logger = logging.getLogger("declcache.listeners")
#: The manager of sessions whose ``info`` names none (``setup_cache_listeners``).
_state: dict[str, Any] = {"default": None}


def use_default_manager(manager: CacheManager) -> None:
    """Have sessions whose ``info`` names no manager use ``manager``."""
    _state["default"] = manager


def manager_of(session: Session) -> CacheManager | None:
    """The enabled manager ``session`` writes for: its own, else the default; else ``None``."""
    manager: CacheManager | None = session.info.get(SESSION_MANAGER_KEY) or _state["default"]
    return manager if manager is not None and manager.enabled else None


def never_failing_the_database(record: Callable[_P, None]) -> Callable[_P, None]:
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


def record_model(
    session: Session,
    manager: CacheManager | None,
    model: type,
    *,
    connection: Connection | None = None,
    schemas: Mapping[str | None, str | None] | None = None,
) -> ModelChanges:
    """The innermost frame's changes of ``model``, noting the scope this write is made in.

    Without a manager (one may be attached before the commit) the scope is the schema the
    write went to, outside every named scope: it reaches every tenant of that schema.
    """
    change = _frame(session).setdefault(model, ModelChanges())
    if manager is not None:
        scope = manager.scope(session, model, connection=connection, schemas=schemas, reading=False)
    else:
        mapper: Mapper[Any] = inspect(model)
        schema = translated_schema(
            mapper, schemas if schemas is not None else translate_map(session, mapper, connection)
        )
        scope = Scope(schema) if schema else UNSCOPED
    change.scopes.add(UNSCOPED if scope is None else scope)
    if manager is None:  # its key sets depend on the manager's configuration
        change.whole_model = True
    return change


def record_keys(
    session: Session,
    manager: CacheManager | None,
    cached: Mapper[Any],
    target: object,
    connection: Connection | None,
) -> None:
    """Record ``target``'s keys (old and new) as an entity of ``cached``; else the model whole."""
    change = record_model(session, manager, cached.class_, connection=connection)
    spec = manager.spec(cached.class_) if manager is not None else None
    if spec is None:
        change.whole_model = True
        return
    primary_key = primary_key_names(cached)
    try:
        identity = _old_and_new(target, primary_key)
    except (AttributeError, KeyError):
        identity = None
    # The row's one primary key (not changed by this flush): a tombstone at each of its
    # ``key_fields`` keys names it, so that a read by that key looks the row's entry up too.
    pointed = next(iter(identity)) if identity is not None and len(identity) == 1 else None
    for fields in spec.key_fields:
        try:
            keys = _old_and_new(target, fields)
        except (AttributeError, KeyError):  # a sibling class's field the row does not map
            keys = None
        if keys is None:  # a key value we cannot know: drop the whole model
            change.whole_model = True
        else:
            change.keys.update((fields, values) for values in keys)
            if pointed is not None and fields != primary_key:
                change.pointers.update(((fields, values), pointed) for values in keys)


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


def pending_changes(session: Session) -> list[Changes]:
    """The changes of every frame still open in ``session``, outermost first."""
    frames = session.info.get(_FRAMES_KEY)
    return [changes for _, changes in frames] if frames else []


def _inside(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


def drop_rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
    """Forget the frames of ``previous_transaction`` and of the savepoints inside it."""
    frames = session.info.get(_FRAMES_KEY)
    if frames:
        frames[:] = [f for f in frames if not _inside(f[0], previous_transaction)]


def take_frames(session: Session) -> Changes | None:
    """Remove every frame, merged into one set of changes; ``None`` when nothing was written."""
    merged = merged_frames(session)
    session.info.pop(_FRAMES_KEY, None)
    return merged


def merged_frames(session: Session) -> Changes | None:
    """Every frame still open, merged into one set of changes (a copy); ``None`` if none.

    What the outermost commit will hand to the manager, as long as nothing is flushed in
    between: the strict mode marks it just before the database commits
    (:mod:`declcache._strict`).
    """
    frames = session.info.get(_FRAMES_KEY)
    if not frames:
        return None
    merged: Changes = {}
    for _, changes in frames:
        for model, change in changes.items():
            merged.setdefault(model, ModelChanges()).merge(change)
    return merged


def forget_frames(session: Session) -> None:
    """Drop every frame: the outermost transaction ended."""
    session.info.pop(_FRAMES_KEY, None)


def apply_changes(manager: CacheManager, changes: Changes) -> None:
    """Invalidate ``changes`` through ``manager`` before returning.

    Under ``AsyncSession`` the listeners run inside SQLAlchemy's greenlet; there, the
    invalidation is awaited on the manager's async store before ``await session.commit()``
    returns, so the event loop keeps running and no later read can overtake it.
    """
    if in_greenlet():
        await_only(manager.aapply(changes))
    else:
        manager.apply(changes)
