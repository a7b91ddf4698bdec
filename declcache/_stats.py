"""Per-model counters and fault logging that cannot flood the log."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

from declcache._secrets import describe_error

__all__ = ["Counters", "FaultLog", "ModelStats", "StatsHook"]


@dataclass
class ModelStats:
    """What one model's cache did since the manager started.

    Attributes:
        hits: lookups answered from the cache (a cached "not found" included).
        misses: lookups the database had to answer.
        fills: entries written after a database read.
        invalidations: entries dropped because the data changed (or on request).
        errors: backend faults (also while the circuit breaker is open) and undecodable
            payloads; each degraded to the database.
        fills_refused: fills dropped because the entry was invalidated while the database
            was being read (the no-stale-fill guard at work).
        invalidations_queued: invalidations kept for replay while the backend was down.
        invalidations_overflowed: times the replay queue was full and the whole model was
            marked for invalidation instead.
        oversized: payloads not cached because they exceeded ``max_value_bytes``.
        bytes: payload bytes written to the backend by fills (entities and lists).
        short_circuited: the errors that never reached the backend because the circuit
            breaker was open: answered as a miss (or a queued invalidation) at once.
    """

    hits: int = 0
    misses: int = 0
    fills: int = 0
    invalidations: int = 0
    errors: int = 0
    fills_refused: int = 0
    invalidations_queued: int = 0
    invalidations_overflowed: int = 0
    oversized: int = 0
    bytes: int = 0
    short_circuited: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict, for JSON and tables."""
        return {item.name: getattr(self, item.name) for item in fields(self)}


#: ``on_stats(model, counter, amount)``: told of every increment, e.g. to feed metrics.
StatsHook = Callable[[str, str, int], None]


class Counters:
    """Thread-safe increments of :class:`ModelStats`, one instance per model.

    Args:
        model: the model's name, passed to ``hook``.
        hook: called after each increment with ``(model, counter, amount)``; an exception
            it raises is logged and ignored, so exporting can never fail a request.
    """

    __slots__ = ("_hook", "_lock", "_model", "_stats")

    def __init__(self, model: str = "", hook: StatsHook | None = None) -> None:
        self._stats = ModelStats()
        self._lock = threading.Lock()
        self._model = model
        self._hook = hook

    def add(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to the counter ``name``."""
        with self._lock:
            setattr(self._stats, name, getattr(self._stats, name) + amount)
        if self._hook is not None and amount:
            try:
                self._hook(self._model, name, amount)
            except Exception:
                _hook_faults.warning("hook", "the on_stats hook failed", exc_info=True)

    def snapshot(self) -> ModelStats:
        """A copy of the counters, safe to keep."""
        with self._lock:
            return ModelStats(**self._stats.as_dict())


class FaultLog:
    """Log each kind of fault at most once per ``interval`` seconds, with how many were hidden."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 30.0,
        secrets: Iterable[str] = (),
        *,
        target: str = "",
    ) -> None:
        self._logger = logger
        #: Where the backend is (``host=…, port=…``, no password), for messages to name.
        self.target = target
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()
        #: Texts no record may show: a client's error can quote what it was configured with.
        self._secrets = frozenset(secrets)

    def warning(self, kind: str, message: str, *args: object, exc_info: bool = False) -> None:
        """Log ``message`` unless ``kind`` was logged less than ``interval`` seconds ago."""
        now = time.monotonic()
        with self._lock:
            last, hidden = self._last.get(kind, (float("-inf"), 0))
            if now - last < self._interval:
                self._last[kind] = (last, hidden + 1)
                return
            self._last[kind] = (now, 0)
        suffix = f" ({hidden} similar faults not logged)" if hidden else ""
        shown = [
            _Redacted(arg, self._secrets) if isinstance(arg, BaseException) else arg for arg in args
        ]
        self._logger.warning(message + suffix, *shown, exc_info=exc_info)


class _Redacted:
    """An error as a log record shows it (``%s`` or ``%r``): ``Class: message``, no secret.

    A text, not the error: a record that holds an error holds its traceback's frames.
    """

    __slots__ = ("_text",)

    def __init__(self, error: BaseException, secrets: frozenset[str]) -> None:
        self._text = describe_error(error, secrets)

    def __repr__(self) -> str:
        return self._text

    def __str__(self) -> str:
        return self._text


_hook_faults = FaultLog(logging.getLogger("declcache.stats"))
