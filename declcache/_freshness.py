"""When was an instance read, how old was the database's view of it, and may it be cached?

A fill is a compare-and-set against what the reader saw in the cache *before* it queried, so
it loses to any invalidation that happened after that look-up. Three kinds of loader can still
hand back a row older than the look-up, and this module recognises each:

* an instance the session already held in its identity map (``session.get`` answers without
  a query): its data is as old as its last load, which ``load``/``refresh`` events stamp;
* a row read inside a database transaction that keeps a snapshot (REPEATABLE READ,
  SERIALIZABLE, MySQL's default, SQLite in WAL mode with the ``BEGIN`` recipe) and began
  before the look-up: its snapshot may predate a commit whose tombstone the look-up saw;
* a row read from a replica, which may lag the primary by up to the lag the engine declares
  (``execution_options(declcache_replica_lag=seconds)``): :func:`replica_lag` tells the read
  flow, which then only fills over tombstones and tokens older than that.

Snapshots are recognised however they start, without asking the database on any read: each
connection stamps, in its ``info``, the moment its database transaction may have taken its
snapshot (the first statement after a ``BEGIN``, or on SQLite the statement that opened the
transaction, as the DBAPI connection's ``in_transaction`` tells). A transaction counts as a
snapshot unless its isolation is *known* not to keep one (READ COMMITTED, READ UNCOMMITTED,
AUTOCOMMIT, declared through SQLAlchemy and not overridden by SQL such as ``SET TRANSACTION
ISOLATION LEVEL ...``). Only fills pay for the check; a hit never calls this module.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapper, Session

from declcache._private_apis import sqlite_in_transaction

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import SessionTransaction
    from sqlalchemy.orm.state import InstanceState

__all__ = [
    "REPLICA_LAG_OPTION",
    "forget_replica_lags",
    "install",
    "read_since",
    "replica_lag",
    "replica_lag_seen",
    "view",
]

#: The execution option declaring that an engine or connection reads a replica lagging the
#: primary by at most this many seconds.
REPLICA_LAG_OPTION = "declcache_replica_lag"

#: In an instance's ``InstanceState.info``: every commit before it (monotonic) is in what
#: the instance holds, on the database it was read from; and that database's declared lag.
_LOADED_AT = "_declcache_loaded_at"
_LAG = "_declcache_replica_lag"
_CONNECTIONS = "_declcache_connections"
#: In ``Connection.info`` (the DBAPI connection's): when its transaction may have taken its
#: snapshot; absent while no transaction is open.
_SNAPSHOT_SINCE = "_declcache_snapshot_since"
#: In ``Connection.info``: SQL changed the isolation of the open transaction (cleared at its
#: end) or of the whole DBAPI connection (kept while it lives).
_TRANSACTION_LEVEL = "_declcache_transaction_level"
_SESSION_LEVEL = "_declcache_session_level"
#: Isolation levels under which every statement sees the latest commit.
_FRESH_LEVELS = frozenset({"READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"})
#: Statement openings that may change the isolation level, compared upper-cased.
_LEVEL_STATEMENTS = ("SET", "BEGIN", "START")
_installed = threading.Event()
_lock = threading.Lock()
#: The largest replica lag any connection of this process declared (seconds).
_lag_seen = [0.0]


def _stamp(state: InstanceState[Any], context: Any, *_args: object) -> None:
    """Stamp a loaded instance with the view it was read from: ``(since, replica lag)``.

    Worked out once per query (``QueryContext.attributes``), not once per row. Registered
    ``raw``: every cache hit entering a session comes through here, and resolving the
    instance's state again would cost it more than the stamp itself.
    """
    info = state.info
    if context is None:  # a cache hit assembled into a session (or a merge): no query
        info[_LOADED_AT] = time.monotonic()  # the look-up just made: its data is that new
        return
    memo = context.attributes
    seen = memo.get(_LOADED_AT)
    if seen is None:
        seen = memo[_LOADED_AT] = view(context.session)
    info[_LOADED_AT], lag = seen
    if lag:
        info[_LAG] = lag
    else:
        info.pop(_LAG, None)


def view(session: Session | None) -> tuple[float, float]:
    """``(since, lag)``: what data read now through ``session`` reflects.

    It reflects every commit before ``since`` (monotonic) on the database it was read from,
    which lags the primary by up to ``lag`` seconds.

    ``since`` is now, or the start of an open snapshot transaction: ``-inf`` when its start
    was not seen (it began before :func:`install`), since its age cannot be known.
    """
    since = time.monotonic()
    lag = 0.0
    for connection in _connections(session) if session is not None else ():
        options = connection.get_execution_options()
        lag = max(lag, float(options.get(REPLICA_LAG_OPTION) or 0.0))
        if _keeps_snapshot(connection, options):
            since = min(since, connection.info.get(_SNAPSHOT_SINCE, float("-inf")))
    return since, lag


def _transaction_began(
    session: Session, transaction: SessionTransaction, connection: Connection
) -> None:
    """Remember the connections of the session's outermost transaction, to ask at a fill."""
    root = transaction
    while root.parent is not None:
        root = root.parent
    held = session.info.get(_CONNECTIONS)
    if held is None or held[0] is not root:
        session.info[_CONNECTIONS] = (root, [connection])
    elif connection not in held[1]:
        held[1].append(connection)


def _before_statement(connection: Connection, _cursor: Any, statement: str, *_rest: Any) -> None:
    """Stamp when the connection's transaction may have taken its snapshot.

    Also note SQL that changes the isolation level. Dictionary look-ups only: every
    statement runs this (never a cache hit).
    """
    info = connection.info
    lag = connection.get_execution_options().get(REPLICA_LAG_OPTION)
    if lag and lag > _lag_seen[0]:
        _lag_seen[0] = float(lag)
    if connection.dialect.name == "sqlite":
        # A statement run outside a transaction may open one (pysqlite before a write, or
        # the BEGIN recipe): its snapshot is no older than now.
        if not sqlite_in_transaction(connection):
            info[_SNAPSHOT_SINCE] = time.monotonic()
    elif _SNAPSHOT_SINCE not in info:
        info[_SNAPSHOT_SINCE] = time.monotonic()
    if statement.lstrip()[:5].upper().startswith(_LEVEL_STATEMENTS):
        _note_level(info, statement.upper())


def _note_level(info: dict[Any, Any], statement: str) -> None:
    if "ISOLATION" not in statement and "DEFAULT_TRANSACTION_ISOLATION" not in statement:
        return
    fresh = "READ COMMITTED" in statement or "READ UNCOMMITTED" in statement
    level = "READ COMMITTED" if fresh else "UNKNOWN"
    whole = "SESSION" in statement or "DEFAULT_TRANSACTION_ISOLATION" in statement
    info[_SESSION_LEVEL if whole else _TRANSACTION_LEVEL] = level


def _transaction_ended(connection: Connection, *_args: Any) -> None:
    """The snapshot (and a ``SET TRANSACTION`` level) ends with the transaction."""
    info = connection.info
    info.pop(_SNAPSHOT_SINCE, None)
    info.pop(_TRANSACTION_LEVEL, None)


def install() -> None:
    """Stamp every load and refresh, and every database transaction's snapshot; once."""
    if _installed.is_set():
        return
    with _lock:
        if _installed.is_set():
            return
        event.listen(Mapper, "load", _stamp, raw=True)
        event.listen(Mapper, "refresh", _stamp, raw=True)
        event.listen(Session, "after_begin", _transaction_began)
        event.listen(Engine, "before_cursor_execute", _before_statement)
        event.listen(Engine, "commit", _transaction_ended)
        event.listen(Engine, "rollback", _transaction_ended)
        _installed.set()


def _keeps_snapshot(connection: Connection, options: Mapping[str, Any]) -> bool:
    """Whether the open transaction of ``connection`` may read a snapshot (unless known not)."""
    if connection.dialect.name == "sqlite":
        return sqlite_in_transaction(connection) is not False  # SQLite's are snapshots
    info = connection.info
    level = info.get(_TRANSACTION_LEVEL) or info.get(_SESSION_LEVEL)
    if level is None:
        level = options.get("isolation_level")
        level = level or getattr(connection.dialect, "isolation_level", None)
        level = level or connection.default_isolation_level
    return level not in _FRESH_LEVELS


def _connections(session: Session) -> list[Connection]:
    """The open connections of the session's current transaction."""
    held = session.info.get(_CONNECTIONS)
    if held is None or held[0] is not session.get_transaction():
        return []
    return [connection for connection in held[1] if not connection.closed]


def read_since(instance: object, started: float) -> bool:
    """Whether ``instance``'s data was read after ``started`` (monotonic), from a view as new.

    False for an instance loaded before, or read in a snapshot transaction that began
    before (or at an unknown time).
    """
    return bool(inspect(instance).info.get(_LOADED_AT, float("-inf")) >= started)


def replica_lag(instance: object) -> float:
    """The replica lag declared by the connections ``instance`` was read through.

    ``0`` for the primary; else the view it was read from may be this much older.
    """
    return float(inspect(instance).info.get(_LAG, 0.0))


def replica_lag_seen() -> float:
    """The largest replica lag any connection of this process declared so far (seconds).

    For fills that hold no instance to ask (a count, an empty list): a process that has read
    a replica bounds every such fill by it.
    """
    return _lag_seen[0]


def forget_replica_lags() -> None:
    """Forget the replica lags declared so far.

    Once no replica engine of this process is used (disposed), not-found, count and
    empty-list fills no longer wait for one.
    """
    _lag_seen[0] = 0.0
