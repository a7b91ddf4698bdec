"""A Litestar plugin: a per-request session carrying the cache manager.

::

    from litestar import Litestar
    from declcache.integrations.litestar import DeclCachePlugin

    app = Litestar(route_handlers=[...], plugins=[DeclCachePlugin(config=db)])

    @get("/users/{user_id:int}")
    async def get_user(db_session: AsyncSession, user_id: int) -> dict[str, Any]:
        user = await UserRepository(session=db_session).get(user_id)  # read through the cache
        ...

Handlers ask for ``db_session`` (an :class:`~sqlalchemy.ext.asyncio.AsyncSession` whose
``info`` carries the manager) and ``cache_manager``. The session is committed when the handler
returns and rolled back when it raises, before the response is sent, so the commit's
invalidations are done when the client reads the response. A
:class:`~declcache.exceptions.NotFoundError` becomes a 404. On shutdown the engine is disposed
and the cache manager's connections are closed.

Needs ``pip install 'declcache[litestar]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar import MediaType, Response
from litestar.di import Provide
from litestar.plugins import InitPluginProtocol
from sqlalchemy.ext.asyncio import AsyncSession

from declcache._manager import CacheManager
from declcache.config import SQLAlchemyAsyncConfig
from declcache.exceptions import NotFoundError
from declcache.integrations._session import NOT_FOUND_STATUS, request_session

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from litestar import Request
    from litestar.config.app import AppConfig

__all__ = ["DeclCachePlugin"]


def _not_found(_request: Request[Any, Any, Any], error: NotFoundError) -> Response[Any]:
    return Response(
        {"status_code": NOT_FOUND_STATUS, "detail": str(error) or "not found"},
        status_code=NOT_FOUND_STATUS,
        media_type=MediaType.JSON,
    )


class DeclCachePlugin(InitPluginProtocol):
    """Provide ``db_session`` and ``cache_manager`` to handlers; dispose the engine on shutdown.

    Args:
        config: the async database config; its cache manager rides in every session.
        session_dependency_key: the handler parameter name of the session.
        manager_dependency_key: the handler parameter name of the cache manager.
        handle_not_found: answer :class:`~declcache.exceptions.NotFoundError` with a 404.
    """

    def __init__(
        self,
        config: SQLAlchemyAsyncConfig,
        *,
        session_dependency_key: str = "db_session",
        manager_dependency_key: str = "cache_manager",
        handle_not_found: bool = True,
    ) -> None:
        self.config = config
        self.session_dependency_key = session_dependency_key
        self.manager_dependency_key = manager_dependency_key
        self.handle_not_found = handle_not_found

    async def provide_session(self) -> AsyncIterator[AsyncSession]:
        """The request's session: committed if the handler returns, rolled back if it raises."""
        async with request_session(self.config) as session:
            yield session

    def provide_manager(self) -> CacheManager | None:
        """The config's cache manager (``None`` when caching is off)."""
        return self.config.cache_manager

    async def on_shutdown(self) -> None:
        """Dispose the engine and close the cache manager's connections."""
        await self.config.dispose()

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Register the dependencies, the shutdown hook and the 404 handler."""
        app_config.dependencies[self.session_dependency_key] = Provide(self.provide_session)
        app_config.dependencies[self.manager_dependency_key] = Provide(
            self.provide_manager, sync_to_thread=False
        )
        app_config.on_shutdown.append(self.on_shutdown)
        if self.handle_not_found:
            app_config.exception_handlers.setdefault(NotFoundError, _not_found)
        app_config.signature_namespace.update(
            {
                "AsyncSession": AsyncSession,
                "CacheManager": CacheManager,
                "SQLAlchemyAsyncConfig": SQLAlchemyAsyncConfig,
            }
        )
        return app_config
