"""Invalidations of a session joined to an outer database transaction wait for its real commit.

``session.commit()`` of a session joined to ``connection.begin()`` (``Session(bind=connection)``
with any ``join_transaction_mode`` but ``control_fully``) commits nothing in the database:
invalidating then would let a read re-cache the old row before the real commit. So the
session's changes wait on the DBAPI connection (in its pool record's ``info``) and are applied
right after its root transaction's ``COMMIT`` (:func:`~declcache._private_apis.after_dbapi_commit`,
hooked once per dialect); a rollback of the root transaction, or the pool's reset of the
connection, drops them. Until then the session still counts them as uncommitted.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING

from sqlalchemy.engine import Connection

from declcache._frames import apply_changes
from declcache._private_apis import after_dbapi_commit

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

    from declcache._frames import Changes
    from declcache._manager import CacheManager

__all__ = [
    "defer_to_outer_commit",
    "deferred_changes",
    "ever_deferred",
    "forget_connections",
    "note_connection",
    "pool_reset",
    "root_rolled_back",
]

#: ``session.info``: the connections the session's open transaction runs on.
_CONNECTIONS_KEY = "_declcache_written_connections"
#: ``connection.info`` (the DBAPI connection's): changes waiting for its root ``COMMIT``.
_DEFERRED_KEY = "_declcache_deferred_invalidations"
#: Dialects whose ``do_commit`` applies deferred changes after the database commit.
_hooked_dialects: weakref.WeakSet[Dialect] = weakref.WeakSet()
_hook_lock = threading.Lock()
#: Set once any change waited for an outer commit in this process.
_ever_deferred = threading.Event()
logger = logging.getLogger("declcache.listeners")


def note_connection(session: Session, connection: Connection) -> None:
    """Remember that ``session``'s open transaction runs on ``connection`` (``after_begin``)."""
    held: list[Connection] = session.info.setdefault(_CONNECTIONS_KEY, [])
    if connection not in held:
        held.append(connection)


def forget_connections(session: Session) -> None:
    """Drop the connections noted for ``session``: its outermost transaction ended."""
    session.info.pop(_CONNECTIONS_KEY, None)


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


def ever_deferred() -> bool:
    """Whether any change ever waited for an outer commit in this process (else: none waits)."""
    return _ever_deferred.is_set()


def deferred_changes(session: Session) -> list[Changes]:
    """What ``session``'s earlier commits left waiting on the connections it runs on.

    Asked on every cached read; free in a process that never joined a session to an outer
    transaction (the connections' ``info`` is not even looked at).
    """
    if not _ever_deferred.is_set():
        return []
    return [
        changes for connection in _connections_of(session) for _, changes in _deferred(connection)
    ]


def defer_to_outer_commit(session: Session, manager: CacheManager, changes: Changes) -> bool:
    """Keep ``changes`` for the outer transactions ``session`` is joined to, if any.

    Returns:
        Whether the session runs on a connection whose transaction it does not commit
        (then the changes wait for that transaction's ``COMMIT``).
    """
    outer = [connection for connection in _connections_of(session) if connection.in_transaction()]
    for connection in outer:
        _defer(connection, manager, changes)
    return bool(outer)


def _defer(connection: Connection, manager: CacheManager, changes: Changes) -> None:
    """Keep ``changes`` until ``connection``'s root transaction commits in the database."""
    _ever_deferred.set()
    connection.info.setdefault(_DEFERRED_KEY, []).append((manager, changes))
    dialect = connection.dialect
    with _hook_lock:
        if dialect in _hooked_dialects:
            return
        after_dbapi_commit(dialect, _apply_deferred)
        _hooked_dialects.add(dialect)


def _apply_deferred(dbapi_connection: PoolProxiedConnection) -> None:
    """Apply what waited for this commit; a cache fault never fails the committed work."""
    try:
        waiting = dbapi_connection.info.pop(_DEFERRED_KEY, None)
    except Exception:
        return
    for manager, changes in waiting or ():
        try:
            apply_changes(manager, changes)
        except Exception:
            logger.exception("declcache could not invalidate after an outer commit")


def root_rolled_back(connection: Connection) -> None:
    """Drop what waited on ``connection``: its root transaction rolled back (``rollback``)."""
    try:
        connection.info.pop(_DEFERRED_KEY, None)
    except Exception:  # an invalidated connection: nothing can be read or dropped
        logger.debug("no DBAPI connection to drop deferred invalidations from")


def pool_reset(
    _dbapi_connection: object, connection_record: ConnectionPoolEntry, _reset_state: object
) -> None:
    """Drop what waited on a connection the pool resets: its transaction never committed."""
    connection_record.info.pop(_DEFERRED_KEY, None)
