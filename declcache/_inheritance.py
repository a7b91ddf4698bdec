"""Which cached classes a written row belongs to, through mapper inheritance.

A row of a subclass is also a row of each class it inherits from, so a write invalidates it in
every one of them that is cached (its *lineage*). A single-table-inheritance discriminator
change moves the row to another class of its hierarchy; then, and for a statement that may do
so, every cached class of the hierarchy (its *family*) is touched.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import attributes
from sqlalchemy.orm.base import PassiveFlag

from declcache._registry import declared_meta
from declcache.exceptions import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper

    from declcache._manager import CacheManager

__all__ = ["cached_family", "cached_lineage", "discriminator_changed"]

logger = logging.getLogger("declcache.listeners")


def _is_cached(manager: CacheManager | None, mapper: Mapper[Any]) -> bool:
    """Whether ``manager`` caches ``mapper``'s class; a cache it cannot build caches nothing.

    Without a manager: whether the class declares a CacheMeta, which a manager attached
    before the commit may cache. Configurations are checked before any flush
    (``_registry.watch``); one that slipped through is logged here, and the other models of
    the row are still recorded.
    """
    try:
        if manager is None:
            return declared_meta(mapper.class_) is not None
        return manager.is_cached(mapper.class_)
    except ConfigurationError:
        logger.exception("%s is not cached: its configuration is invalid", mapper.class_.__name__)
        return False


def cached_lineage(manager: CacheManager | None, mapper: Mapper[Any]) -> list[Mapper[Any]]:
    """The mapper and its inherited mappers that this manager caches (a row is all of them)."""
    return [m for m in mapper.iterate_to_root() if _is_cached(manager, m)]


def cached_family(manager: CacheManager | None, mapper: Mapper[Any]) -> list[Mapper[Any]]:
    """Every cached mapper of ``mapper``'s inheritance hierarchy, from its root down.

    A statement on a subclass can move a row to a sibling (a single-table discriminator
    ``UPDATE``), so the whole hierarchy is touched, not only bases and subclasses.
    """
    return [m for m in mapper.base_mapper.self_and_descendants if _is_cached(manager, m)]


def discriminator_changed(mapper: Mapper[Any], target: object) -> bool:
    """Whether this flush changed the row's polymorphic discriminator (it moves class)."""
    column = mapper.polymorphic_on
    if column is None:
        return False
    try:
        key = mapper.get_property_by_column(column).key
    except Exception:  # an expression, not a mapped column: it may have changed
        return True
    history = attributes.get_history(target, key, passive=PassiveFlag.PASSIVE_NO_INITIALIZE)
    return bool(history.added or history.deleted)
