"""Which mapped classes are cached: CacheMeta read when SQLAlchemy configures each mapper.

Reading happens in the ``mapper_configured`` event, so a bad CacheMeta fails
``configure_mappers()`` (or the first query) with a :class:`~declcache.exceptions.CacheMetaError`
instead of surfacing at the first cache access. A class whose mapper was configured before
declcache was imported is read on first use instead.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.orm import Mapper, configure_mappers

from declcache._meta import DeclaredMeta, read_cache_meta

__all__ = ["cached_models", "declared_meta"]

_NOT_CACHED = DeclaredMeta({}, {})  # marker: the class was read and has no CacheMeta
_declared: weakref.WeakKeyDictionary[type, DeclaredMeta] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@event.listens_for(Mapper, "mapper_configured")
def _read_on_configure(mapper: Mapper[Any], _class: type) -> None:
    _remember(mapper)


def _remember(mapper: Mapper[Any]) -> DeclaredMeta:
    declared = read_cache_meta(mapper) or _NOT_CACHED
    with _lock:
        _declared[mapper.class_] = declared
    return declared


def declared_meta(model: type) -> DeclaredMeta | None:
    """The validated CacheMeta of ``model``, or ``None`` when the model is not cached.

    Configures mappers first if they are not yet, as a query would.

    Raises:
        CacheMetaError: the model's CacheMeta is invalid.
        sqlalchemy.exc.NoInspectionAvailable: ``model`` is not mapped.
    """
    declared = _declared.get(model)
    if declared is None:
        mapper: Mapper[Any] = inspect(model)
        if not mapper.configured:
            configure_mappers()
        declared = _declared.get(model) or _remember(mapper)
    return None if declared is _NOT_CACHED else declared


def cached_models() -> list[type]:
    """Every configured mapped class that declares a CacheMeta, sorted by name."""
    with _lock:
        models = [cls for cls, declared in _declared.items() if declared is not _NOT_CACHED]
    mapped = [cls for cls in models if inspect(cls, raiseerr=False) is not None]  # not disposed
    return sorted(mapped, key=lambda cls: (cls.__module__, cls.__qualname__))
