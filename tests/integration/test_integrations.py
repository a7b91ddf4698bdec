"""The Litestar plugin and the FastAPI helpers, through each framework's real test client.

One app per framework, the same checks on every backend (``cache_config``): a second read is
served from the cache, a committed write is invalidated before its response arrives, a handler
that raises rolls back (and invalidates nothing), ``NotFoundError`` is a 404, and shutdown
disposes the config.
"""

from pathlib import Path
from typing import Annotated, Any, Protocol

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from declcache import CacheConfig, CacheManager
from declcache.config import SQLAlchemyAsyncConfig
from declcache.repository import SQLAlchemyAsyncRepository


class Base(DeclarativeBase): ...


class Widget(Base):
    __tablename__ = "integration_widgets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]

    class CacheMeta:
        ttl = 300


class WidgetRepository(SQLAlchemyAsyncRepository[Widget]):
    model_type = Widget


class Client(Protocol):
    def get(self, url: str) -> Any: ...
    def patch(self, url: str, *, json: Any) -> Any: ...


@pytest.fixture
def db(tmp_path: Path, cache_config: CacheConfig) -> SQLAlchemyAsyncConfig:
    return SQLAlchemyAsyncConfig(
        connection_string=f"sqlite+aiosqlite:///{tmp_path / 'widgets.db'}",
        cache_config=cache_config,
    )


class QueryLog:
    def __init__(self, db: SQLAlchemyAsyncConfig) -> None:
        self.statements: list[str] = []
        event.listen(db.engine.sync_engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.statements.append(statement)

    def selects(self) -> int:
        return sum(statement.lstrip().upper().startswith("SELECT") for statement in self.statements)


async def _seed(db: SQLAlchemyAsyncConfig) -> None:
    await db.create_all(Base.metadata)
    async with db.get_session() as session:
        session.add_all([Widget(id=1, name="one"), Widget(id=2, name="two")])
        await session.commit()


def _rename(widget: Widget, data: dict[str, str]) -> Widget:
    widget.name = data["name"]
    if data.get("fail"):
        raise RuntimeError("the handler failed after writing")
    return widget


def check_app(client: Client, db: SQLAlchemyAsyncConfig) -> None:
    """The checks both frameworks pass."""
    log = QueryLog(db)
    assert client.get("/widgets/1").json() == {"id": 1, "name": "one"}
    before = log.selects()
    assert client.get("/widgets/1").json() == {"id": 1, "name": "one"}
    assert log.selects() == before, "the second read should come from the cache"

    response = client.patch("/widgets/1", json={"name": "uno"})
    assert response.status_code == 200, response.text
    assert client.get("/widgets/1").json() == {"id": 1, "name": "uno"}

    failed = client.patch("/widgets/2", json={"name": "zwei", "fail": "yes"})
    assert failed.status_code == 500
    assert db.engine.sync_engine.pool.checkedout() == 0  # rolled back and closed already
    assert client.get("/widgets/2").json() == {"id": 2, "name": "two"}
    assert client.get("/widgets/2?use_cache=false").json() == {"id": 2, "name": "two"}

    missing = client.get("/widgets/99")
    assert missing.status_code == 404
    assert "99" in missing.text

    assert client.get("/manager").json() == {"same": True}


@pytest.fixture
def disposed(db: SQLAlchemyAsyncConfig, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    calls: list[bool] = []
    dispose = db.dispose

    async def recording_dispose() -> None:
        calls.append(True)
        await dispose()

    monkeypatch.setattr(db, "dispose", recording_dispose)
    return calls


def test_litestar_plugin(db: SQLAlchemyAsyncConfig, disposed: list[bool]) -> None:
    from litestar import Litestar, get, patch
    from litestar.testing import TestClient

    from declcache.integrations.litestar import DeclCachePlugin

    @get("/widgets/{widget_id:int}")
    async def read(db_session: AsyncSession, widget_id: int, use_cache: bool = True) -> Any:
        widget = await WidgetRepository(session=db_session).get(widget_id, use_cache=use_cache)
        return {"id": widget.id, "name": widget.name}

    @patch("/widgets/{widget_id:int}")
    async def write(db_session: AsyncSession, widget_id: int, data: dict[str, str]) -> Any:
        repository = WidgetRepository(session=db_session)
        widget = await repository.update(_rename(await repository.get(widget_id), data))
        return {"id": widget.id, "name": widget.name}

    @get("/manager")
    async def manager(cache_manager: CacheManager | None) -> dict[str, bool]:
        return {"same": cache_manager is db.cache_manager}

    async def seed() -> None:
        await _seed(db)

    app = Litestar(
        route_handlers=[read, write, manager],
        plugins=[DeclCachePlugin(config=db)],
        on_startup=[seed],
    )
    with TestClient(app) as client:
        check_app(client, db)
        assert disposed == []
    assert disposed == [True]


def test_fastapi_dependency_and_lifespan(db: SQLAlchemyAsyncConfig, disposed: list[bool]) -> None:
    import contextlib

    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    from declcache.integrations.fastapi import DeclCache

    cache = DeclCache(db)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        await _seed(db)
        async with cache.lifespan(app):
            yield

    app = FastAPI(lifespan=lifespan)
    cache.install(app)
    DbSession = Annotated[AsyncSession, cache.session]

    @app.get("/widgets/{widget_id}")
    async def read(session: DbSession, widget_id: int, use_cache: bool = True) -> Any:
        widget = await WidgetRepository(session=session).get(widget_id, use_cache=use_cache)
        return {"id": widget.id, "name": widget.name}

    @app.patch("/widgets/{widget_id}")
    async def write(session: DbSession, widget_id: int, data: dict[str, str]) -> Any:
        repository = WidgetRepository(session=session)
        widget = await repository.update(_rename(await repository.get(widget_id), data))
        return {"id": widget.id, "name": widget.name}

    @app.get("/manager")
    async def manager(
        cache_manager: Annotated[CacheManager | None, Depends(cache.provide_manager)],
    ) -> dict[str, bool]:
        return {"same": cache_manager is db.cache_manager}

    with TestClient(app, raise_server_exceptions=False) as client:
        check_app(client, db)
        assert disposed == []
    assert disposed == [True]
