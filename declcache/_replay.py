"""Invalidations the backend could not take, kept and replayed when it answers again.

A commit must never fail because the cache is down, and what it should have invalidated must
not be forgotten either. The queue is bounded: past its limit a model is only *marked*, and
on recovery its generation token is replaced, which invalidates all of it at once.

While anything is queued a daemon thread retries every :data:`REPLAY_INTERVAL` seconds, so
an idle (or exiting-soon) process still delivers its invalidations to the processes that
share the backend; readers in this process also trigger a retry. Only one replay runs at a
time, and entries are removed only once written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from declcache._invalidation import ModelChanges

__all__ = ["INVALIDATION_QUEUE_LIMIT", "REPLAY_INTERVAL", "ReplayQueue"]

logger = logging.getLogger("declcache.manager")

#: Invalidations kept while the backend is down; past this, whole models are invalidated.
INVALIDATION_QUEUE_LIMIT = 10_000
#: Seconds between two attempts to replay queued invalidations.
REPLAY_INTERVAL = 1.0


class ReplayQueue:
    """Queued invalidations of one manager.

    Args:
        write: writes ``(model, changes)`` to the backend, ``changes=None`` meaning "the whole
            model"; raises while the backend is down.
    """

    def __init__(self, write: Callable[[type, ModelChanges | None], None]) -> None:
        self._write = write
        self._entries: deque[tuple[type, ModelChanges]] = deque()
        self._size = 0
        self._overflowed: set[type] = set()
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

    def holds(self, model: type) -> bool:
        """Whether ``model`` has invalidations waiting (its cache must not be read)."""
        with self._lock:
            return model in self._overflowed or any(m is model for m, _ in self._entries)

    def add(self, model: type, change: ModelChanges) -> bool:
        """Queue ``change``; ``False`` when the queue was full and the model was marked."""
        with self._lock:
            full = self._size + change.size > INVALIDATION_QUEUE_LIMIT
            if full:
                self._overflowed.add(model)
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
                target=self._retry_until_empty, name="declcache-replay", daemon=True
            )
            self._thread.start()

    def _retry_until_empty(self) -> None:
        while self:
            time.sleep(REPLAY_INTERVAL)
            self.replay()

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
                overflowed = set(self._overflowed)
            try:
                for model in overflowed:
                    self._write(model, None)
                for model, change in pending:
                    self._write(model, change)
            except Exception:
                return
            with self._lock:
                for _ in pending:
                    _, change = self._entries.popleft()
                    self._size -= change.size
                self._overflowed -= overflowed
            logger.info("replayed %d queued invalidations after a backend fault", len(pending))
        finally:
            self._replay_lock.release()
