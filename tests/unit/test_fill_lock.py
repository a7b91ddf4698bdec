"""The fill lock's bookkeeping, on a stand-in mutex: settings, stuck keys, a cancelled waiter.

The waits on real Redis and Memcached locks are in
``tests/integration/test_fill_lock_waits.py``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from declcache._fill_lock import (
    DEFAULT_LOCK_SLEEP,
    STUCK_WITHOUT_TIMEOUT,
    FillLock,
    StuckLocks,
    fill_lock,
)
from declcache.backends._base import DEFAULT_LOCK_BLOCKING_TIMEOUT, DEFAULT_LOCK_TIMEOUT


class Mutex:
    """dogpile's mutex interface over a flag; ``gate`` (if set) holds each attempt back."""

    def __init__(self, *, held: bool = False) -> None:
        self.held = held
        self.attempts = 0
        self.releases = 0
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def acquire(self, wait: bool = True) -> bool:
        assert wait is False  # the fill lock never lets the backend wait
        self.attempts += 1
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(5)
        if self.held:
            return False
        self.held = True
        return True

    def release(self) -> None:
        self.releases += 1
        self.held = False

    def locked(self) -> bool:
        return self.held


class Backend:
    def __init__(self, mutex: Mutex) -> None:
        self.mutex = mutex

    def get_mutex(self, key: str) -> Mutex:
        del key
        return self.mutex


def make(mutex: Mutex, **arguments: Any) -> FillLock:
    lock = fill_lock(Backend(mutex), "k", {"distributed_lock": True, **arguments})
    assert lock is not None
    return lock


def test_the_defaults_and_the_arguments() -> None:
    lock = make(Mutex())
    assert (lock.blocking_timeout, lock.sleep, lock.stuck_for) == (
        DEFAULT_LOCK_BLOCKING_TIMEOUT,
        DEFAULT_LOCK_SLEEP,
        DEFAULT_LOCK_TIMEOUT,
    )
    lock = make(Mutex(), lock_blocking_timeout=7, lock_sleep=0.5, lock_timeout=20)
    assert (lock.blocking_timeout, lock.sleep, lock.stuck_for) == (7, 0.5, 20)
    assert make(Mutex(), lock_blocking=False, lock_blocking_timeout=7).blocking_timeout == 0
    assert make(Mutex(), lock_timeout=0).stuck_for == STUCK_WITHOUT_TIMEOUT  # never expires
    assert fill_lock(Backend(None), "k", {}) is None  # type: ignore[arg-type]


def test_a_backend_with_one_key_per_lock_shares_its_stuck_keys() -> None:
    backend = Backend(Mutex())
    first, second = fill_lock(backend, "k", {}), fill_lock(backend, "k", {})
    other = fill_lock(Backend(Mutex()), "k", {})
    assert first is not None
    assert second is not None
    assert other is not None
    assert first.stuck is second.stuck
    assert first.stuck is not other.stuck


def test_a_timed_out_wait_marks_the_key_and_the_next_tries_once() -> None:
    mutex = Mutex(held=True)
    backend = Backend(mutex)
    lock = fill_lock(backend, "k", {"lock_blocking_timeout": 0.05, "lock_sleep": 0.01})
    assert lock is not None
    assert not lock.acquire()
    assert "k" in lock.stuck
    again = fill_lock(backend, "k", {"lock_blocking_timeout": 60})  # stuck: no minute's wait
    assert again is not None
    assert not again.acquire()
    assert again.attempts == 1
    mutex.held = False
    assert again.acquire()
    assert "k" not in lock.stuck  # taken: forgotten


def test_stuck_keys_expire_and_are_bounded() -> None:
    stuck = StuckLocks(max_keys=3)
    stuck.add("gone", -1)
    assert "gone" not in stuck
    for key in "abcd":
        stuck.add(key, 60)
    assert len(stuck) == 3
    assert "a" not in stuck  # the oldest went first
    assert all(key in stuck for key in "bcd")
    stuck.discard("b")
    assert "b" not in stuck


async def test_an_async_wait_holds_no_thread_and_gives_up() -> None:
    mutex = Mutex(held=True)
    lock = make(mutex, lock_blocking_timeout=0.2, lock_sleep=0.02)
    assert not await lock.aacquire()
    assert mutex.attempts >= 1
    assert "k" in lock.stuck


async def test_a_cancelled_waiter_releases_the_lock_its_last_attempt_took() -> None:
    mutex = Mutex()
    mutex.gate = threading.Event()
    lock = make(mutex)
    waiter = asyncio.ensure_future(lock.aacquire())
    await asyncio.to_thread(mutex.entered.wait, 5)  # the attempt is under way in a thread
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    mutex.gate.set()  # ... and takes the lock after its reader was cancelled
    for _ in range(500):
        if mutex.releases:
            break
        await asyncio.sleep(0.01)
    assert mutex.releases == 1
    assert not mutex.held
