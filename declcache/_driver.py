"""Where the I/O-free flows meet I/O: run a flow on a sync store, or await it on an async one.

A flow (:mod:`declcache._reads`, :mod:`declcache._invalidation`) is a generator that yields a
:class:`Call` — a store method and its arguments, or :data:`LOAD` for the database — and is
sent its result. :func:`run` and :func:`arun` are the only two places that make those calls,
so every decision of a read or an invalidation is written once for threads and coroutines
alike (the way httpx keeps one client core under ``Client`` and ``AsyncClient``).

A store call that raises is thrown back into the flow, which answers the fault (a miss, a
queued invalidation). A loader that raises is not: a database error reaches the caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

if TYPE_CHECKING:
    from declcache._api import AsyncStore, Store

__all__ = ["LOAD", "Call", "Flow", "arun", "run"]

T = TypeVar("T")

#: The method of a :class:`Call` that asks the loader (the database), not the store.
LOAD = "load"


class Call:
    """One request of a flow: ``method(*args)`` on the store, or the loader for :data:`LOAD`."""

    __slots__ = ("args", "method")

    def __init__(self, method: str, *args: Any) -> None:
        self.method = method
        self.args = args

    def __repr__(self) -> str:
        return f"Call({self.method!r}, {len(self.args)} args)"


#: A flow returning ``T``.
Flow: TypeAlias = Generator[Call, Any, T]


def run(flow: Flow[T], store: Store | None, loader: Callable[..., Any] | None = None) -> T:
    """Run ``flow`` to its end on ``store``, asking ``loader`` for what the database holds."""
    value: Any = None
    error: Exception | None = None
    while True:
        try:
            call = flow.send(value) if error is None else flow.throw(error)
        except StopIteration as done:
            result: T = done.value
            return result
        if call.method == LOAD:
            assert loader is not None, "a flow that loads needs a loader"
            value, error = loader(*call.args), None
            continue
        try:
            value, error = getattr(store, call.method)(*call.args), None
        except Exception as caught:
            value, error = None, caught


async def arun(
    flow: Flow[T], store: AsyncStore | None, loader: Callable[..., Awaitable[Any]] | None = None
) -> T:
    """:func:`run` for coroutines: every store call and the loader awaited on the loop."""
    value: Any = None
    error: Exception | None = None
    while True:
        try:
            call = flow.send(value) if error is None else flow.throw(error)
        except StopIteration as done:
            result: T = done.value
            return result
        if call.method == LOAD:
            assert loader is not None, "a flow that loads needs a loader"
            value, error = await loader(*call.args), None
            continue
        try:
            value, error = await getattr(store, call.method)(*call.args), None
        except Exception as caught:
            value, error = None, caught
