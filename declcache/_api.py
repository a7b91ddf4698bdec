"""Shared contracts: sentinels and type aliases. No I/O and no imports from the package."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, TypeAlias

__all__ = ["Ident", "Lookup"]


class Lookup(enum.Enum):
    """What a cache lookup found when it found no entity."""

    MISS = "miss"
    """Nothing usable is cached: ask the database."""

    NOT_FOUND = "not_found"
    """The database was asked before and had no such row (``cache_not_found = True``)."""


#: How a caller names one entity: a primary-key value, a tuple of them for a composite
#: primary key, or a mapping ``{field: value}`` of the primary key or of a ``key_fields`` set.
Ident: TypeAlias = Any | tuple[Any, ...] | Mapping[str, Any]
