"""When was an instance read, and may what it holds still go into the cache?

A fill is a compare-and-set against what the reader saw in the cache *before* it queried, so
it loses to any invalidation that happened after that look-up. Two kinds of loader can still
hand back a row older than the look-up, and this module recognises both:

* an instance the session already held in its identity map (``session.get`` answers without
  a query): its data is as old as its last load, which ``load``/``refresh`` events stamp;
* a row read inside a REPEATABLE READ or SERIALIZABLE transaction that began before the
  look-up: its snapshot may predate a commit whose tombstone the look-up already saw.

Either way the instance may be returned to the caller, but it is not cached.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, inspect
from sqlalchemy.orm import Mapper, Session

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import SessionTransaction

__all__ = ["install", "read_since"]

_LOADED_AT = "_declcache_loaded_at"
_SNAPSHOT_SINCE = "_declcache_snapshot_since"
#: Isolation levels under which a transaction keeps reading the snapshot of its first query.
_SNAPSHOT_LEVELS = frozenset({"REPEATABLE READ", "SERIALIZABLE", "SNAPSHOT"})
_installed = threading.Event()
_lock = threading.Lock()


def _stamp(target: object, *_args: object) -> None:
    inspect(target).info[_LOADED_AT] = time.monotonic()


def _transaction_began(
    session: Session, transaction: SessionTransaction, connection: Connection
) -> None:
    if transaction.parent is not None or transaction.nested:
        return
    level = connection.get_execution_options().get("isolation_level")
    level = level or connection.default_isolation_level
    # pysqlite and aiosqlite only BEGIN before writes: each SELECT sees the latest commit.
    snapshot = level in _SNAPSHOT_LEVELS and connection.dialect.name != "sqlite"
    session.info[_SNAPSHOT_SINCE] = time.monotonic() if snapshot else None


def install() -> None:
    """Stamp every load and refresh, and every snapshot transaction's start; once."""
    if _installed.is_set():
        return
    with _lock:
        if _installed.is_set():
            return
        event.listen(Mapper, "load", _stamp)
        event.listen(Mapper, "refresh", _stamp)
        event.listen(Session, "after_begin", _transaction_began)
        _installed.set()


def read_since(instance: object, started: float) -> bool:
    """Whether ``instance``'s data was read from the database after ``started`` (monotonic)."""
    state: Any = inspect(instance)
    if state.info.get(_LOADED_AT, float("-inf")) < started:
        return False
    session = state.session
    since = session.info.get(_SNAPSHOT_SINCE) if session is not None else None
    return since is None or since >= started
