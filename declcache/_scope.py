"""A session's cache scope: what, besides a statement, decides the rows it reads.

One cache serves every session of an application, and sessions of a multi-tenant application
do not all see the same rows for the same statement. Every key a session reads and writes is
therefore scoped (:class:`~declcache._keys.Scope`) by:

* the **schema** its ``schema_translate_map`` sends the model's table to — set on the engine,
  on the session's connection (``session.connection(execution_options=…)``), or on the
  connection the session is bound to. Another schema is another table: nothing is shared;
* the **name** the configured scope function (``CacheConfig(scope=…)``) gives the session —
  the tenant of row-level tenancy, which the database cannot show the cache.

What a ``do_orm_execute`` listener adds to a statement (the documented tenancy recipe adds
``with_loader_criteria``) happens after the cache was asked, so it cannot be part of a key.
A session with such a listener is therefore read through the cache only when a scope
function is configured, whose answer must name everything the listeners depend on;
otherwise it reads the database, and a warning says why once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from declcache._keys import UNSCOPED, Scope
from declcache._private_apis import held_connection
from declcache._stats import FaultLog

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Mapper, Session

__all__ = [
    "OWN_LISTENERS",
    "SCOPE_WARNING_INTERVAL",
    "scope_of",
    "translate_map",
    "translated_schema",
]

#: declcache's own ``do_orm_execute`` listeners: they record writes and change no statement.
OWN_LISTENERS: set[Callable[..., Any]] = set()
#: Seconds between two warnings of one manager about one reason a session reads uncached.
SCOPE_WARNING_INTERVAL = 300.0


def scope_warnings() -> FaultLog:
    """A manager's log of why sessions read the database: each reason every few minutes."""
    return FaultLog(logging.getLogger("declcache.scope"), SCOPE_WARNING_INTERVAL)


def translate_map(
    session: Session, mapper: Mapper[Any], connection: Connection | None = None
) -> Mapping[str | None, str | None] | None:
    """The ``schema_translate_map`` the session's statements on ``mapper`` run with, if any.

    ``connection`` is the one a flush uses; else the one the session's transaction holds for
    the mapper's bind, else the bind itself — never a new connection.
    """
    if connection is None:
        try:
            bind = session.get_bind(mapper=mapper)
        except SQLAlchemyError:  # an unbound session: it cannot read either
            return None
        connection = held_connection(session, bind)
        options = (bind if connection is None else connection).get_execution_options()
    else:
        options = connection.get_execution_options()
    found: Mapping[str | None, str | None] | None = options.get("schema_translate_map")
    return found or None


def translated_schema(mapper: Mapper[Any], schemas: Mapping[str | None, str | None] | None) -> str:
    """The schema(s) ``schemas`` sends the model's tables to; ``""`` when they stay as mapped."""
    if not schemas:
        return ""
    translated = {str(schemas[table.schema]) for table in mapper.tables if table.schema in schemas}
    return ",".join(sorted(translated))


def scope_of(
    session: Session,
    mapper: Mapper[Any],
    function: Callable[[Any], object] | None,
    warnings: FaultLog,
    *,
    connection: Connection | None = None,
    schemas: Mapping[str | None, str | None] | None = None,
    reading: bool = True,
) -> Scope | None:
    """The scope of ``session``'s reads (or, ``reading=False``, writes) of ``mapper``.

    ``schemas``: the schema map a statement carries itself, which wins over the session's.
    ``None`` for a read that must not use the cache: its statements are rewritten by a
    listener no scope function accounts for, or the scope function failed (``warnings``
    says so). A write always has a scope: where it cannot be named, it is outside every
    named scope.
    """
    if schemas is None:
        schemas = translate_map(session, mapper, connection)
    schema = translated_schema(mapper, schemas)
    if function is None:
        if reading and _rewrites_statements(session, warnings):
            return None
        return Scope(schema) if schema else UNSCOPED
    try:
        name = function(session)
    except Exception as error:
        warnings.warning(
            f"scope:{type(error).__name__}",
            "the cache scope function failed (%r): this session reads the database"
            " and its writes invalidate every scope",
            error,
        )
        return None if reading else Scope(schema)
    if name is None or isinstance(name, str):
        return Scope(schema, name)
    warnings.warning(
        "scope:type",
        "the cache scope function returned %s, not str or None: this session reads the"
        " database and its writes invalidate every scope",
        type(name).__name__,
    )
    return None if reading else Scope(schema)


def _rewrites_statements(session: Session, warnings: FaultLog) -> bool:
    """Whether a ``do_orm_execute`` listener other than declcache's runs for ``session``."""
    listeners = session.dispatch.do_orm_execute
    if len(listeners) <= len(OWN_LISTENERS):
        return False
    foreign = [fn for fn in listeners if fn not in OWN_LISTENERS]
    if not foreign:
        return False
    names = ", ".join(sorted(getattr(fn, "__qualname__", repr(fn)) for fn in foreign))
    warnings.warning(
        f"listeners:{names}",
        "do_orm_execute listeners (%s) may change what this session's statements return"
        " (loader criteria, schema maps), after the cache would have answered: its reads"
        " use the database. Configure CacheConfig(scope=...) with a function naming what"
        " they depend on (the tenant) to cache them; see docs/tenancy.md",
        names,
    )
    return True
