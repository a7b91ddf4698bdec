"""The distributed fill lock, with a bounded wait: a reader never waits longer than it says.

With ``distributed_lock=True`` a process that misses takes the backend's lock for that key and
fills the entry while the others wait, then read what it filled. dogpile's locks wait without
a bound: redis-py's ``Lock.acquire`` until the lock is free, dogpile's Memcached lock in a loop
whose sleeps double up to hours. A lock nobody will release then stalls every reader of that
key for the lock's ``lock_timeout`` (26 to 30 s were measured on Redis, 55 s on Memcached):
its holder died, or its ``SET NX`` was sent while the server was frozen (``SIGSTOP``, a paused
VM) and ran when it resumed, after the client had given up, or a release timed out.

:class:`FillLock` wraps the backend's mutex and waits for it by polling its non-blocking
``acquire(False)`` every ``lock_sleep`` (0.1 s) for at most ``lock_blocking_timeout`` seconds
(:data:`~declcache.backends._base.DEFAULT_LOCK_BLOCKING_TIMEOUT`), the same on every backend.
A reader that times out reads the database and fills the cache as a reader without the lock
would: the lock only saves duplicate queries; what keeps a stale value out is the fill's
compare-and-set against what the reader saw (:mod:`declcache._reads`), lock or no lock.
Filling also means that the readers after it hit the cache and never touch the stuck lock.

A reader that timed out also remembers, in this process, that the key's lock is stuck for the
lock's ``lock_timeout`` (:class:`StuckLocks`, one per dogpile backend): the next misses of that
key — an entry invalidated again, a row that does not exist and is not cached — try the lock
once and, if it is still held, read the database at once instead of waiting the whole bound
again. A lock that comes free is taken as usual and the key forgotten.

An async reader waits with ``asyncio.sleep`` between attempts, each attempt in a worker thread,
so a wait holds no thread; a lock its cancelled reader took after all is released.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from declcache.backends._base import DEFAULT_LOCK_BLOCKING_TIMEOUT, DEFAULT_LOCK_TIMEOUT

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["DEFAULT_LOCK_SLEEP", "FillLock", "StuckLocks", "fill_lock"]

logger = logging.getLogger("declcache.repository")

#: Seconds between two attempts at a held lock, unless ``lock_sleep`` says (redis-py's default).
DEFAULT_LOCK_SLEEP = 0.1
#: Seconds a key is remembered as stuck when its lock never expires (Memcached
#: ``lock_timeout=0``): after that, one reader waits the bound again.
STUCK_WITHOUT_TIMEOUT = 60.0
#: Keys :class:`StuckLocks` remembers at most per backend; the oldest are forgotten first.
MAX_STUCK_KEYS = 10_000


class StuckLocks:
    """The keys whose lock a reader of this process waited for in vain, each until a deadline."""

    def __init__(self, max_keys: int = MAX_STUCK_KEYS) -> None:
        self._until: dict[str, float] = {}
        self._max_keys = max_keys
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            until = self._until.get(key)
            if until is None:
                return False
            if until > time.monotonic():
                return True
            del self._until[key]
            return False

    def __len__(self) -> int:
        with self._lock:
            return len(self._until)

    def add(self, key: str, seconds: float) -> None:
        """Remember ``key`` as stuck for ``seconds``."""
        now = time.monotonic()
        with self._lock:
            self._until.pop(key, None)  # re-inserted last: the newest
            self._until[key] = now + seconds
            if len(self._until) > self._max_keys:
                for old in [k for k, until in self._until.items() if until <= now]:
                    del self._until[old]
                while len(self._until) > self._max_keys:
                    del self._until[next(iter(self._until))]

    def discard(self, key: str) -> None:
        """Forget ``key``: its lock was taken."""
        with self._lock:
            self._until.pop(key, None)


#: One :class:`StuckLocks` per dogpile backend (one region: one manager's model).
_STUCK: weakref.WeakKeyDictionary[Any, StuckLocks] = weakref.WeakKeyDictionary()
_STUCK_LOCK = threading.Lock()


def stuck_locks(backend: Any) -> StuckLocks:
    """The stuck keys remembered for ``backend`` (a dogpile backend), made on first use."""
    with _STUCK_LOCK:
        found = _STUCK.get(backend)
        if found is None:
            found = _STUCK[backend] = StuckLocks()
        return found


def _seconds(arguments: Mapping[str, Any], name: str, default: float) -> float:
    value = arguments.get(name)
    return float(default if value is None else value)


class FillLock:
    """A backend's fill lock for one key, taken with a bounded wait.

    Args:
        mutex: the dogpile backend's mutex (``acquire(wait)``, ``release()``).
        key: the cache key it guards.
        blocking_timeout: seconds :meth:`acquire` waits at most; 0: one attempt.
        sleep: seconds between two attempts.
        stuck_for: seconds a key whose wait timed out is remembered as stuck.
        stuck: where this process remembers stuck keys.
    """

    def __init__(  # noqa: PLR0917 - one per setting
        self,
        mutex: Any,
        key: str,
        blocking_timeout: float,
        sleep: float,
        stuck_for: float,
        stuck: StuckLocks,
    ) -> None:
        self.mutex = mutex
        self.key = key
        self.blocking_timeout = blocking_timeout
        self.sleep = sleep
        self.stuck_for = stuck_for
        self.stuck = stuck
        #: Attempts at the backend's lock so far (each one round trip).
        self.attempts = 0

    def __repr__(self) -> str:
        return f"<FillLock {self.key!r} wait≤{self.blocking_timeout:g}s>"

    def _try(self) -> bool:
        self.attempts += 1
        if self.mutex.acquire(False):
            self.stuck.discard(self.key)
            return True
        return False

    def _deadline(self, wait: bool) -> float | None:
        """When to give up, or ``None`` for one attempt only (no wait, or a stuck key)."""
        if not wait or self.blocking_timeout <= 0 or self.key in self.stuck:
            return None
        return time.monotonic() + self.blocking_timeout

    def _pause(self, deadline: float) -> float:
        """Seconds to sleep before the next attempt; 0 when the wait is over."""
        left = deadline - time.monotonic()
        if left <= 0:
            return 0.0
        return min(self.sleep * random.uniform(0.8, 1.2), left)

    def _gave_up(self, deadline: float | None) -> bool:
        if deadline is not None:  # waited the whole bound in vain
            self.stuck.add(self.key, self.stuck_for)
            logger.info(
                "fill lock of %r still held after %gs: reading the database without it",
                self.key,
                self.blocking_timeout,
            )
        return False

    def acquire(self, wait: bool = True) -> bool:
        """Take the lock: at once, or within ``blocking_timeout`` seconds; whether it was taken.

        Raises what the backend raises (a reader then fills without the lock).
        """
        deadline = self._deadline(wait)
        while True:
            if self._try():
                return True
            pause = 0.0 if deadline is None else self._pause(deadline)
            if pause <= 0:
                return self._gave_up(deadline)
            time.sleep(pause)

    async def aacquire(self) -> bool:
        """:meth:`acquire` for a coroutine: attempts in a worker thread, waits on the loop."""
        deadline = self._deadline(True)
        while True:
            if await self._atry():
                return True
            pause = 0.0 if deadline is None else self._pause(deadline)
            if pause <= 0:
                return self._gave_up(deadline)
            await asyncio.sleep(pause)

    async def _atry(self) -> bool:
        attempt = asyncio.ensure_future(asyncio.to_thread(self._try))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            attempt.add_done_callback(self._release_if_taken)
            raise

    def _release_if_taken(self, attempt: asyncio.Future[bool]) -> None:
        """A cancelled reader's attempt that took the lock after all: release it."""
        if not attempt.cancelled() and attempt.exception() is None and attempt.result():
            asyncio.get_running_loop().run_in_executor(None, self._release_quietly)

    def _release_quietly(self) -> None:
        try:
            self.mutex.release()
        except Exception as error:  # it expires with its lock_timeout
            logger.debug("fill lock release failed: %r", error)

    def release(self) -> None:
        """Release the lock (raises what the backend raises, e.g. it expired meanwhile)."""
        self.mutex.release()

    async def arelease(self) -> None:
        """:meth:`release` in a worker thread."""
        await asyncio.to_thread(self.mutex.release)

    def locked(self) -> bool:
        """Whether someone holds the lock (the backend's answer)."""
        return bool(self.mutex.locked())


def fill_lock(backend: Any, key: str, arguments: Mapping[str, Any]) -> FillLock | None:
    """``backend``'s fill lock for ``key`` with the bounds ``arguments`` configure, or ``None``.

    Args:
        backend: the region's dogpile backend; ``None`` from its ``get_mutex``: no lock.
        key: the cache key to fill.
        arguments: the backend arguments: ``lock_blocking_timeout`` (the bound; 0 with
            ``lock_blocking=False``), ``lock_sleep``, ``lock_timeout``.
    """
    mutex = backend.get_mutex(key)
    if mutex is None:
        return None
    if arguments.get("lock_blocking") is False:
        blocking_timeout = 0.0
    else:
        blocking_timeout = _seconds(
            arguments, "lock_blocking_timeout", DEFAULT_LOCK_BLOCKING_TIMEOUT
        )
    lock_timeout = _seconds(arguments, "lock_timeout", DEFAULT_LOCK_TIMEOUT)
    return FillLock(
        mutex,
        key,
        blocking_timeout=blocking_timeout,
        sleep=_seconds(arguments, "lock_sleep", DEFAULT_LOCK_SLEEP),
        stuck_for=lock_timeout if lock_timeout > 0 else STUCK_WITHOUT_TIMEOUT,
        stuck=stuck_locks(backend),
    )
