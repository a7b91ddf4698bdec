"""Relationships served from the cache: ``CacheMeta.cached_relationships``.

A cached collection (one-to-many, many-to-many) is stored as the primary keys of its
members, in the member model's *list* namespace and under its list version; the members
themselves are read through the member model's entity cache. A cached many-to-one needs no
entry of its own: the foreign key is in the parent's row, the target is one entity read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Table
from sqlalchemy.orm import RelationshipDirection

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper

__all__ = ["relationship_problem"]

#: Loader strategies whose attribute is not a loaded collection or reference.
_UNSERVABLE_LAZY = frozenset({"dynamic", "write_only"})


def relationship_problem(mapper: Mapper[Any], name: str) -> str | None:
    """Why ``name`` cannot be a cached relationship of ``mapper``'s model; ``None`` if it can."""
    prop = mapper.relationships.get(name)
    model = mapper.class_.__name__
    if prop is None:
        known = sorted(mapper.relationships.keys())
        return f"{name!r} is not a relationship of {model} (relationships: {known})"
    if prop.lazy in _UNSERVABLE_LAZY:
        return f"{name!r} is lazy={prop.lazy!r}: it loads no collection the cache could hold"
    if prop.direction is RelationshipDirection.MANYTOMANY and not isinstance(prop.secondary, Table):
        return f"{name!r} is many-to-many over {prop.secondary!r}, not over a plain Table"
    if prop.direction is RelationshipDirection.MANYTOONE:
        target = prop.mapper
        if set(prop.remote_side) != set(target.primary_key) or prop.secondary is not None:
            return (
                f"{name!r} is many-to-one to something other than "
                f"{target.class_.__name__}'s primary key"
            )
    return None
