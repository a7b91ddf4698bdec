"""What ``update()`` writes for an instance the session does not hold: only what changed.

``Session.merge`` copies every loaded attribute of a detached instance onto the session's
instance of its row. For an instance read a while ago (a detached cache hit, one expunged or
loaded in another session), that writes its old values back over whatever other transactions
committed since: a lost update. An instance with an identity is therefore applied as a
*change* instead: the attributes it changed since it was loaded (its attribute history) are
set on the row as the session has it now (``session.get``), so the flush writes those columns
only. A changed relationship is set to the session's instances of its members: a member with
an identity names its row and nothing of it is copied; a new one is merged. The version it
was loaded with (``version_id_col``) must still be the row's, as ``Session.merge`` checks;
else :class:`~sqlalchemy.orm.exc.StaleDataError`.

Plain sync code over a ``Session``: the async repository runs it with ``AsyncSession.run_sync``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import inspect
from sqlalchemy.orm.exc import StaleDataError

if TYPE_CHECKING:
    from sqlalchemy.orm import InstanceState, Mapper, Session

__all__ = ["updated"]

T = TypeVar("T")


def updated(session: Session, data: T) -> T:
    """The instance of ``session`` that writes ``data``'s changes when flushed.

    ``data`` itself when the session holds it (persistent or pending); the session's instance
    of ``data``'s row with ``data``'s changes applied when ``data`` has an identity (detached,
    or another session's); ``session.merge(data)`` for a transient instance.

    Raises:
        StaleDataError: the row no longer exists, or its version is not the one ``data``
            was loaded with.
    """
    state: InstanceState[T] = inspect(data)
    if state.session is session:
        return data
    if state.key is None:
        return session.merge(data)
    return _applied(session, state)


def _applied(session: Session, state: InstanceState[T]) -> T:
    mapper = state.mapper
    row: T = _row(session, state)
    _check_version(mapper, state, row)
    attrs = state.attrs
    for column in mapper.column_attrs:
        history = attrs[column.key].history
        if history.has_changes():
            setattr(row, column.key, history.added[0] if history.added else None)
    for relationship in mapper.relationships:
        if not relationship.viewonly and attrs[relationship.key].history.has_changes():
            value: Any = state.dict.get(relationship.key)
            if relationship.uselist:
                value = [_member(session, item) for item in value]
            elif value is not None:
                value = _member(session, value)
            setattr(row, relationship.key, value)
    return row


def _row(session: Session, state: InstanceState[Any]) -> Any:
    """The session's instance of the row ``state`` was loaded from."""
    mapper = state.mapper
    row = session.get(mapper.class_, state.identity, identity_token=state.identity_token)
    if row is None:
        raise StaleDataError(
            f"{mapper.class_.__name__} {state.identity} was deleted: its changes cannot be written"
        )
    return row


def _member(session: Session, item: object) -> Any:
    """The session's instance of a relationship member: its row's, or a new one merged.

    A member with an identity only names its row; nothing of it is copied (its own changes
    are its own ``update``'s), so no stale value of it is written back.
    """
    state: InstanceState[Any] = inspect(item)
    if state.session is session:
        return item
    if state.key is None:
        return session.merge(item)
    return _row(session, state)


def _check_version(mapper: Mapper[Any], state: InstanceState[Any], row: object) -> None:
    """Refuse changes made to a version of the row that is no longer the current one."""
    column = mapper.version_id_col
    if column is None:
        return
    key = mapper.get_property_by_column(column).key
    history = state.attrs[key].history
    loaded = history.deleted or history.unchanged  # the version as loaded, if it was
    current = getattr(row, key)
    if loaded and loaded[0] != current:
        raise StaleDataError(
            f"version {loaded[0]!r} of {mapper.class_.__name__} {state.identity} is not the "
            f"current one ({current!r}): the row changed since this instance was loaded"
        )
