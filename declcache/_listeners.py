"""Session listeners: collect what a transaction changes, invalidate it after the commit.

:func:`setup_cache_listeners` installs every listener declcache needs. Those of the session's
own life live here; each frame of changes is kept by :mod:`declcache._frames`:

* the mapper events ``after_insert``/``after_update``/``after_delete`` record, for every row of
  a cached model a flush writes (cascades and delete-orphans included), each of its keys — old
  and new values when a key field changed — in the frame of the innermost transaction, with
  what the database writes on the ORM's behalf (:mod:`declcache._cascades`) and the classes a
  single-table discriminator change moves the row between (:mod:`declcache._inheritance`);
* ``do_orm_execute`` marks the whole model (bases and subclasses too) for ORM bulk
  ``insert``/``update``/``delete`` statements and for textual SQL that names its models with
  the ``invalidate_models`` execution option;
* ``after_soft_rollback`` drops the rolled-back transaction's frame and those of the
  savepoints inside it, so a rolled-back savepoint forgets only its own changes;
* ``after_commit`` of the outermost transaction hands all remaining frames to the manager —
  unless the session was joined to a database transaction that is still open: then they wait
  for its ``COMMIT`` (:mod:`declcache._outer_commit`);
* with a strict manager (``DECLCACHE_CONSISTENCY=strict``), the engine's ``commit`` event
  marks the frames in the cache first, after the last flush and before the database commits
  (:mod:`declcache._strict`), and ``after_commit`` hands the markers' claims over with them.

Statements a session runs outside its unit of work (the legacy bulk methods, Core through a
session) are seen at the engine (:mod:`declcache._core_writes`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.pool import Pool

from declcache import _core_writes, _outer_commit, _strict
from declcache._association_writes import record_association_writes
from declcache._cascades import record_cascades
from declcache._frames import (
    SESSION_MANAGER_KEY,
    apply_changes,
    drop_rolled_back,
    forget_frames,
    manager_of,
    never_failing_the_database,
    pending_changes,
    record_keys,
    record_model,
    take_frames,
    use_default_manager,
)
from declcache._inheritance import cached_family, cached_lineage, discriminator_changed
from declcache._private_apis import session_is_clean
from declcache._scope import OWN_LISTENERS

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import ORMExecuteState, SessionTransaction

    from declcache._manager import CacheManager

__all__ = [
    "INVALIDATE_MODELS_OPTION",
    "SESSION_MANAGER_KEY",
    "has_uncommitted_changes",
    "is_writing",
    "setup_cache_listeners",
]

#: Execution option naming the models a textual statement writes, e.g.
#: ``session.execute(text("UPDATE users …"), execution_options={"invalidate_models": [User]})``.
INVALIDATE_MODELS_OPTION = "invalidate_models"

_state: dict[str, Any] = {"registered": False}
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
            use_default_manager(default_manager)
        if _state["registered"]:
            return
        event.listen(Mapper, "after_insert", _after_insert)
        event.listen(Mapper, "after_update", _after_update)
        event.listen(Mapper, "after_delete", _after_delete)
        event.listen(Session, "do_orm_execute", _do_orm_execute)
        OWN_LISTENERS.add(_do_orm_execute)
        event.listen(Session, "after_begin", _after_begin)
        event.listen(Session, "before_flush", _core_writes.flush_started)
        event.listen(Session, "after_flush", _core_writes.flush_ended)
        event.listen(Session, "after_soft_rollback", _after_soft_rollback)
        event.listen(Session, "after_commit", _after_commit)
        event.listen(Session, "after_transaction_end", _after_transaction_end)
        event.listen(Engine, "after_execute", _core_writes.after_execute)
        event.listen(Engine, "rollback", _outer_commit.root_rolled_back)
        event.listen(Pool, "reset", _outer_commit.pool_reset)
        _strict.install()
        _state["registered"] = True


def is_writing(session: Session, model: type) -> bool:
    """Whether ``session`` holds pending or flushed, uncommitted changes to ``model``.

    What such a session reads must come from the database (it sees its own writes) and must
    not be cached (no other session sees them yet).
    """
    if not session_is_clean(session):  # a quick test first: most reads come with none
        for items in (session.new, session.dirty, session.deleted):
            if any(isinstance(item, model) for item in items):
                return True
    return has_uncommitted_changes(session, model)


def has_uncommitted_changes(session: Session, model: type) -> bool:
    """Whether ``session`` flushed changes to ``model`` (or a related class) not yet committed.

    Such a session sees rows no other session sees yet: what it reads must not be cached.
    That includes changes its earlier ``commit()`` left waiting for an outer database
    transaction of the connection it is bound to.
    """
    pending = pending_changes(session)
    if _outer_commit.ever_deferred():
        pending += _outer_commit.deferred_changes(session)
    for changes in pending:
        if any(issubclass(c, model) or issubclass(model, c) for c in changes):
            return True
    return False


def _record_row(kind: str, mapper: Mapper[Any], connection: Connection, target: object) -> None:
    """Record the keys of a row the unit of work wrote, and what the database did with it.

    Mapper events see every row a flush writes, including cascades and delete-orphans that
    never appear in ``session.deleted``; what they cannot see — rows the database rewrites
    through its foreign keys, and the classes a discriminator change moves a row between —
    is added here.
    """
    session = inspect(target).session
    if session is None:
        return
    manager = manager_of(session)
    lineage = cached_lineage(manager, mapper)
    for cached in lineage:
        record_keys(session, manager, cached, target, connection)
    if kind == "update" and discriminator_changed(mapper, target):
        for cached in cached_family(manager, mapper):
            if cached not in lineage:
                record_keys(session, manager, cached, target, connection)
    if kind != "insert":
        record_cascades(session, manager, mapper, target, connection, on=kind)
    record_association_writes(session, manager, mapper, target, connection)


@never_failing_the_database
def _after_insert(mapper: Mapper[Any], connection: Connection, target: object) -> None:
    _record_row("insert", mapper, connection, target)


@never_failing_the_database
def _after_update(mapper: Mapper[Any], connection: Connection, target: object) -> None:
    _record_row("update", mapper, connection, target)


@never_failing_the_database
def _after_delete(mapper: Mapper[Any], connection: Connection, target: object) -> None:
    _record_row("delete", mapper, connection, target)


def _do_orm_execute_mappers(state: ORMExecuteState) -> list[Mapper[Any]]:
    if state.is_update or state.is_delete or state.is_insert:
        return list(state.all_mappers)
    return []


@never_failing_the_database
def _do_orm_execute(state: ORMExecuteState) -> None:
    """Mark the models of an ORM bulk statement, or named by ``invalidate_models``, whole.

    Core statements on a table through the session are recorded by
    :func:`declcache._core_writes.after_execute`.
    """
    manager = manager_of(state.session)
    named = state.execution_options.get(INVALIDATE_MODELS_OPTION) or ()
    mappers = [*_do_orm_execute_mappers(state), *(inspect(model) for model in named)]
    schemas = state.execution_options.get("schema_translate_map")
    for mapper in mappers:
        for cached in cached_family(manager, mapper):
            change = record_model(state.session, manager, cached.class_, schemas=schemas)
            change.whole_model = True


def _after_begin(
    session: Session, _transaction: SessionTransaction, connection: Connection
) -> None:
    """Note which session runs on ``connection``, for the Core and commit listeners."""
    _core_writes.note_session(connection, session)
    _outer_commit.note_connection(session, connection)


def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    _core_writes.flush_ended(session)  # a failed flush never reached ``after_flush``
    drop_rolled_back(session, previous_transaction)


def _after_commit(session: Session) -> None:
    if session.get_nested_transaction() is not None:
        return  # a savepoint was released: its frame waits for the outermost commit
    changes = take_frames(session)
    manager = manager_of(session)
    if changes is None or manager is None:
        return
    _strict.attach_claims(session, changes)
    if not _outer_commit.defer_to_outer_commit(session, manager, changes):
        apply_changes(manager, changes)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction ended (committed or not)
        forget_frames(session)
        _strict.forget_claims(session)
        _outer_commit.forget_connections(session)
        _core_writes.flush_ended(session)
