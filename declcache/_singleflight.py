"""One load per key per process: concurrent callers of one key share the first caller's load.

The first caller of a key becomes the *leader* and runs the load; callers arriving while it
runs become *followers* and wait for it instead of loading too. Each caller gets an
:class:`Outcome` saying who led and what came out, so the caller decides what it may reuse:
an ORM instance belongs to the leader's session, so a follower in another session reads the
cache the leader just filled instead of taking the instance.

Both count the flights that have *landed* (ended). A caller that looked the cache up before
joining compares the count: unchanged, no load ended in between, so what it saw is still
what a leader must fill against; changed, a leader may just have filled it, so it looks again.

:class:`ThreadFlights` serves threads; :class:`AsyncFlights` serves coroutines, whose followers
await the leader's future (under one ``AsyncSession`` they must not query concurrently).

Several keys at once (``get_many``): :meth:`ThreadFlights.claim` (or the async one) splits the
keys, in one step, into those nobody is loading, which the caller now leads, and those a
flight is loading, which it follows. It loads all it leads in one go, lands them
(:meth:`~ThreadFlights.land`) with a value per key, and only then waits for the ones it
follows: every caller finishes its own loads before it waits, so no two callers wait for
each other. A key of ``get`` and of ``get_many`` is the same flight.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence

__all__ = ["AsyncFlights", "Outcome", "ThreadFlights"]

T = TypeVar("T")


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What one caller gets from a flight.

    Attributes:
        value: the leader's result (``None`` when it raised).
        error: what the leader raised, if anything.
        leader: whether this caller ran the load itself.
        owner: the owner (a session) the leader loaded with.
    """

    value: T | None
    error: BaseException | None
    leader: bool
    owner: object

    def result(self) -> T:
        """The leader's value, or its exception raised again."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]  # None is a valid T here


class _Call:
    __slots__ = ("done", "error", "owner", "thread", "value")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.thread = threading.get_ident()
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class ThreadFlights:
    """Singleflight for threads: one running load per key, the others block until it ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, _Call] = {}
        self.landed = 0

    def run(self, key: Hashable, owner: object, load: Callable[[], T]) -> Outcome[T]:
        """Run ``load`` unless another thread runs it for ``key``; then wait for that one.

        A leader's exception propagates to the leader; followers receive it in the outcome.
        """
        with self._lock:
            call = self._calls.get(key)
            leader = call is None or call.thread == threading.get_ident()  # no self-deadlock
            if call is None:
                call = self._calls[key] = _Call(owner)
        if not leader:
            call.done.wait()
            return Outcome(call.value, call.error, leader=False, owner=call.owner)
        try:
            call.value = value = load()
        except BaseException as error:
            call.error = error
            raise
        finally:
            with self._lock:
                if self._calls.get(key) is call:
                    del self._calls[key]
                self.landed += 1
            call.done.set()
        return Outcome(value, None, leader=True, owner=owner)

    def claim(
        self, keys: Sequence[Hashable], owner: object
    ) -> tuple[dict[Hashable, _Call], dict[Hashable, _Call]]:
        """``(led, followed)``: the calls this thread now leads, and those another one runs.

        A key this thread is already loading (a load that reads again) is neither: the caller
        loads it itself, as :meth:`run` would. Land every led call (:meth:`land`), even
        when the load fails, before waiting for a followed one (:meth:`wait`).
        """
        led: dict[Hashable, _Call] = {}
        followed: dict[Hashable, _Call] = {}
        me = threading.get_ident()
        with self._lock:
            for key in keys:
                if key in led or key in followed:
                    continue
                call = self._calls.get(key)
                if call is None:
                    led[key] = self._calls[key] = _Call(owner)
                elif call.thread != me:
                    followed[key] = call
        return led, followed

    def land(
        self,
        led: Mapping[Hashable, _Call],
        values: Mapping[Hashable, Any],
        error: BaseException | None = None,
    ) -> None:
        """End the ``led`` calls: each key's value from ``values``, or ``error`` for all."""
        for key, call in led.items():
            call.value, call.error = (None, error) if error is not None else (values[key], None)
        with self._lock:
            for key, call in led.items():
                if self._calls.get(key) is call:
                    del self._calls[key]
            self.landed += 1
        for call in led.values():
            call.done.set()

    @staticmethod
    def wait(call: _Call) -> Outcome[Any]:
        """What the thread that leads ``call`` got, once it landed."""
        call.done.wait()
        return Outcome(call.value, call.error, leader=False, owner=call.owner)


class AsyncFlights:
    """Singleflight for coroutines of one event loop (keys are kept apart per loop)."""

    def __init__(self) -> None:
        self._calls: dict[tuple[asyncio.AbstractEventLoop, Hashable], tuple[Any, object]] = {}
        self.landed = 0

    async def run(
        self, key: Hashable, owner: object, load: Callable[[], Awaitable[T]]
    ) -> Outcome[T]:
        """Await ``load()`` unless a coroutine already does for ``key``; then await that one.

        A follower that is cancelled does not cancel the leader. When the leader is cancelled,
        its followers run ``load()`` themselves rather than fail.
        """
        loop = asyncio.get_running_loop()
        slot = (loop, key)
        running = self._calls.get(slot)
        if running is not None:
            future, leader_owner = running
            try:
                value = await asyncio.shield(future)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not future.cancelled() or (task is not None and task.cancelling()):
                    raise  # this follower itself is being cancelled
                return await self.run(key, owner, load)
            except Exception as error:
                return Outcome(None, error, leader=False, owner=leader_owner)
            return Outcome(value, None, leader=False, owner=leader_owner)
        future = loop.create_future()
        self._calls[slot] = (future, owner)
        try:
            value = await load()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: no "never retrieved" warning without followers
            raise
        else:
            future.set_result(value)
        finally:
            if self._calls.get(slot, (None,))[0] is future:
                del self._calls[slot]
            self.landed += 1
        return Outcome(value, None, leader=True, owner=owner)

    def claim(
        self, keys: Sequence[Hashable], owner: object
    ) -> tuple[dict[Hashable, asyncio.Future[Any]], dict[Hashable, tuple[Any, object]]]:
        """``(led, followed)``: futures this coroutine now leads, and flights it follows.

        Nothing is awaited in between, so the split is atomic on the loop. Land every led
        future (:meth:`land`), even when the load fails or is cancelled, before awaiting a
        followed one (:meth:`wait`).
        """
        loop = asyncio.get_running_loop()
        led: dict[Hashable, asyncio.Future[Any]] = {}
        followed: dict[Hashable, tuple[Any, object]] = {}
        for key in keys:
            if key in led or key in followed:
                continue
            running = self._calls.get((loop, key))
            if running is None:
                future = led[key] = loop.create_future()
                self._calls[(loop, key)] = (future, owner)
            else:
                followed[key] = running
        return led, followed

    def land(
        self,
        led: Mapping[Hashable, asyncio.Future[Any]],
        values: Mapping[Hashable, Any],
        error: BaseException | None = None,
    ) -> None:
        """End the ``led`` futures: each key's value, or ``error`` for all (cancelled: cancel)."""
        loop = asyncio.get_running_loop()
        for key, future in led.items():
            if isinstance(error, asyncio.CancelledError):
                future.cancel()
            elif error is not None:
                future.set_exception(error)
                future.exception()  # retrieved: no warning without followers
            else:
                future.set_result(values[key])
            if self._calls.get((loop, key), (None,))[0] is future:
                del self._calls[(loop, key)]
        self.landed += 1

    @staticmethod
    async def wait(running: tuple[Any, object]) -> Outcome[Any] | None:
        """What the leader of a followed flight got; ``None`` when it was cancelled.

        A follower that is itself cancelled raises; the leader's flight goes on.
        """
        future, leader_owner = running
        try:
            value = await asyncio.shield(future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not future.cancelled() or (task is not None and task.cancelling()):
                raise
            return None
        except Exception as error:
            return Outcome(None, error, leader=False, owner=leader_owner)
        return Outcome(value, None, leader=False, owner=leader_owner)
