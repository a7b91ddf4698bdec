"""FastAPI: a session dependency carrying the cache manager, and a lifespan helper.

::

    from typing import Annotated
    from fastapi import Depends, FastAPI
    from declcache.integrations.fastapi import DeclCache

    cache = DeclCache(db)  # db: an SQLAlchemyAsyncConfig with a cache_config
    app = FastAPI(lifespan=cache.lifespan)
    cache.install(app)  # NotFoundError -> 404
    DbSession = Annotated[AsyncSession, cache.session]

    @app.get("/users/{user_id}")
    async def get_user(session: DbSession, user_id: int) -> dict[str, Any]:
        user = await UserRepository(session=session).get(user_id)  # read through the cache
        ...

The session is committed when the endpoint returns and rolled back when it raises, before the
response is sent (``Depends(..., scope="function")``), so the commit's invalidations are done
when the client reads the response. The lifespan disposes the engine and closes the cache
manager's connections on shutdown.

Needs ``pip install 'declcache[fastapi]'``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from declcache.exceptions import NotFoundError
from declcache.integrations._session import NOT_FOUND_STATUS, request_session

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy.ext.asyncio import AsyncSession

    from declcache._manager import CacheManager
    from declcache.config import SQLAlchemyAsyncConfig

__all__ = ["DeclCache"]


async def _not_found(_request: Request, error: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(error) or "not found"}, status_code=NOT_FOUND_STATUS)


class DeclCache:
    """A per-request session dependency and a lifespan for one ``SQLAlchemyAsyncConfig``.

    Args:
        config: the async database config; its cache manager rides in every session.

    Attributes:
        session: ``Depends`` marker of the request's session: ``Annotated[AsyncSession,
            cache.session]``.
        manager: ``Depends`` marker of the cache manager (``None`` when caching is off).
    """

    def __init__(self, config: SQLAlchemyAsyncConfig) -> None:
        self.config = config
        self.session: Any = Depends(self.provide_session, scope="function")
        self.manager: Any = Depends(self.provide_manager)

    async def provide_session(self) -> AsyncIterator[AsyncSession]:
        """The request's session: committed if the endpoint returns, rolled back if it raises."""
        async with request_session(self.config) as session:
            yield session

    def provide_manager(self) -> CacheManager | None:
        """The config's cache manager."""
        return self.config.cache_manager

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        """``FastAPI(lifespan=cache.lifespan)``: dispose the engine and the cache on shutdown."""
        try:
            yield
        finally:
            await self.config.dispose()

    def install(self, app: FastAPI) -> None:
        """Answer :class:`~declcache.exceptions.NotFoundError` with a 404 in ``app``."""
        app.add_exception_handler(NotFoundError, _not_found)
