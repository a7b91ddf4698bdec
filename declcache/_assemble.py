"""Cached rows made into instances: assembled into a session as if it had loaded them.

Hibernate assembles a second-level-cache entry into the persistence context instead of
handing out a copy, so an entity found in the cache is managed exactly like one a query
returned. declcache does the same with SQLAlchemy: a cached row given a session becomes the
instance the ORM's loader would have made of that row,

* a member of the session's identity map; when the session already holds the identity, that
  instance is returned, its unloaded (expired) attributes refilled from the row as a query
  refills them;
* holding the cached values as its committed state: nothing counts as changed, a flush writes
  only the columns changed afterwards, and the ``version_id_col`` check of that flush is
  against the cached version;
* announced by the ``load`` instance event (no query context), so ``@reconstructor`` runs,
  ``sqlalchemy.ext.mutable`` wraps mutable values and :mod:`declcache._freshness` stamps it;
* loading on access what the row does not hold, as any loaded instance does: relationships and
  deferred columns through their loaders, and every other column attribute the cache cannot
  keep with the row (a ``column_property`` reading another table) because it is expired.

Without a session, a row becomes a detached instance with its identity key (the same
expired attributes), as if loaded and expunged: it loads them once added to a session.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm.attributes import instance_state

from declcache._private_apis import load_as_persistent, refresh_as_loaded

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.orm import Mapper, Session

    from declcache._codec import ModelCodec, Row

__all__ = ["Assembler"]


class Assembler:
    """Makes one model's cached rows into instances, detached or persistent in a session.

    Args:
        mapper: the model's mapper.
        codec: the model's codec, which builds a detached instance of a row and says which
            attributes a row holds.
    """

    __slots__ = ("_build", "_expired")

    def __init__(self, mapper: Mapper[Any], codec: ModelCodec) -> None:
        self._build = codec.build
        cached = frozenset(codec.keys)
        #: Loaded by a query, absent from a cached row: expired, so access loads them.
        self._expired = frozenset(
            prop.key for prop in mapper.column_attrs if not prop.deferred and prop.key not in cached
        )

    def instances(self, rows: Sequence[Row], session: Session | None) -> list[Any]:
        """An instance per row, in order: persistent in ``session``, or detached without one."""
        if session is None:
            return [self._detached(row) for row in rows]
        identity_map = session.identity_map
        entering: dict[Any, Any] = {}  # identity key -> new instance (a key may come twice)
        instances = []
        for row in rows:
            key = row.identity_key
            instance: Any = entering.get(key)
            if instance is None:
                instance = identity_map.get(key)
                if instance is None:
                    instance = entering[key] = self._detached(row)
                else:
                    _refill(instance, row)
            instances.append(instance)
        if entering:
            load_as_persistent(session, [instance_state(item) for item in entering.values()])
        return instances

    def _detached(self, row: Row) -> Any:
        instance = self._build(row)
        if self._expired:
            instance_state(instance).expired_attributes.update(self._expired)
        return instance


def _refill(instance: object, row: Row) -> None:
    """Fill in what ``row`` holds of ``instance``'s unloaded attributes, as a query would.

    An instance the session holds keeps every value it has, changed or not; only attributes
    expired (after a commit, ``session.expire``) or never loaded are taken from the row.
    """
    state = instance_state(instance)
    unloaded = state.unloaded
    keys = [key for key in row.values if key in unloaded]
    if not keys:
        return
    loaded = state.dict
    for key in keys:
        value = row.values[key]
        loaded[key] = copy.deepcopy(value) if key in row.mutable else value
    refresh_as_loaded(state, keys)
