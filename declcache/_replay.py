"""Invalidations written after each commit; what the backend cannot take, kept and replayed.

A commit must never fail because the cache is down, and what it should have invalidated must
not be forgotten either. :class:`Invalidator` writes each commit's changes (the flow of
:func:`declcache._invalidation.invalidate`) and queues what fails; while a model has queued
invalidations its cache is not read. The queue is bounded: past its limit a model is only
*marked*, and on recovery its generation token is replaced, which invalidates all of it at once.

While anything is queued a daemon thread retries every :data:`REPLAY_INTERVAL` seconds, so
an idle (or exiting-soon) process still delivers its invalidations to the processes that
share the backend; readers in this process also trigger a retry. Only one replay runs at a
time, and entries are removed only once written. The thread holds its queue weakly: a
manager the application drops stops retrying instead of living on with its dead backend.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING

from declcache._driver import arun, run
from declcache._invalidation import ModelChanges, invalidate
from declcache._keys import UNSCOPED

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from declcache._keys import Scope
    from declcache._model_cache import ModelCache

__all__ = ["INVALIDATION_QUEUE_LIMIT", "REPLAY_INTERVAL", "Invalidator", "ReplayQueue"]

logger = logging.getLogger("declcache.manager")

#: Invalidations kept while the backend is down; past this, whole models are invalidated.
INVALIDATION_QUEUE_LIMIT = 10_000
#: Seconds between two attempts to replay queued invalidations.
REPLAY_INTERVAL = 1.0


class ReplayQueue:
    """Queued invalidations of one manager.

    Args:
        write: writes ``(model, changes)`` to the backend; raises while the backend is down.
    """

    def __init__(self, write: Callable[[type, ModelChanges], None]) -> None:
        self._write = write
        self._entries: deque[tuple[type, ModelChanges]] = deque()
        self._size = 0
        #: Models past the limit, and the scopes to invalidate them in, whole.
        self._overflowed: dict[type, set[Scope]] = {}
        self._lock = threading.Lock()
        self._replay_lock = threading.Lock()
        self._next_attempt = 0.0
        self._thread: threading.Thread | None = None

    def __bool__(self) -> bool:
        return bool(self._entries or self._overflowed)

    @property
    def size(self) -> int:
        """Queued keys, plus one per model marked for whole invalidation."""
        return self._size + len(self._overflowed)

    @property
    def due(self) -> bool:
        """Whether a :meth:`replay` now would try the backend (the interval has passed)."""
        return bool(self) and time.monotonic() >= self._next_attempt

    def holds(self, model: type) -> bool:
        """Whether ``model`` has invalidations waiting (its cache must not be read)."""
        with self._lock:
            return model in self._overflowed or any(m is model for m, _ in self._entries)

    def add(self, model: type, change: ModelChanges) -> bool:
        """Queue ``change``; ``False`` when the queue was full and the model was marked."""
        with self._lock:
            full = self._size + change.size > INVALIDATION_QUEUE_LIMIT
            if full:
                self._overflowed.setdefault(model, set()).update(change.scopes or {UNSCOPED})
            else:
                self._entries.append((model, change))
                self._size += change.size
        self._ensure_thread()
        return not full

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(
                target=_retry_until_empty,
                args=(weakref.ref(self),),
                name="declcache-replay",
                daemon=True,
            )
            self._thread.start()

    def replay(self, *, now: bool = False) -> None:
        """Write what is queued if the backend answers; at most once per interval.

        ``now`` skips the wait for the interval (a last attempt before closing); a replay
        already running in another thread still wins.
        """
        if not self._replay_lock.acquire(blocking=False):
            return  # another thread is replaying
        try:
            started = time.monotonic()
            with self._lock:
                if started < self._next_attempt and not now:
                    return
                self._next_attempt = started + REPLAY_INTERVAL
                pending = list(self._entries)
                overflowed = {model: set(scopes) for model, scopes in self._overflowed.items()}
            try:
                for model, scopes in overflowed.items():
                    self._write(model, ModelChanges(whole_model=True, scopes=scopes))
                for model, change in pending:
                    self._write(model, change)
            except Exception:
                return
            with self._lock:
                for _ in pending:
                    _, change = self._entries.popleft()
                    self._size -= change.size
                for model, scopes in overflowed.items():
                    left = self._overflowed[model] - scopes
                    if left:
                        self._overflowed[model] = left
                    else:
                        del self._overflowed[model]
            logger.info("replayed %d queued invalidations after a backend fault", len(pending))
        finally:
            self._replay_lock.release()


def _retry_until_empty(queue_ref: weakref.ref[ReplayQueue]) -> None:
    """Replay ``queue_ref``'s queue every interval until it is empty or garbage."""
    while True:
        time.sleep(REPLAY_INTERVAL)
        queue = queue_ref()
        if not queue:  # None (its manager was dropped) or nothing left to write
            return
        queue.replay()
        del queue  # not held across the sleep, so the manager can be collected


class Invalidator:
    """One manager's invalidations: written now, or queued for replay.

    Args:
        cache_of: the manager's :class:`~declcache._model_cache.ModelCache` of a model, or
            ``None`` when it does not cache it.
    """

    def __init__(self, cache_of: Callable[[type], ModelCache | None]) -> None:
        self._cache_of = cache_of
        self._queue = ReplayQueue(self._write_replayed)

    @property
    def pending(self) -> int:
        """Invalidations waiting for the backend to come back (0 when all is well)."""
        return self._queue.size

    def apply(self, changes: Mapping[type, ModelChanges]) -> None:
        """Invalidate what a committed transaction changed; never raises."""
        for model, cache, change in self._to_write(changes):
            try:
                run(invalidate(cache, change), cache.store)
            except Exception as error:
                self._failed(model, cache, change, error)
        if self._queue:
            self._queue.replay()

    async def aapply(self, changes: Mapping[type, ModelChanges]) -> None:
        """:meth:`apply` for a coroutine: written on the async store; a replay in a thread.

        Shielded from cancellation: the database has committed, so a caller that gives up
        waiting (a request timeout) must not take the invalidation with it — it completes
        (or is queued) in its own task, as a worker thread would finish it.
        """
        await asyncio.shield(self._aapply(changes))

    async def _aapply(self, changes: Mapping[type, ModelChanges]) -> None:
        for model, cache, change in self._to_write(changes):
            try:
                await arun(invalidate(cache, change), cache.astore)
            except Exception as error:
                self._failed(model, cache, change, error)
        if self._queue:
            await asyncio.to_thread(self._queue.replay)

    def applied(self, model: type, change: ModelChanges) -> bool:
        """:meth:`apply` of one change; whether the backend took it (not queued)."""
        cache = self._cache_of(model)
        if cache is None:
            return True
        before = cache.counters.snapshot().invalidations_queued
        self.apply({model: change})
        return cache.counters.snapshot().invalidations_queued == before

    def blocks(self, model: type) -> bool:
        """Whether ``model``'s cache must not be read: invalidations of it are still queued.

        Tries a replay first (at most once per interval).
        """
        if not self._queue:
            return False
        self._queue.replay()
        return self._queue.holds(model)

    async def ablocks(self, model: type) -> bool:
        """:meth:`blocks` for a coroutine: a due replay runs in a worker thread."""
        if not self._queue:
            return False
        if self._queue.due:
            await asyncio.to_thread(self._queue.replay)
        return self._queue.holds(model)

    def holds(self, model: type) -> bool:
        """Whether ``model`` has queued invalidations; never calls the backend."""
        return bool(self._queue) and self._queue.holds(model)

    def flush(self) -> None:
        """A last attempt at what is queued; a warning when the backend still refuses it."""
        if not self._queue:
            return
        self._queue.replay(now=True)
        if self._queue:
            logger.warning(
                "closing with %d invalidations the backend has not taken: other processes"
                " may read those rows from the cache until their ttl ends",
                self._queue.size,
            )

    def _to_write(
        self, changes: Mapping[type, ModelChanges]
    ) -> Iterator[tuple[type, ModelCache, ModelChanges]]:
        """The changes of cached models to write now; queued after queued ones, in order."""
        for model, change in changes.items():
            cache = self._cache_of(model)
            if cache is None:
                continue
            if self._queue:  # keep the order: nothing overtakes what is already queued
                self._enqueue(model, cache, change)
                continue
            yield model, cache, change

    def _failed(
        self, model: type, cache: ModelCache, change: ModelChanges, error: Exception
    ) -> None:
        cache.fault("invalidate", error)
        self._enqueue(model, cache, change)

    def _enqueue(self, model: type, cache: ModelCache, change: ModelChanges) -> None:
        kept = self._queue.add(model, change)
        cache.counters.add("invalidations_queued" if kept else "invalidations_overflowed")

    def _write_replayed(self, model: type, change: ModelChanges) -> None:
        cache = self._cache_of(model)
        if cache is not None:
            run(invalidate(cache, change), cache.store)
