"""Per-model counters and fault logging that cannot flood the log."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging

__all__ = ["Counters", "FaultLog", "ModelStats"]


@dataclass
class ModelStats:
    """What one model's cache did since the manager started.

    Attributes:
        hits: lookups answered from the cache (a cached "not found" included).
        misses: lookups the database had to answer.
        fills: entries written after a database read.
        invalidations: entries dropped because the data changed (or on request).
        errors: backend faults and undecodable payloads; each degraded to the database.
        fills_refused: fills dropped because the entry was invalidated while the database
            was being read (the no-stale-fill guard at work).
        invalidations_queued: invalidations kept for replay while the backend was down.
        invalidations_overflowed: times the replay queue was full and the whole model was
            marked for invalidation instead.
    """

    hits: int = 0
    misses: int = 0
    fills: int = 0
    invalidations: int = 0
    errors: int = 0
    fills_refused: int = 0
    invalidations_queued: int = 0
    invalidations_overflowed: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict, for JSON and tables."""
        return {item.name: getattr(self, item.name) for item in fields(self)}


class Counters:
    """Thread-safe increments of :class:`ModelStats`, one instance per model."""

    __slots__ = ("_lock", "_stats")

    def __init__(self) -> None:
        self._stats = ModelStats()
        self._lock = threading.Lock()

    def add(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to the counter ``name``."""
        with self._lock:
            setattr(self._stats, name, getattr(self._stats, name) + amount)

    def snapshot(self) -> ModelStats:
        """A copy of the counters, safe to keep."""
        with self._lock:
            return ModelStats(**self._stats.as_dict())


class FaultLog:
    """Log each kind of fault at most once per ``interval`` seconds, with how many were hidden."""

    def __init__(self, logger: logging.Logger, interval: float = 30.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str, *args: object) -> None:
        """Log ``message`` unless ``kind`` was logged less than ``interval`` seconds ago."""
        now = time.monotonic()
        with self._lock:
            last, hidden = self._last.get(kind, (float("-inf"), 0))
            if now - last < self._interval:
                self._last[kind] = (last, hidden + 1)
                return
            self._last[kind] = (now, 0)
        suffix = f" ({hidden} similar faults not logged)" if hidden else ""
        self._logger.warning(message + suffix, *args)
