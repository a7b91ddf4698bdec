"""SQLAlchemySyncConfig / SQLAlchemyAsyncConfig, and the manual set-up without them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

import declcache.config as config_module
from declcache import CacheConfig, CacheManager, SettingsError, setup_cache_listeners
from declcache._listeners import SESSION_MANAGER_KEY, _after_commit
from declcache.config import SQLAlchemyAsyncConfig, SQLAlchemySyncConfig
from tests.integration._repo_models import (
    AsyncAuthorRepo,
    Author,
    AuthorFactory,
    AuthorRepo,
    Base,
    reset_factories,
    selects,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.integration.conftest import StatementLog

AUTHORS = "repo_authors"


@pytest.fixture(params=["memory", "redis", "memcached"])
def cache_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(tmp_path: Path) -> str:
    reset_factories()
    return f"sqlite:///{tmp_path}/config.db"


def _seed(db: SQLAlchemySyncConfig) -> None:
    db.create_all(Base.metadata)
    with db.get_session() as session:
        session.add_all(AuthorFactory.build_batch(2))
        session.commit()


def test_sync_sessions_carry_the_manager_and_repositories_find_it(
    url: str, cache_config: CacheConfig, statements: Callable[..., StatementLog]
) -> None:
    db = SQLAlchemySyncConfig(connection_string=url, cache_config=cache_config)
    assert isinstance(db.cache_manager, CacheManager)
    assert db.cache_manager.config is cache_config
    assert db.caching
    _seed(db)
    sent = statements(db.engine)
    for expected in (1, 0):
        sent.clear()
        with db.get_session() as session:
            assert session.info[SESSION_MANAGER_KEY] is db.cache_manager
            repo = AuthorRepo(session=session)
            assert repo.cache_manager is db.cache_manager
            repo.get(1)
        assert selects(sent, AUTHORS) == expected
    db.dispose()


async def test_async_sessions_carry_the_manager_and_repositories_find_it(
    tmp_path: Path, cache_config: CacheConfig, statements: Callable[..., StatementLog]
) -> None:
    db = SQLAlchemyAsyncConfig(
        connection_string=f"sqlite+aiosqlite:///{tmp_path}/config.db", cache_config=cache_config
    )
    await db.create_all(Base.metadata)
    async with db.get_session() as session:
        session.add(AuthorFactory.build(id=1))
        await session.commit()
    sent = statements(db.engine.sync_engine)
    for expected in (1, 0):
        sent.clear()
        async with db.get_session() as session:
            assert session.info[SESSION_MANAGER_KEY] is db.cache_manager
            repo = AsyncAuthorRepo(session=session)
            assert repo.cache_manager is db.cache_manager
            await repo.get(1)
        assert selects(sent, AUTHORS) == expected
    await db.drop_all(Base.metadata)
    assert not await _has_table(db)
    await db.dispose()


async def _has_table(db: SQLAlchemyAsyncConfig) -> bool:
    async with db.engine.connect() as connection:
        names = await connection.run_sync(lambda c: sa.inspect(c).get_table_names())
    return AUTHORS in names


@pytest.mark.parametrize("cache_backend", ["memory"])
@pytest.mark.parametrize("cache", ["none", "disabled"])
def test_without_caching_every_read_queries(
    url: str, cache_config: CacheConfig, statements: Callable[..., StatementLog], cache: str
) -> None:
    db = SQLAlchemySyncConfig(
        connection_string=url,
        cache_config=None if cache == "none" else cache_config.with_overrides(enabled=False),
    )
    assert not db.caching
    _seed(db)
    sent = statements(db.engine)
    for _ in range(2):
        with db.get_session() as session:
            repo = AuthorRepo(session=session)
            assert (repo.cache_manager is None) == (cache == "none")
            repo.get(1)
            repo.list()
    assert selects(sent, AUTHORS) == 4
    db.dispose()


@pytest.mark.parametrize("cache_backend", ["memory"])
def test_a_shared_manager_and_conflicting_arguments(url: str, cache_config: CacheConfig) -> None:
    manager = CacheManager(cache_config)
    first = SQLAlchemySyncConfig(connection_string=url, cache_manager=manager)
    second = SQLAlchemySyncConfig(
        connection_string=url, cache_manager=manager, cache_config=cache_config
    )
    with first.get_session() as one, second.get_session() as two:
        assert one.info[SESSION_MANAGER_KEY] is two.info[SESSION_MANAGER_KEY] is manager
    with pytest.raises(SettingsError, match="cache_manager"):
        SQLAlchemySyncConfig(
            connection_string=url, cache_manager=manager, cache_config=CacheConfig()
        )


@pytest.mark.parametrize("cache_backend", ["memory"])
@pytest.mark.parametrize("enabled", [True, False])
def test_listeners_are_registered_when_caching_is_on(
    url: str, cache_config: CacheConfig, monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(config_module, "setup_cache_listeners", lambda: calls.append(1))
    SQLAlchemySyncConfig(
        connection_string=url, cache_config=cache_config, enable_cache_listener=enabled
    )
    SQLAlchemySyncConfig(connection_string=url)  # no caching: nothing to listen for
    assert calls == ([1] if enabled else [])
    monkeypatch.undo()
    SQLAlchemySyncConfig(connection_string=url, cache_config=cache_config)
    assert event.contains(Session, "after_commit", _after_commit)


@pytest.mark.parametrize("cache_backend", ["memory"])
def test_engine_and_session_options_pass_through(url: str, cache_config: CacheConfig) -> None:
    db = SQLAlchemySyncConfig(
        connection_string=url,
        cache_config=cache_config,
        engine_config={"pool_pre_ping": True},
        session_config={"info": {"tenant": "acme"}, "autoflush": False},
    )
    assert db.engine is db.engine
    assert db.engine.pool._pre_ping
    with db.get_session() as session:
        assert session.info == {"tenant": "acme", SESSION_MANAGER_KEY: db.cache_manager}
        assert not session.autoflush
        assert not session.expire_on_commit  # our default
    with SQLAlchemySyncConfig(
        connection_string=url, session_config={"expire_on_commit": True}
    ).get_session() as session:
        assert session.expire_on_commit
        assert SESSION_MANAGER_KEY not in session.info


@pytest.mark.parametrize("cache_backend", ["memory"])
def test_get_session_closes_and_rolls_back(url: str, cache_config: CacheConfig) -> None:
    db = SQLAlchemySyncConfig(connection_string=url, cache_config=cache_config)
    db.create_all(Base.metadata)
    with db.get_session() as session:
        session.add(AuthorFactory.build())
        session.flush()
    assert not session.in_transaction()
    with db.get_session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Author)) == 0
    db.drop_all(Base.metadata)
    assert AUTHORS not in sa.inspect(db.engine).get_table_names()
    db.dispose()


def test_manual_set_up_with_an_explicit_manager(
    url: str, cache_config: CacheConfig, statements: Callable[..., StatementLog]
) -> None:
    engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    manager = CacheManager(cache_config)
    setup_cache_listeners()
    sent = statements(engine)

    def repo(session: Session) -> AuthorRepo:
        return AuthorRepo(session=session, cache_manager=manager)

    with Session(engine) as session:
        repo(session).add(AuthorFactory.build(id=1), auto_commit=True)
        assert session.info[SESSION_MANAGER_KEY] is manager  # so the listeners find it
    with Session(engine, expire_on_commit=False) as session:
        cached = repo(session).get(1)
    sent.clear()
    with Session(engine) as session:
        assert repo(session).get(1).name == cached.name
    assert selects(sent, AUTHORS) == 0

    cached.name = "Renamed by hand"
    with Session(engine) as session:
        repo(session).update(cached, auto_commit=True)
    sent.clear()
    with Session(engine) as session:
        assert repo(session).get(1).name == "Renamed by hand"  # invalidated by the commit
    assert selects(sent, AUTHORS) == 1
    engine.dispose()
