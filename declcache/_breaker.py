"""A circuit breaker in front of the backend: a dead cache costs one timeout per interval.

Without it every request pays a connect timeout (or a refused connection) against a dead
server. After a fault the breaker *opens*: for ``interval`` seconds no call reaches the
backend, each one fails at once with :class:`BackendUnavailable` (the manager answers a miss
and queues invalidations for replay). Then it is *half-open*: exactly one call goes through
as a probe; success *closes* it, a fault opens it for another interval. Each state change is
logged once, under ``declcache.breaker``.

:class:`GuardedStore` and :class:`AsyncGuardedStore` put one manager's breaker in front of each
model's sync and async store: one breaker serves both. While it is closed a call only needs
bookkeeping when it fails (:meth:`Breaker.failed`); otherwise each call is an
:meth:`Breaker.attempt`, which admits it, tells whether it is the probe, and records its end.

Only a call that reached the backend changes the state: a near-cache hit never does (the
near cache sits in front of the guarded store). The replay of queued invalidations must not
wait for the interval — every second of it is a second other processes may read rows this
one changed — so its calls run under :func:`probing_now`: each goes to the backend as a
probe whatever the state, and its success closes the breaker for everyone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from declcache._secrets import describe_error

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from types import TracebackType

    from declcache._api import AsyncStore, Store, Swap, Write

__all__ = [
    "AsyncGuardedStore",
    "BackendUnavailable",
    "Breaker",
    "BreakerStats",
    "GuardedStore",
    "capacity_errors",
    "probing_now",
]

logger = logging.getLogger("declcache.breaker")

State = Literal["closed", "open", "half-open"]

_probing_now: ContextVar[bool] = ContextVar("declcache_probing_now", default=False)


@contextlib.contextmanager
def probing_now() -> Iterator[None]:
    """Calls made inside go to the backend even while a breaker is open, each as a probe.

    For the background replay only: it runs off every request's path, so a dead backend
    costs it a timeout, never a request. A failure keeps the breaker open for requests.
    """
    token = _probing_now.set(True)
    try:
        yield
    finally:
        _probing_now.reset(token)


def capacity_errors(store: object) -> tuple[type[BaseException], ...]:
    """The errors of ``store`` that say its client's pool is exhausted, not that it failed.

    A store may list them as ``capacity_errors`` (Redis: ``MaxConnectionsError``, when more
    callers than ``max_connections`` waited longer than the pool lets them). The server
    answers: opening the breaker would send every read to the database for an interval
    because of one burst. Such a call fails alone (the caller reads the database) and leaves
    the breaker as it was. A store wrapping another (the async adapter) is looked through.
    """
    found: Any = getattr(store, "capacity_errors", None)
    if found is None:
        found = getattr(getattr(store, "store", None), "capacity_errors", ())
    return tuple(found)


class BackendUnavailable(ConnectionError):
    """The breaker is open: the backend was not called."""


@dataclass(frozen=True)
class BreakerStats:
    """The breaker of one manager, as :meth:`CacheManager.breaker_stats` reports it.

    Attributes:
        state: ``"closed"`` (calls go through), ``"open"`` or ``"half-open"`` (probing).
        opened: how many times it opened since the manager started.
        refused: calls answered without calling the backend while it was open.
    """

    state: State
    opened: int
    refused: int


class Breaker:
    """Closed, open or half-open; thread-safe.

    Args:
        interval: seconds to stay open after a fault; ``0`` never opens.
        clock: monotonic time source (tests pass a fake one).
        secrets: texts the warning it logs on opening must not show (a client's error can
            quote what it was configured with).
        target: where the backend is (``host=…, port=…``), for that warning to name.
    """

    def __init__(
        self,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        secrets: Iterable[str] = (),
        target: str = "",
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._secrets = frozenset(secrets)
        self._target = target
        self._state: State = "closed"
        self._until = 0.0
        self._opened_at = float("-inf")
        self._probe_started = float("-inf")
        self._closed_at = float("-inf")
        self._opened = 0
        self._refused = 0
        self._lock = threading.Lock()

    @property
    def state(self) -> State:
        """The current state."""
        return self._state

    def _current(self) -> State:
        """The state, read afresh (a method, so type checkers do not narrow it)."""
        return self._state

    def stats(self) -> BreakerStats:
        """A snapshot of the state and counters."""
        with self._lock:
            return BreakerStats(self._state, self._opened, self._refused)

    def attempt(self, not_faults: tuple[type[BaseException], ...] = ()) -> Attempt:
        """One backend call, admitted: ``with breaker.attempt() as probing: call()``.

        An error of ``not_faults`` (see :func:`capacity_errors`) ends the call like a
        cancellation: no fault, and a probe that gets it proves nothing.

        Raises:
            BackendUnavailable: the breaker is open; the backend must not be called.
        """
        admitted = self.admit()
        if admitted is None:
            raise BackendUnavailable("circuit breaker open: cache backend not called")
        return Attempt(self, self._clock(), probing=admitted == "probe", not_faults=not_faults)

    def allow(self) -> bool:
        """Whether a call may go to the backend now (at most one probe when half-open)."""
        return self.admit() is not None

    def admit(self) -> Literal["call", "probe"] | None:
        """``"call"`` when closed, ``"probe"`` for the one probe, ``None`` when refused.

        Under :func:`probing_now` every call that finds it not closed is a probe.
        """
        if self.state == "closed":
            return "call"
        if _probing_now.get():
            return "probe" if self._current() != "closed" else "call"
        with self._lock:
            state = self._current()  # again, under the lock
            now = self._clock()
            if state == "open" and now >= self._until:
                self._state = "half-open"
                self._probe_started = now
                return "probe"
            if state == "closed":
                return "call"
            self._refused += 1
            return None

    def succeeded(self, started: float) -> None:
        """A call that began at ``started`` went through: close the breaker if it was open.

        A call that began before the breaker last opened proves nothing and is ignored.
        """
        if self.state == "closed":
            return
        with self._lock:
            if self._current() == "closed" or started < self._opened_at:
                return
            self._state = "closed"
            self._closed_at = started
        logger.warning("cache backend (%s) answers again: circuit breaker closed", self._target)

    def abandoned(self, started: float) -> None:
        """The probe that began at ``started`` ended without an answer (it was cancelled).

        It proves nothing either way: the next call may probe at once. Left half-open, the
        breaker would refuse every call for good.
        """
        with self._lock:
            if self._current() == "half-open" and started >= self._probe_started:
                self._state = "open"
                self._until = self._clock()

    def failed(self, error: BaseException, started: float) -> None:
        """A call that began at ``started`` failed: open the breaker for another interval.

        The interval counts from the start of the failed call, so a call that timed out does
        not stretch the time until the next probe: the backend gets one call per interval.
        """
        if self.interval <= 0:
            return
        with self._lock:
            was = self._state
            if was == "half-open" and started < self._probe_started:
                return  # a call older than the probe: the probe decides
            if was == "closed" and started < self._closed_at:
                return  # began before the probe that closed it: nothing new
            self._state = "open"
            self._until = max(self._until, started + self.interval)
            if was == "closed":
                self._opened += 1
                self._opened_at = started
        if was == "closed":
            logger.warning(
                "cache backend (%s) failed: %s; circuit breaker open, calls skipped for %.3g s "
                "at a time until it answers",
                self._target,
                # A text, not the error: a record holding it would keep its traceback's frames.
                describe_error(error, self._secrets),
                self.interval,
            )


class Attempt:
    """One admitted backend call; its outcome closes or opens the breaker.

    Entering gives whether the call is the half-open breaker's probe: the caller then resets
    its pooled connections first, as they may lead to a server since restarted (each stale
    connection would fail once after the backend returned, opening the breaker each time).
    """

    __slots__ = ("_breaker", "_not_faults", "_probing", "_started")

    def __init__(
        self,
        breaker: Breaker,
        started: float,
        *,
        probing: bool,
        not_faults: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._breaker = breaker
        self._started = started
        self._probing = probing
        self._not_faults = not_faults

    def __enter__(self) -> bool:
        return self._probing

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        breaker = self._breaker
        if error is None:
            if breaker._state != "closed":
                breaker.succeeded(self._started)
        elif isinstance(error, Exception) and not isinstance(error, self._not_faults):
            breaker.failed(error, self._started)
        elif self._probing:  # cancelled, pool exhausted, or exiting: no answer at all
            breaker.abandoned(self._started)


class GuardedStore:
    """A store whose calls go through a :class:`Breaker`.

    Args:
        inner: the backend's store.
        breaker: the manager's breaker, shared by every model's sync and async store.
    """

    def __init__(self, inner: Store, breaker: Breaker) -> None:
        self.inner = inner
        self.breaker = breaker
        #: The inner store's "pool exhausted" errors: no fault (see :func:`capacity_errors`).
        self.not_faults = capacity_errors(inner)

    def _call(self, method: str, *args: Any) -> Any:
        breaker = self.breaker
        if breaker._state == "closed":  # nearly always: only a failure needs bookkeeping
            started = breaker._clock()
            try:
                return getattr(self.inner, method)(*args)
            except Exception as error:
                if not isinstance(error, self.not_faults):
                    breaker.failed(error, started)
                raise
        with breaker.attempt(self.not_faults) as probing:
            if probing:
                self.reset_connections()
            return getattr(self.inner, method)(*args)

    def reset_connections(self) -> None:
        """Drop pooled connections, which reconnect on next use; never raises."""
        try:
            self.inner.reset_connections()
        except Exception as error:  # a probe that follows reports the real state
            logger.debug("could not reset the backend's connections: %r", error)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """See :meth:`Store.get_many`."""
        result: list[bytes | None] = self._call("get_many", keys)
        return result

    def write_many(self, entries: Sequence[Write]) -> None:
        """See :meth:`Store.write_many`."""
        self._call("write_many", entries)

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        """See :meth:`Store.add`."""
        return bool(self._call("add", key, value, ttl))

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:
        """See :meth:`Store.compare_and_set`."""
        result: list[bool] = self._call("compare_and_set", swaps, ttl)
        return result

    def delete_many(self, keys: Sequence[str]) -> None:
        """See :meth:`Store.delete_many`."""
        self._call("delete_many", keys)


class AsyncGuardedStore:
    """An async store whose calls go through the same :class:`Breaker` as the sync ones.

    Args:
        inner: the backend's async store.
        breaker: the manager's breaker.
    """

    def __init__(self, inner: AsyncStore, breaker: Breaker) -> None:
        self.inner = inner
        self.breaker = breaker
        #: The inner store's "pool exhausted" errors: no fault (see :func:`capacity_errors`).
        self.not_faults = capacity_errors(inner)

    async def _call(self, method: str, *args: Any) -> Any:
        breaker = self.breaker
        if breaker._state == "closed":  # nearly always: only a failure needs bookkeeping
            started = breaker._clock()
            try:
                return await getattr(self.inner, method)(*args)
            except Exception as error:
                if not isinstance(error, self.not_faults):
                    breaker.failed(error, started)
                raise
        with breaker.attempt(self.not_faults) as probing:
            if probing:
                await self.reset_connections()
            return await getattr(self.inner, method)(*args)

    async def reset_connections(self) -> None:
        """Drop pooled connections, which reconnect on next use; never raises."""
        try:
            await self.inner.reset_connections()
        except Exception as error:  # a probe that follows reports the real state
            logger.debug("could not reset the backend's connections: %r", error)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """See :meth:`Store.get_many`."""
        result: list[bytes | None] = await self._call("get_many", keys)
        return result

    async def write_many(self, entries: Sequence[Write]) -> None:
        """See :meth:`Store.write_many`."""
        await self._call("write_many", entries)

    async def add(self, key: str, value: bytes, ttl: int) -> bool:
        """See :meth:`Store.add`."""
        return bool(await self._call("add", key, value, ttl))

    async def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:
        """See :meth:`Store.compare_and_set`."""
        result: list[bool] = await self._call("compare_and_set", swaps, ttl)
        return result

    async def delete_many(self, keys: Sequence[str]) -> None:
        """See :meth:`Store.delete_many`."""
        await self._call("delete_many", keys)
