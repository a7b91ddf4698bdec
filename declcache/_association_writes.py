"""The writes of an association table, as the invalidation of cached collections needs them.

A cached many-to-many collection (:mod:`declcache._associations`) lives under its member
model's list version. A row of its association table changes without a member row changing,
so the paths that bump list versions for member rows never see it: the unit of work's flush
of a collection is seen here through the collection's history, a Core statement on the table
through :func:`association_models`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import PassiveFlag
from sqlalchemy.orm.attributes import get_history

from declcache._frames import record_model
from declcache._inheritance import cached_lineage
from declcache._registry import mapped_relationships

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Mapper, Session

    from declcache._manager import CacheManager

__all__ = ["association_models", "record_association_writes"]


def record_association_writes(
    session: Session,
    manager: CacheManager | None,
    mapper: Mapper[Any],
    target: object,
    connection: Connection,
) -> None:
    """Record a list change of the other model of every many-to-many this row's flush wrote.

    The parent's own model is recorded with its row; its collection's members, whose model
    holds the cached collection of the parent, are not: an association row changed.
    """
    for prop in mapper.relationships:
        if prop.secondary is None:
            continue
        history = get_history(target, prop.key, passive=PassiveFlag.PASSIVE_NO_INITIALIZE)
        if history.added or history.deleted:
            for cached in cached_lineage(manager, prop.mapper):
                record_model(session, manager, cached.class_, connection=connection)


def association_models(table: object) -> list[type]:
    """Both models of every many-to-many relationship over ``table``, an association table."""
    found: dict[type, None] = {}
    for prop in mapped_relationships():
        if prop.secondary is table:
            found[prop.parent.class_] = None
            found[prop.mapper.class_] = None
    return list(found)
