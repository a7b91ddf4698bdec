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
* ``after_commit`` of the outermost transaction hands all remaining frames to the manager —
  unless the session was joined to a database transaction that is still open
  (``Session(bind=connection)`` inside ``connection.begin()``): then they wait on that
  connection and are applied right after its root transaction's database ``COMMIT``, and
  dropped when it rolls back (see :func:`_defer`);
* a Core listener on every engine (``after_execute``) records the ``INSERT``/``UPDATE``/
  ``DELETE`` statements a session runs outside its unit of work — the legacy bulk methods
  (``bulk_save_objects``, ``bulk_insert_mappings``, ``bulk_update_mappings``) and Core
  ``table.update()`` through a session — by primary key when the statement names each row
  by it, else the whole model;
* what the database writes on the ORM's behalf is recorded with the row that caused it:
  ``ON DELETE``/``ON UPDATE`` ``CASCADE``, ``SET NULL``, ``SET DEFAULT`` on a foreign key
  (the children's keys when the session holds their collection, else the dependent models
  whole), and a single-table-inheritance discriminator change (the row's keys in every
  class of the family).

A session that writes before a manager is attached to it (manual set-up: the repository puts
its manager into ``session.info`` later) is still tracked: without a manager, a write records
its models whole, and whichever manager the session carries at commit applies it.

Under ``AsyncSession`` the listeners run inside SQLAlchemy's greenlet; there, the invalidation
is awaited on the manager's async store before ``await session.commit()`` returns, so the event
loop keeps running and no later read can overtake the invalidation.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, ParamSpec

from sqlalchemy import event, inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapper, Session, attributes
from sqlalchemy.orm.base import PassiveFlag
from sqlalchemy.pool import Pool
from sqlalchemy.sql import operators
from sqlalchemy.sql.dml import Delete, Insert, Update, UpdateBase
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList

from declcache._invalidation import ModelChanges
from declcache._keys import UNSCOPED, Scope, primary_key_names
from declcache._private_apis import await_only, in_greenlet
from declcache._registry import cascading_tables, declared_meta, models_of_table
from declcache._scope import OWN_LISTENERS, translate_map, translated_schema
from declcache.exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from sqlalchemy import ColumnElement, ForeignKeyConstraint, Table
    from sqlalchemy.engine import Dialect
    from sqlalchemy.orm import ORMExecuteState, RelationshipProperty, SessionTransaction
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
    from sqlalchemy.sql.selectable import TableClause

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
#: ``session.info``: the connections the session's open transaction runs on.
_CONNECTIONS_KEY = "_declcache_written_connections"
#: ``session.info``: set while the unit of work flushes (its rows are seen by mapper events).
_FLUSHING_KEY = "_declcache_uow_flushing"
#: ``connection.info`` (the DBAPI connection's): changes waiting for its root ``COMMIT``.
_DEFERRED_KEY = "_declcache_deferred_invalidations"
#: Dialects whose ``do_commit`` applies deferred changes after the database commit.
_hooked_dialects: weakref.WeakSet[Dialect] = weakref.WeakSet()
#: Which session a connection runs statements for (set when the session begins on it).
_session_of: weakref.WeakKeyDictionary[Connection, weakref.ref[Session]] = (
    weakref.WeakKeyDictionary()
)

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
        event.listen(Mapper, "after_insert", _after_insert)
        event.listen(Mapper, "after_update", _after_update)
        event.listen(Mapper, "after_delete", _after_delete)
        event.listen(Session, "do_orm_execute", _do_orm_execute)
        OWN_LISTENERS.add(_do_orm_execute)
        event.listen(Session, "after_begin", _after_begin)
        event.listen(Session, "before_flush", _before_flush)
        event.listen(Session, "after_flush", _after_flush)
        event.listen(Session, "after_soft_rollback", _after_soft_rollback)
        event.listen(Session, "after_commit", _after_commit)
        event.listen(Session, "after_transaction_end", _after_transaction_end)
        event.listen(Engine, "after_execute", _after_execute)
        event.listen(Engine, "rollback", _root_rolled_back)
        event.listen(Pool, "reset", _pool_reset)
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


def _is_cached(manager: CacheManager | None, mapper: Mapper[Any]) -> bool:
    """Whether ``manager`` caches ``mapper``'s class; a cache it cannot build caches nothing.

    Without a manager: whether the class declares a CacheMeta, which a manager attached
    before the commit may cache. Configurations are checked before any flush
    (``_registry.watch``); one that slipped through is logged here, and the other models of
    the row are still recorded.
    """
    try:
        if manager is None:
            return declared_meta(mapper.class_) is not None
        return manager.is_cached(mapper.class_)
    except ConfigurationError:
        logger.exception("%s is not cached: its configuration is invalid", mapper.class_.__name__)
        return False


def _cached_lineage(manager: CacheManager | None, mapper: Mapper[Any]) -> list[Mapper[Any]]:
    """The mapper and its inherited mappers that this manager caches (a row is all of them)."""
    return [m for m in mapper.iterate_to_root() if _is_cached(manager, m)]


def _cached_family(manager: CacheManager | None, mapper: Mapper[Any]) -> list[Mapper[Any]]:
    """Every cached mapper of ``mapper``'s inheritance hierarchy, from its root down.

    A statement on a subclass can move a row to a sibling (a single-table discriminator
    ``UPDATE``), so the whole hierarchy is touched, not only bases and subclasses.
    """
    return [m for m in mapper.base_mapper.self_and_descendants if _is_cached(manager, m)]


def has_uncommitted_changes(session: Session, model: type) -> bool:
    """Whether ``session`` flushed changes to ``model`` (or a related class) not yet committed.

    Such a session sees rows no other session sees yet: what it reads must not be cached.
    That includes changes its earlier ``commit()`` left waiting for an outer database
    transaction of the connection it is bound to.
    """
    pending: list[Changes] = [changes for _, changes in session.info.get(_FRAMES_KEY, ())]
    for connection in _connections_of(session):
        pending.extend(changes for _, changes in _deferred(connection))
    for changes in pending:
        if any(issubclass(changed, model) or issubclass(model, changed) for changed in changes):
            return True
    return False


def _connections_of(session: Session) -> list[Connection]:
    """The open connections the session runs on: its transaction's, and its bind's."""
    found: list[Connection] = list(session.info.get(_CONNECTIONS_KEY, ()))
    if isinstance(session.bind, Connection):
        found.append(session.bind)
    return [connection for connection in found if not connection.closed]


def _deferred(connection: Connection) -> list[tuple[CacheManager, Changes]]:
    """Changes waiting for ``connection``'s root transaction to commit."""
    try:
        waiting: list[tuple[CacheManager, Changes]] = connection.info.get(_DEFERRED_KEY, [])
    except Exception:  # an invalidated connection has no DBAPI connection to ask
        return []
    return waiting


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


def _record_keys(
    session: Session,
    manager: CacheManager | None,
    cached: Mapper[Any],
    target: object,
    connection: Connection | None,
) -> None:
    """Record ``target``'s keys (old and new) as an entity of ``cached``; else the model whole."""
    change = _change(session, manager, cached.class_, connection=connection)
    spec = manager.spec(cached.class_) if manager is not None else None
    if spec is None:
        change.whole_model = True
        return
    for fields in spec.key_fields:
        try:
            keys = _old_and_new(target, fields)
        except (AttributeError, KeyError):  # a sibling class's field the row does not map
            keys = None
        if keys is None:  # a key value we cannot know: drop the whole model
            change.whole_model = True
        else:
            change.keys.update((fields, values) for values in keys)


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
    manager = _manager_of(session)
    lineage = _cached_lineage(manager, mapper)
    for cached in lineage:
        _record_keys(session, manager, cached, target, connection)
    if kind == "update" and _discriminator_changed(mapper, target):
        for cached in _cached_family(manager, mapper):
            if cached not in lineage:
                _record_keys(session, manager, cached, target, connection)
    if kind != "insert":
        _record_cascades(session, manager, mapper, target, connection, on=kind)


@_never_failing_the_database
def _after_insert(mapper: Mapper[Any], connection: Connection, target: object) -> None:
    _record_row("insert", mapper, connection, target)


@_never_failing_the_database
def _after_update(mapper: Mapper[Any], connection: Connection, target: object) -> None:
    _record_row("update", mapper, connection, target)


@_never_failing_the_database
def _after_delete(mapper: Mapper[Any], connection: Connection, target: object) -> None:
    _record_row("delete", mapper, connection, target)


def _discriminator_changed(mapper: Mapper[Any], target: object) -> bool:
    """Whether this flush changed the row's polymorphic discriminator (it moves class)."""
    column = mapper.polymorphic_on
    if column is None:
        return False
    try:
        key = mapper.get_property_by_column(column).key
    except Exception:  # an expression, not a mapped column: it may have changed
        return True
    history = attributes.get_history(target, key, passive=PassiveFlag.PASSIVE_NO_INITIALIZE)
    return bool(history.added or history.deleted)


def _record_cascades(
    session: Session,
    manager: CacheManager | None,
    mapper: Mapper[Any],
    target: object,
    connection: Connection,
    *,
    on: str,
) -> None:
    """Record the rows the database deletes or rewrites because of this row's delete/update.

    For each foreign key with a rewriting ``ON DELETE``/``ON UPDATE`` action pointing at the
    row's tables: nothing when the unit of work wrote the children itself (their own events
    recorded them), the children's keys when the session holds their collection, else every
    cached model of the dependent table whole — and, since a cascade can cascade again,
    the tables depending on that one.
    """
    state = inspect(target)
    whole: set[TableClause] = set()
    for table in mapper.tables:
        for dependent, constraint in cascading_tables(table, on=on):
            if on == "update" and not _referenced_changed(mapper, target, constraint):
                continue
            children = _children_known(mapper, state, dependent, on)
            if children is None:
                whole.add(dependent)
            for child in children or ():
                child_mapper = inspect(child).mapper
                for cached in _cached_lineage(manager, child_mapper):
                    _record_keys(session, manager, cached, child, connection)
    seen: set[TableClause] = set()
    while whole:
        reached = whole.pop()
        seen.add(reached)
        for model in models_of_table(reached):
            for cached in _cached_lineage(manager, inspect(model)):
                _change(session, manager, cached.class_, connection=connection).whole_model = True
        for action in ("delete", "update"):
            whole.update(t for t, _ in cascading_tables(reached, on=action) if t not in seen)


def _referenced_changed(
    mapper: Mapper[Any], target: object, constraint: ForeignKeyConstraint
) -> bool:
    """Whether this update changed a column the foreign key refers to."""
    for element in constraint.elements:
        try:
            key = mapper.get_property_by_column(element.column).key
        except Exception:  # not mapped here: it may have changed
            return True
        history = attributes.get_history(target, key, passive=PassiveFlag.PASSIVE_NO_INITIALIZE)
        if history.added or history.deleted:
            return True
    return False


def _children_known(
    mapper: Mapper[Any], state: Any, dependent: Table, on: str
) -> Sequence[object] | None:
    """The children the database rewrites, when the session knows all of them; else ``None``.

    An empty list: the unit of work wrote them itself. It does so for a loaded collection
    unless ``passive_deletes="all"`` (delete) and when ``passive_updates=False`` (update);
    with ``passive_updates=True`` it only changes the loaded children in memory, so their
    keys are recorded here.
    """
    for relationship in _relationships_to(mapper, dependent):
        if on == "update" and not relationship.passive_updates:
            return []
        if relationship.key not in state.dict:  # not loaded: the children are unknown
            continue
        if on == "delete":
            if relationship.passive_deletes == "all":
                continue
            return []
        loaded = state.dict[relationship.key]
        return list(loaded) if relationship.uselist else [loaded] if loaded is not None else []
    return None


def _relationships_to(mapper: Mapper[Any], dependent: Table) -> Iterable[RelationshipProperty[Any]]:
    """One-to-many relationships of ``mapper`` whose children live in ``dependent``."""
    for relationship in mapper.relationships:
        if relationship.direction.name == "ONETOMANY" and dependent in relationship.mapper.tables:
            yield relationship


def _do_orm_execute_mappers(state: ORMExecuteState) -> list[Mapper[Any]]:
    if state.is_update or state.is_delete or state.is_insert:
        return list(state.all_mappers)
    return []


@_never_failing_the_database
def _do_orm_execute(state: ORMExecuteState) -> None:
    """Mark the models of an ORM bulk statement, or named by ``invalidate_models``, whole.

    Core statements on a table through the session are recorded by :func:`_after_execute`.
    """
    manager = _manager_of(state.session)
    named = state.execution_options.get(INVALIDATE_MODELS_OPTION) or ()
    mappers = [*_do_orm_execute_mappers(state), *(inspect(model) for model in named)]
    schemas = state.execution_options.get("schema_translate_map")
    for mapper in mappers:
        for cached in _cached_family(manager, mapper):
            _change(state.session, manager, cached.class_, schemas=schemas).whole_model = True


# -- statements outside the unit of work: legacy bulk methods, Core through a session ------


def _after_begin(
    session: Session, _transaction: SessionTransaction, connection: Connection
) -> None:
    """Note which session runs on ``connection``, for the Core and commit listeners."""
    _session_of[connection] = weakref.ref(session)
    held: list[Connection] = session.info.setdefault(_CONNECTIONS_KEY, [])
    if connection not in held:
        held.append(connection)


def _before_flush(session: Session, *_args: object) -> None:
    session.info[_FLUSHING_KEY] = True


def _after_flush(session: Session, *_args: object) -> None:
    session.info.pop(_FLUSHING_KEY, None)


@_never_failing_the_database
def _after_execute(
    connection: Connection,
    statement: object,
    multiparams: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    execution_options: Mapping[str, Any],
    _result: object,
) -> None:
    """Record an ``INSERT``/``UPDATE``/``DELETE`` a session ran outside its unit of work.

    The unit of work's own statements are skipped (mapper events record them, key by key);
    what remains are the legacy bulk methods, ORM bulk statements (also recorded by
    :func:`_do_orm_execute`) and Core statements executed through the session.
    """
    if not isinstance(statement, UpdateBase):
        return
    ref = _session_of.get(connection)
    session = ref() if ref is not None else None
    if session is None or session.info.get(_FLUSHING_KEY):
        return
    table: Any = getattr(statement, "table", None)
    if table is None:
        return
    manager = _manager_of(session)
    rows = list(multiparams) or [params]
    schemas = execution_options.get("schema_translate_map")
    for model in models_of_table(table):
        for cached in _cached_lineage(manager, inspect(model)):
            change = _change(
                session, manager, cached.class_, connection=connection, schemas=schemas
            )
            spec = manager.spec(cached.class_) if manager is not None else None
            keys = (
                None if spec is None else _statement_keys(statement, cached, spec.key_fields, rows)
            )
            if keys is None:
                change.whole_model = True
            else:
                change.keys.update(keys)


def _statement_keys(
    statement: UpdateBase,
    mapper: Mapper[Any],
    key_sets: Sequence[tuple[str, ...]],
    rows: Sequence[Mapping[str, Any]],
) -> set[tuple[tuple[str, ...], tuple[Any, ...]]] | None:
    """The entity keys a bulk statement writes, when its parameters name every row; else ``None``.

    * ``INSERT``: every key set's values are in each row's parameters;
    * ``UPDATE``/``DELETE``: the ``WHERE`` clause is exactly ``primary key = :bound`` (as the
      legacy bulk methods write it) and each row's parameters bind it. An ``UPDATE`` of a
      model with other key sets is not keyed: their old values are unknown.
    """
    if not rows or not all(rows):
        return None
    primary_key = tuple(primary_key_names(mapper))
    found: set[tuple[tuple[str, ...], tuple[Any, ...]]] = set()
    if isinstance(statement, Insert):
        columns = {fields: _column_keys(mapper, fields) for fields in key_sets}
        for row in rows:
            for fields, names in columns.items():
                if names is None or any(name not in row for name in names):
                    return None
                values = tuple(row[name] for name in names)
                if None not in values:
                    found.add((fields, values))
        return found
    if not isinstance(statement, Update | Delete):
        return None
    if isinstance(statement, Update) and any(fields != primary_key for fields in key_sets):
        return None
    binds = _primary_key_binds(statement.whereclause, mapper)
    if binds is None:
        return None
    for row in rows:
        if any(bind not in row for bind in binds):
            return None
        found.add((primary_key, tuple(row[bind] for bind in binds)))
    return found


def _column_keys(mapper: Mapper[Any], fields: tuple[str, ...]) -> list[str] | None:
    """The Core parameter names (column keys) of ``fields``; ``None`` if one is no column."""
    names = []
    for name in fields:
        prop: Any = mapper.attrs.get(name)
        columns = getattr(prop, "columns", None)
        if not columns:
            return None
        names.append(columns[0].key)
    return names


def _primary_key_binds(where: ColumnElement[Any] | None, mapper: Mapper[Any]) -> list[str] | None:
    """The bound parameter of each primary-key column, when ``where`` is exactly those tests."""
    if where is None:
        return None
    clauses = list(where.clauses) if isinstance(where, BooleanClauseList) else [where]
    if isinstance(where, BooleanClauseList) and where.operator is not operators.and_:
        return None
    bound: dict[Any, str] = {}
    for clause in clauses:
        if not (
            isinstance(clause, BinaryExpression)
            and clause.operator is operators.eq
            and isinstance(clause.right, BindParameter)
        ):
            return None
        bound[clause.left] = clause.right.key
    names = []
    for column in mapper.primary_key:
        match = next((key for left, key in bound.items() if column.shares_lineage(left)), None)
        if match is None:
            return None
        names.append(match)
    return names if len(names) == len(bound) else None


def _inside(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    session.info.pop(_FLUSHING_KEY, None)  # a failed flush never reached ``after_flush``
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
    outer = [c for c in _connections_of(session) if c.in_transaction()]
    if outer:  # joined to a database transaction the session does not commit
        for connection in outer:
            _defer(connection, manager, merged)
        return
    _apply(manager, merged)


def _apply(manager: CacheManager, changes: Changes) -> None:
    if in_greenlet():
        await_only(manager.aapply(changes))
    else:
        manager.apply(changes)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction ended (committed or not)
        session.info.pop(_FRAMES_KEY, None)
        session.info.pop(_CONNECTIONS_KEY, None)
        session.info.pop(_FLUSHING_KEY, None)


# -- sessions joined to an outer database transaction -------------------------------------


def _defer(connection: Connection, manager: CacheManager, changes: Changes) -> None:
    """Keep ``changes`` until ``connection``'s root transaction commits in the database.

    ``session.commit()`` of a session joined to ``connection.begin()`` (any
    ``join_transaction_mode`` but ``control_fully``) commits nothing: invalidating then
    would let a read re-cache the old row before the real commit. SQLAlchemy has no event
    after a Core ``COMMIT`` (``ConnectionEvents.commit`` runs before it), so the dialect's
    ``do_commit`` — the documented hook every commit goes through — is wrapped once per
    dialect to apply what waits on the DBAPI connection right after it. A rollback of the
    root transaction, or the pool's reset of the connection, drops it.
    """
    connection.info.setdefault(_DEFERRED_KEY, []).append((manager, changes))
    dialect = connection.dialect
    with _register_lock:
        if dialect in _hooked_dialects:
            return
        original = dialect.do_commit

        def do_commit(dbapi_connection: PoolProxiedConnection) -> None:
            original(dbapi_connection)
            _apply_deferred(dbapi_connection)

        dialect.do_commit = do_commit  # type: ignore[method-assign]
        _hooked_dialects.add(dialect)


def _apply_deferred(dbapi_connection: PoolProxiedConnection) -> None:
    """Apply what waited for this commit; a cache fault never fails the committed work."""
    try:
        waiting = dbapi_connection.info.pop(_DEFERRED_KEY, None)
    except Exception:
        return
    for manager, changes in waiting or ():
        try:
            _apply(manager, changes)
        except Exception:
            logger.exception("declcache could not invalidate after an outer commit")


def _root_rolled_back(connection: Connection) -> None:
    try:
        connection.info.pop(_DEFERRED_KEY, None)
    except Exception:  # an invalidated connection: nothing can be read or dropped
        logger.debug("no DBAPI connection to drop deferred invalidations from")


def _pool_reset(
    _dbapi_connection: object, connection_record: ConnectionPoolEntry, _reset_state: object
) -> None:
    connection_record.info.pop(_DEFERRED_KEY, None)
