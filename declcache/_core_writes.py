"""Writes a session runs outside its unit of work, seen at the engine.

The legacy bulk methods (``bulk_save_objects``, ``bulk_insert_mappings``,
``bulk_update_mappings``) and Core ``table.update()`` through a session write rows that no
mapper event sees. An engine-wide ``after_execute`` listener sees their ``INSERT``/``UPDATE``/
``DELETE`` statements and records them by primary key when the statement names each row by
it, else the whole model. It knows which session a connection runs for from the session's
``after_begin``, and skips the unit of work's own statements (mapper events record those, key
by key) by the mark ``before_flush`` sets and ``after_flush`` clears.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect
from sqlalchemy.sql import operators
from sqlalchemy.sql.dml import Delete, Insert, Update, UpdateBase
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList

from declcache._association_writes import association_models
from declcache._frames import manager_of, never_failing_the_database, record_model
from declcache._inheritance import cached_lineage
from declcache._keys import primary_key_names
from declcache._registry import models_of_table

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from sqlalchemy import ColumnElement
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Mapper, Session

__all__ = ["after_execute", "flush_ended", "flush_started", "note_session"]

#: ``session.info``: set while the unit of work flushes (its rows are seen by mapper events).
_FLUSHING_KEY = "_declcache_uow_flushing"
#: Which session a connection runs statements for (set when the session begins on it).
_session_of: weakref.WeakKeyDictionary[Connection, weakref.ref[Session]] = (
    weakref.WeakKeyDictionary()
)


def note_session(connection: Connection, session: Session) -> None:
    """Remember that ``connection`` runs ``session``'s statements (it began on it)."""
    _session_of[connection] = weakref.ref(session)


def flush_started(session: Session, *_args: object) -> None:
    """Mark ``session`` as flushing: its statements are the unit of work's (``before_flush``)."""
    session.info[_FLUSHING_KEY] = True


def flush_ended(session: Session, *_args: object) -> None:
    """Clear the flushing mark (``after_flush``, or a flush that failed or never ended)."""
    session.info.pop(_FLUSHING_KEY, None)


@never_failing_the_database
def after_execute(
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
    ``do_orm_execute``) and Core statements executed through the session.
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
    manager = manager_of(session)
    rows = list(multiparams) or [params]
    schemas = execution_options.get("schema_translate_map")
    for model in models_of_table(table):
        for cached in cached_lineage(manager, inspect(model)):
            change = record_model(
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
    for model in association_models(table):  # their cached collections: a new list version
        for cached in cached_lineage(manager, inspect(model)):
            record_model(session, manager, cached.class_, connection=connection, schemas=schemas)


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
