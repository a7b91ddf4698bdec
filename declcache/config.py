"""Engine, sessions and cache in one object: ``SQLAlchemySyncConfig``, ``SQLAlchemyAsyncConfig``.

::

    db = SQLAlchemyAsyncConfig(
        connection_string="sqlite+aiosqlite:///app.db",
        cache_config=CacheConfig(backend="dogpile.cache.memory"),
    )
    async with db.get_session() as session:   # session.info["cache_manager"] is the manager
        user = await UserRepository(session=session).get(1)

With caching on (a ``cache_config`` or a ``cache_manager``), the session listeners are
registered once for the process (:func:`~declcache.setup_cache_listeners`) unless
``enable_cache_listener=False`` — then invalidating the cache is up to you.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from declcache._listeners import SESSION_MANAGER_KEY, setup_cache_listeners
from declcache._manager import CacheManager
from declcache.exceptions import SettingsError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from sqlalchemy import Engine, MetaData

    from declcache.settings import CacheConfig

__all__ = ["SQLAlchemyAsyncConfig", "SQLAlchemySyncConfig"]

#: Session options unless ``session_config`` says otherwise: instances stay usable after a
#: commit instead of reloading every attribute (the default of advanced-alchemy too).
DEFAULT_SESSION_CONFIG: dict[str, Any] = {"expire_on_commit": False}


@dataclass
class _ConfigBase:
    """What both configs hold; see :class:`SQLAlchemySyncConfig` for the arguments."""

    connection_string: str
    cache_config: CacheConfig | None = None
    cache_manager: CacheManager | None = None
    enable_cache_listener: bool = True
    engine_config: dict[str, Any] = field(default_factory=dict)
    session_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cache_manager is not None and self.cache_config is not None:
            if self.cache_manager.config is not self.cache_config:
                raise SettingsError(
                    f"{type(self).__name__}.cache_manager",
                    "pass cache_config or cache_manager, not both",
                )
        elif self.cache_config is not None:
            self.cache_manager = CacheManager(self.cache_config)
        if self.caching and self.enable_cache_listener:
            setup_cache_listeners()

    @property
    def caching(self) -> bool:
        """Whether sessions of this config read through a cache."""
        return self.cache_manager is not None and self.cache_manager.enabled

    def _session_options(self) -> dict[str, Any]:
        options = {**DEFAULT_SESSION_CONFIG, **self.session_config}
        info = dict(options.pop("info", None) or {})
        if self.cache_manager is not None:
            info[SESSION_MANAGER_KEY] = self.cache_manager
        return {**options, "info": info}


@dataclass
class SQLAlchemySyncConfig(_ConfigBase):
    """A sync engine and its sessions, with the cache manager in every ``session.info``.

    Args:
        connection_string: the database URL, e.g. ``"postgresql+psycopg://…"``.
        cache_config: how to cache; ``None`` (and no ``cache_manager``): caching off.
        cache_manager: a manager to share instead of building one from ``cache_config``.
        enable_cache_listener: register the invalidation listeners (once per process).
        engine_config: keyword arguments of ``create_engine``.
        session_config: keyword arguments of ``sessionmaker`` (``expire_on_commit`` is
            ``False`` unless given).
    """

    @functools.cached_property
    def engine(self) -> Engine:
        """The engine, created on first use."""
        return create_engine(self.connection_string, **self.engine_config)

    @functools.cached_property
    def session_maker(self) -> sessionmaker[Session]:
        """The factory of this config's sessions."""
        return sessionmaker(bind=self.engine, **self._session_options())

    @contextlib.contextmanager
    def get_session(self) -> Iterator[Session]:
        """A new session, closed on exit (uncommitted work is rolled back)."""
        with self.session_maker() as session:
            yield session

    def create_all(self, metadata: MetaData) -> None:
        """Create the tables of ``metadata`` that do not exist yet."""
        metadata.create_all(self.engine)

    def drop_all(self, metadata: MetaData) -> None:
        """Drop the tables of ``metadata``."""
        metadata.drop_all(self.engine)

    def dispose(self) -> None:
        """Close the engine's pooled connections and the cache manager's (see ``close``)."""
        self.engine.dispose()
        if self.cache_manager is not None:
            self.cache_manager.close()


@dataclass
class SQLAlchemyAsyncConfig(_ConfigBase):
    """An async engine and its sessions, with the cache manager in every ``session.info``.

    Args:
        connection_string: the database URL, e.g. ``"sqlite+aiosqlite:///app.db"``.
        cache_config: how to cache; ``None`` (and no ``cache_manager``): caching off.
        cache_manager: a manager to share instead of building one from ``cache_config``.
        enable_cache_listener: register the invalidation listeners (once per process).
        engine_config: keyword arguments of ``create_async_engine``.
        session_config: keyword arguments of ``async_sessionmaker`` (``expire_on_commit``
            is ``False`` unless given).
    """

    @functools.cached_property
    def engine(self) -> AsyncEngine:
        """The engine, created on first use."""
        return create_async_engine(self.connection_string, **self.engine_config)

    @functools.cached_property
    def session_maker(self) -> async_sessionmaker[AsyncSession]:
        """The factory of this config's sessions."""
        return async_sessionmaker(bind=self.engine, **self._session_options())

    @contextlib.asynccontextmanager
    async def get_session(self) -> AsyncIterator[AsyncSession]:
        """A new session, closed on exit (uncommitted work is rolled back)."""
        async with self.session_maker() as session:
            yield session

    async def create_all(self, metadata: MetaData) -> None:
        """Create the tables of ``metadata`` that do not exist yet."""
        async with self.engine.begin() as connection:
            await connection.run_sync(metadata.create_all)

    async def drop_all(self, metadata: MetaData) -> None:
        """Drop the tables of ``metadata``."""
        async with self.engine.begin() as connection:
            await connection.run_sync(metadata.drop_all)

    async def dispose(self) -> None:
        """Close the engine's pooled connections and the cache manager's (see ``aclose``)."""
        await self.engine.dispose()
        if self.cache_manager is not None:
            await self.cache_manager.aclose()
