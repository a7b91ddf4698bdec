"""Strict consistency: a commit marks what it changes in the cache before the database commits.

**Why.** By default a commit invalidates after the database has committed
(:mod:`declcache._listeners`). A writer that loses the backend right then — a partition
between it and the cache, while readers still reach both — leaves the old rows in the cache
until its replay gets through, and every reader serves them meanwhile.
``DECLCACHE_CONSISTENCY=strict`` closes that window from the other side: *before* the
database commits, the writer writes a **marker** over every key its commit will invalidate
(entity keys, the model's list version, its generation for a whole-model change). A marker is
a miss to every reader, and a reader whose look-up saw one running never fills what it read
(:func:`declcache._reads.lagging`), so from the marker on nobody caches the old row. After
the commit the ordinary invalidation replaces the markers with tombstones and new tokens. A
writer cut off after its commit leaves its markers to run out after
``DECLCACHE_STRICT_MARKER_TTL`` seconds: readers miss meanwhile, they never read the old row.
A writer that cannot write its markers does not commit (:class:`StrictConsistencyError`).

**Where.** The last moment before the database commit at which the changed rows are known:
the ``commit`` event of the engine's connection, which runs after the session's final flush
and before the DBAPI ``COMMIT`` (the session's ``before_commit`` runs before that flush, when
the rows are not known yet). Raising there leaves the transaction uncommitted, to be rolled
back. The session a connection works for is the one :mod:`declcache._core_writes` noted at
``after_begin``; a session's changes are marked once per commit (a session bound to several
engines commits several connections). Changes of a session joined to an outer transaction
wait on its connection (:mod:`declcache._outer_commit`) and are marked at that
transaction's commit. Under ``AsyncSession`` the event runs in SQLAlchemy's greenlet: the
markers are awaited on the async store there, as the invalidation is after the commit.

**Claims.** Several commits can be in flight on one key — above all on a model's list version
and generation, which every commit of the model rewrites. So a marker holds a set of
*claims* (a commit's random id and its deadline); a commit adds its own by compare-and-set
against what it read, and its clear removes only its own
(:func:`declcache._invalidation.mark`, :func:`~declcache._invalidation.invalidate`): no commit
lifts the marker of another still in flight. A claim past its deadline is ignored by readers
and dropped by the next writer. Deadlines are wall-clock times compared across hosts.

**Rollback.** A commit that fails after its markers were written (its ``COMMIT`` failed) leaves
them to run out: they only cost misses, and they are also right when the outcome of the
``COMMIT`` is unknown (a connection lost during it). The markers of a commit that could
not write them all are left too.

The default mode pays one listener call per database commit that looks up a dictionary and
returns, and a character test per token a fill saw (:func:`declcache._reads.lagging`).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING

from sqlalchemy import event
from sqlalchemy.engine import Engine

from declcache import _core_writes, _outer_commit
from declcache._driver import arun, run
from declcache._frames import manager_of, merged_frames, pending_changes
from declcache._invalidation import Claim, mark
from declcache._private_apis import await_only, in_greenlet
from declcache._secrets import redact
from declcache.exceptions import StrictConsistencyError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

    from declcache._driver import Flow
    from declcache._frames import Changes
    from declcache._manager import CacheManager
    from declcache._model_cache import ModelCache

__all__ = [
    "STRICT",
    "attach_claims",
    "before_database_commit",
    "forget_claims",
    "install",
    "is_strict",
    "mark_changes",
]

#: The value of ``CacheConfig.consistency`` (``DECLCACHE_CONSISTENCY``) this module serves.
STRICT = "strict"
#: ``session.info``: ``(transaction, {model: Claim})`` of the commit this session is making.
_CLAIMS_KEY = "_declcache_strict_claims"
logger = logging.getLogger("declcache.listeners")


def install() -> None:
    """Listen to every engine's ``commit`` event (first, before the other listeners)."""
    if not event.contains(Engine, "commit", before_database_commit):
        event.listen(Engine, "commit", before_database_commit, insert=True)


def is_strict(manager: CacheManager) -> bool:
    """Whether ``manager`` marks before committing (``consistency="strict"``)."""
    return manager.config.consistency == STRICT


def before_database_commit(connection: Connection) -> None:
    """Mark what commits on ``connection`` now, after the last flush, before the ``COMMIT``.

    The engine's ``commit`` event. Raises :class:`StrictConsistencyError` when a strict
    manager cannot write its markers, which keeps the database transaction uncommitted.
    """
    ref = _core_writes._session_of.get(connection)
    session = ref() if ref is not None else None
    if session is not None and pending_changes(session):
        _mark_session(session)
    if _outer_commit.ever_deferred():
        _mark_deferred(connection)


def _mark_session(session: Session) -> None:
    """Mark the changes the session's transaction is committing, once per transaction."""
    manager = manager_of(session)
    if manager is None or not is_strict(manager):
        return
    transaction = session.get_transaction()
    held = session.info.get(_CLAIMS_KEY)
    if held is not None and held[0] is transaction:
        return  # marked at the commit of another of its connections
    changes = merged_frames(session)
    if changes:
        session.info[_CLAIMS_KEY] = (transaction, mark_changes(manager, changes))


def _mark_deferred(connection: Connection) -> None:
    """Mark what sessions joined to ``connection``'s transaction committed into it."""
    for manager, changes in _outer_commit._deferred(connection):
        if not is_strict(manager) or any(change.claims for change in changes.values()):
            continue
        for model, claim in mark_changes(manager, changes).items():
            changes[model].claims.append(claim)


def mark_changes(manager: CacheManager, changes: Changes) -> dict[type, Claim]:
    """Write the markers of one commit's ``changes``; the claim each cached model got.

    Raises:
        StrictConsistencyError: a marker could not be written (the backend is unreachable,
            refused the call, or other writers kept changing the keys).
    """
    claim_id = secrets.token_hex(6)
    deadline = time.time() + manager.config.strict_marker_ttl
    claims: dict[type, Claim] = {}
    for model, change in changes.items():
        claim = Claim(claim_id, deadline)
        cache: ModelCache | None = None
        problem = None
        try:
            cache = manager._cache(model)  # may have to reach the backend to be built
            if cache is not None:
                _run(mark(cache, change, claim), cache)
        except Exception as error:
            if cache is not None:
                cache.counters.add("errors")
            problem = _refusal(manager, model, error)
        if problem is not None:
            raise problem  # outside the ``except``: no ``__context__`` quoting the client
        if cache is not None:
            claims[model] = claim
    return claims


def _run(flow: Flow[None], cache: ModelCache) -> None:
    """Run a marker flow now: awaited on the async store inside an ``AsyncSession``'s greenlet."""
    if in_greenlet():
        await_only(arun(flow, cache.astore))
    else:
        run(flow, cache.store)


def _refusal(manager: CacheManager, model: type, error: Exception) -> StrictConsistencyError:
    config = manager.config
    shown = redact(f"{type(error).__name__}: {error}", config.secrets)
    return StrictConsistencyError(
        model.__name__,
        f"{config.setting_name('consistency')}={STRICT}: could not mark the {model.__name__} "
        f"rows this commit changes in the cache ({shown}); nothing was committed: roll the "
        "session back (the commit can be retried once the cache answers)",
    )


def attach_claims(session: Session, changes: Changes) -> None:
    """Give the changes a committed transaction hands over the claims its markers hold.

    ``after_commit``: the invalidation then replaces those markers (and only those). A
    commit that ended after its markers ran out is logged: a reader may have cached the old
    row in between, which this commit's invalidation (unless it fails too) then removes.
    """
    held = session.info.pop(_CLAIMS_KEY, None)
    if held is None:
        return
    late = []
    now = time.time()
    for model, claim in held[1].items():
        change = changes.get(model)
        if change is not None:
            change.claims.append(claim)
        if now >= claim.deadline:
            late.append(model.__name__)
    if late:
        logger.warning(
            "a strict commit of %s ended after its markers ran out (strict_marker_ttl): the "
            "database took longer to commit than they last; raise DECLCACHE_STRICT_MARKER_TTL",
            ", ".join(late),
        )


def forget_claims(session: Session) -> None:
    """Drop the claims of a transaction that ended without handing them over (rolled back)."""
    session.info.pop(_CLAIMS_KEY, None)
