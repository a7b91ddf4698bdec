"""Invalidations written after each commit; what the backend cannot take, kept and replayed.

A commit must never fail because the cache is down, and what it should have invalidated must
not be forgotten either. :class:`Invalidator` writes each commit's changes (the flow of
:func:`declcache._invalidation.invalidate`) and queues what fails; while a model has queued
invalidations its cache is not read. The queue is bounded: past its limit a model is only
*marked*, and on recovery its generation token is replaced, which invalidates all of it at once.

Every second between the backend's recovery and the replay is a second other processes may
serve rows this one changed, so the replay is nobody's request and nobody's commit:

* **Off the commit path.** A commit writes its own invalidation (one pipeline) and nothing
  else; readers only ask whether their model is held. A daemon thread drains the queue.
* **Fast.** The thread tries as soon as something is queued, then every
  :data:`RETRY_INTERVAL` seconds, each attempt a probe that ignores the breaker's interval
  (:func:`~declcache._breaker.probing_now`): the first write the recovered backend takes
  starts the drain, and its success closes the breaker for every request.
* **Batched.** Queued changes of a model in the same scopes are merged, up to
  :data:`BATCH_KEYS` keys, into one ``write_many`` (one pipeline on Redis). Merging is safe:
  every invalidation write is a fresh tombstone or token stamped with the time it is
  written, so neither its order nor its grouping changes what a reader sees.

Entries are removed only once written; one drain runs at a time. The thread holds its queue
weakly and ends when the queue is empty: a manager the application drops stops retrying
instead of living on with its dead backend.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from declcache._breaker import BackendUnavailable, probing_now
from declcache._driver import arun, run
from declcache._invalidation import ModelChanges, invalidate
from declcache._keys import UNSCOPED

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from declcache._keys import Scope
    from declcache._model_cache import ModelCache

__all__ = [
    "BATCH_KEYS",
    "INVALIDATION_QUEUE_LIMIT",
    "RETRY_INTERVAL",
    "Invalidator",
    "ReplayQueue",
]

logger = logging.getLogger("declcache.manager")

#: Invalidations kept while the backend is down; past this, whole models are invalidated.
INVALIDATION_QUEUE_LIMIT = 10_000
#: Seconds the replay thread waits after an attempt the backend refused.
RETRY_INTERVAL = 0.05
#: Keys one replayed ``write_many`` holds at most.
BATCH_KEYS = 500


class ReplayQueue:
    """Queued invalidations of one manager, drained by a background thread.

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
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def __bool__(self) -> bool:
        return bool(self._entries or self._overflowed)

    @property
    def size(self) -> int:
        """Queued keys, plus one per model marked for whole invalidation."""
        return self._size + len(self._overflowed)

    def holds(self, model: type) -> bool:
        """Whether ``model`` has invalidations waiting (its cache must not be read)."""
        with self._lock:
            return model in self._overflowed or any(m is model for m, _ in self._entries)

    def add(self, model: type, change: ModelChanges) -> bool:
        """Queue ``change`` and wake the replay; ``False`` when the queue was full."""
        with self._lock:
            full = self._size + change.size > INVALIDATION_QUEUE_LIMIT
            if full:
                self._overflowed.setdefault(model, set()).update(change.scopes or {UNSCOPED})
            else:
                self._entries.append((model, change))
                self._size += change.size
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_drain_until_empty,
                    args=(weakref.ref(self), self._wake),
                    name="declcache-replay",
                    daemon=True,
                )
                self._thread.start()
        self._wake.set()
        return not full

    def replay(self, *, wait: bool = False) -> bool:
        """Write everything queued, batch by batch; whether the queue is now empty.

        Stops at the first batch the backend refuses (it stays queued). Each call is a
        probe whatever the breaker's state. A drain already running in another thread
        makes this one return ``False`` at once, or with ``wait``, go on after it.
        """
        if not self._replay_lock.acquire(blocking=wait):
            return False
        try:
            started = time.monotonic()
            replayed = 0
            while batch := self._next_batch():
                try:
                    with probing_now():
                        for model, change in batch.writes:
                            self._write(model, change)
                except Exception:
                    return False
                replayed += self._remove(batch)
            if replayed:
                logger.info(
                    "replayed %d queued invalidations in %.0f ms after a backend fault",
                    replayed,
                    (time.monotonic() - started) * 1000,
                )
            return True
        finally:
            self._replay_lock.release()

    def _next_batch(self) -> _Batch | None:
        """The oldest queued changes, merged per model and scopes, up to :data:`BATCH_KEYS`."""
        with self._lock:
            if not self:
                return None
            overflowed = {model: set(scopes) for model, scopes in self._overflowed.items()}
            merged: dict[tuple[type, frozenset[Scope]], ModelChanges] = {
                (model, frozenset()): ModelChanges(whole_model=True, scopes=set(scopes))
                for model, scopes in overflowed.items()
            }
            taken = keys = 0
            for model, change in self._entries:
                if taken and keys + len(change.keys) > BATCH_KEYS:
                    break
                merged.setdefault((model, frozenset(change.scopes)), ModelChanges()).merge(change)
                taken += 1
                keys += len(change.keys)
        writes = [(model, change) for (model, _), change in merged.items()]
        return _Batch(writes, taken, overflowed)

    def _remove(self, batch: _Batch) -> int:
        """Drop what ``batch`` wrote; how many queued changes that was."""
        with self._lock:
            for _ in range(batch.taken):
                _, change = self._entries.popleft()
                self._size -= change.size
            for model, scopes in batch.overflowed.items():
                left = self._overflowed[model] - scopes
                if left:
                    self._overflowed[model] = left
                else:
                    del self._overflowed[model]
        return batch.taken + len(batch.overflowed)

    def _stop_if_empty(self) -> bool:
        """End the thread's life if nothing is queued (under the lock ``add`` takes)."""
        with self._lock:
            if self:
                return False
            self._thread = None
            return True


@dataclass
class _Batch:
    """One replayed ``write_many`` per model: what to write and what it takes off the queue."""

    writes: list[tuple[type, ModelChanges]]
    #: Queued changes it covers, from the head of the queue.
    taken: int
    #: The overflowed models (and scopes) it invalidates whole.
    overflowed: dict[type, set[Scope]]


def _drain_until_empty(queue_ref: weakref.ref[ReplayQueue], wake: threading.Event) -> None:
    """Replay ``queue_ref``'s queue until it is empty or garbage; retry while refused."""
    while True:
        wake.clear()
        queue = queue_ref()
        if queue is None or queue._stop_if_empty():
            return
        drained = queue.replay()
        del queue  # not held across the wait, so the manager can be collected
        if not drained:
            wake.wait(RETRY_INTERVAL)


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

    def apply(self, changes: Mapping[type, ModelChanges]) -> bool:
        """Invalidate what a committed transaction changed; never raises.

        Writes this commit's changes only, even while older ones are queued (the replay
        thread writes those): a commit never waits for a replay. Returns whether the
        backend took them all (``False``: some were queued).
        """
        written = True
        for model, cache, change in self._to_write(changes):
            if cache is None:
                written = False  # queued: the model's cache could not be built
                continue
            try:
                run(invalidate(cache, change), cache.store)
            except Exception as error:
                self._failed(model, cache, change, error)
                written = False
        return written

    async def aapply(self, changes: Mapping[type, ModelChanges]) -> None:
        """:meth:`apply` for a coroutine, written on the async store.

        Shielded from cancellation: the database has committed, so a caller that gives up
        waiting (a request timeout) must not take the invalidation with it — it completes
        (or is queued) in its own task, as a worker thread would finish it.
        """
        await asyncio.shield(self._aapply(changes))

    async def _aapply(self, changes: Mapping[type, ModelChanges]) -> None:
        for model, cache, change in self._to_write(changes):
            if cache is None:
                continue
            try:
                await arun(invalidate(cache, change), cache.astore)
            except Exception as error:
                self._failed(model, cache, change, error)

    def applied(self, model: type, change: ModelChanges) -> bool:
        """:meth:`apply` of one change; whether the backend took it (not queued)."""
        return self.apply({model: change})

    def holds(self, model: type) -> bool:
        """Whether ``model``'s cache must not be read: invalidations of it are still queued.

        Never calls the backend: the replay thread does that.
        """
        return bool(self._queue) and self._queue.holds(model)

    def flush(self) -> None:
        """A last attempt at what is queued; a warning when the backend still refuses it."""
        if not self._queue:
            return
        self._queue.replay(wait=True)
        if self._queue:
            logger.warning(
                "closing with %d invalidations the backend has not taken: other processes"
                " may read those rows from the cache until their ttl ends",
                self._queue.size,
            )

    def _to_write(
        self, changes: Mapping[type, ModelChanges]
    ) -> Iterator[tuple[type, ModelCache | None, ModelChanges]]:
        """The changes of cached models, with their caches.

        A model whose cache could not be built (the backend failed as it was: logged
        there) has its change queued at once and comes with ``None``.
        """
        for model, change in changes.items():
            try:
                cache = self._cache_of(model)
            except BackendUnavailable:
                self._queue.add(model, change)
                yield model, None, change
                continue
            if cache is not None:
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
