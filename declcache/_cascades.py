"""What the database rewrites on the ORM's behalf when a row is deleted or updated.

A foreign key with ``ON DELETE``/``ON UPDATE`` ``CASCADE``, ``SET NULL`` or ``SET DEFAULT``
makes the database delete or rewrite rows the unit of work never sees, so no mapper event
records them. They are recorded with the row that caused them: nothing when the unit of work
wrote the children itself, the children's keys when the session holds their collection, else
the dependent models whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect
from sqlalchemy.orm import attributes
from sqlalchemy.orm.base import PassiveFlag

from declcache._frames import record_keys, record_model
from declcache._inheritance import cached_lineage
from declcache._registry import cascading_tables, models_of_table

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from sqlalchemy import ForeignKeyConstraint, Table
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Mapper, RelationshipProperty, Session
    from sqlalchemy.sql.selectable import TableClause

    from declcache._manager import CacheManager

__all__ = ["record_cascades"]


def record_cascades(
    session: Session,
    manager: CacheManager | None,
    mapper: Mapper[Any],
    target: object,
    connection: Connection,
    *,
    on: str,
) -> None:
    """Record the rows the database deletes or rewrites because of this row's delete/update.

    For each foreign key with a rewriting ``ON DELETE``/``ON UPDATE`` action pointing at the
    row's tables: nothing when the unit of work wrote the children itself (their own events
    recorded them), the children's keys when the session holds their collection, else every
    cached model of the dependent table whole — and, since a cascade can cascade again,
    the tables depending on that one.
    """
    state = inspect(target)
    whole: set[TableClause] = set()
    for table in mapper.tables:
        for dependent, constraint in cascading_tables(table, on=on):
            if on == "update" and not _referenced_changed(mapper, target, constraint):
                continue
            children = _children_known(mapper, state, dependent, on)
            if children is None:
                whole.add(dependent)
            for child in children or ():
                child_mapper = inspect(child).mapper
                for cached in cached_lineage(manager, child_mapper):
                    record_keys(session, manager, cached, child, connection)
    seen: set[TableClause] = set()
    while whole:
        reached = whole.pop()
        seen.add(reached)
        for model in models_of_table(reached):
            for cached in cached_lineage(manager, inspect(model)):
                change = record_model(session, manager, cached.class_, connection=connection)
                change.whole_model = True
        for action in ("delete", "update"):
            whole.update(t for t, _ in cascading_tables(reached, on=action) if t not in seen)


def _referenced_changed(
    mapper: Mapper[Any], target: object, constraint: ForeignKeyConstraint
) -> bool:
    """Whether this update changed a column the foreign key refers to."""
    for element in constraint.elements:
        try:
            key = mapper.get_property_by_column(element.column).key
        except Exception:  # not mapped here: it may have changed
            return True
        history = attributes.get_history(target, key, passive=PassiveFlag.PASSIVE_NO_INITIALIZE)
        if history.added or history.deleted:
            return True
    return False


def _children_known(
    mapper: Mapper[Any], state: Any, dependent: Table, on: str
) -> Sequence[object] | None:
    """The children the database rewrites, when the session knows all of them; else ``None``.

    An empty list: the unit of work wrote them itself. It does so for a loaded collection
    unless ``passive_deletes="all"`` (delete) and when ``passive_updates=False`` (update);
    with ``passive_updates=True`` it only changes the loaded children in memory, so their
    keys are recorded here.
    """
    for relationship in _relationships_to(mapper, dependent):
        if on == "update" and not relationship.passive_updates:
            return []
        if relationship.key not in state.dict:  # not loaded: the children are unknown
            continue
        if on == "delete":
            if relationship.passive_deletes == "all":
                continue
            return []
        loaded = state.dict[relationship.key]
        return list(loaded) if relationship.uselist else [loaded] if loaded is not None else []
    return None


def _relationships_to(mapper: Mapper[Any], dependent: Table) -> Iterable[RelationshipProperty[Any]]:
    """One-to-many relationships of ``mapper`` whose children live in ``dependent``."""
    for relationship in mapper.relationships:
        if relationship.direction.name == "ONETOMANY" and dependent in relationship.mapper.tables:
            yield relationship
