"""The per-request session both framework integrations share."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy.ext.asyncio import AsyncSession

    from declcache.config import SQLAlchemyAsyncConfig

__all__ = ["NOT_FOUND_STATUS", "request_session"]

#: The HTTP status a :class:`~declcache.exceptions.NotFoundError` becomes.
NOT_FOUND_STATUS = 404


@contextlib.asynccontextmanager
async def request_session(config: SQLAlchemyAsyncConfig) -> AsyncIterator[AsyncSession]:
    """One request's session: commit if the block ends normally, roll back if it raises."""
    async with config.get_session() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        if session.in_transaction():
            await session.commit()
