"""Every ``DECLCACHE_MODELS`` override is resolved against its model when mappers configure.

Issue 13 part 3: an override that cannot work for its model (``key_fields`` naming a column
that is not unique) used to pass start-up and then fail the database write inside the flush.
Now it fails ``configure_mappers()`` — or the manager's creation, when the mappers were
configured first — naming the variable and the model, exactly where a bad CacheMeta fails;
a good override works; a misspelt model name is logged with a did-you-mean; and whatever
slips through never fails a flush. Real SQLite databases; rows from factory-boy.
"""

from __future__ import annotations

import gc
import json
import logging
from typing import TYPE_CHECKING, Any

import factory
import pytest
from sqlalchemy import Integer, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Session, configure_mappers, mapped_column

from declcache import CacheConfig, CacheManager, SettingsError, _registry, setup_cache_listeners
from declcache.repository import SQLAlchemySyncRepository

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine

    from tests.integration.conftest import StatementLog


@pytest.fixture(autouse=True)
def _forget_configs() -> Iterator[None]:
    """Collect the test's configurations, so that their overrides stop being checked.

    The registry holds watched configurations weakly; a cycle (a traceback) may keep one
    alive past its test, where its overrides would apply to the next test's models.
    """
    yield
    gc.collect()


@pytest.fixture
def base() -> Iterator[type[DeclarativeBase]]:
    """A fresh registry, disposed after the test: a failed configuration stays in it."""

    class Base(DeclarativeBase):
        pass

    yield Base
    Base.registry.dispose()


def make_account(base: type[DeclarativeBase]) -> type:
    """``OverrideAccount(id, email unique, team not unique)``, cached by id."""
    namespace: dict[str, Any] = {
        "__tablename__": "override_accounts",
        "id": mapped_column(Integer, primary_key=True, autoincrement=False),
        "email": mapped_column(String(100), unique=True),
        "team": mapped_column(String(100)),
        "CacheMeta": type("CacheMeta", (), {"ttl": 300}),
    }
    return type("OverrideAccount", (base,), namespace)


def account_factory(model: type) -> type[factory.Factory]:
    return factory.make_factory(
        model,
        id=factory.Sequence(lambda n: n + 1),
        email=factory.Sequence(lambda n: f"account{n + 1}@example.com"),
        team="core",
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'overrides.sqlite'}")
    yield engine
    engine.dispose()


def env_config(monkeypatch: pytest.MonkeyPatch, models: dict[str, Any]) -> CacheConfig:
    monkeypatch.setenv("DECLCACHE_MODELS", json.dumps(models))
    return CacheConfig.from_env(arguments={"cache_dict": {}})


def watched_manager(config: CacheConfig) -> CacheManager:
    """A manager whose configuration is checked against the models, as CacheManager does."""
    manager = CacheManager(config)
    _registry.watch(config)  # idempotent: harmless once CacheManager.__init__ calls it
    return manager


def test_a_bad_override_fails_configure_mappers_naming_variable_and_model(
    base: type[DeclarativeBase], monkeypatch: pytest.MonkeyPatch
) -> None:
    account = make_account(base)
    config = env_config(monkeypatch, {"override_accounts": {"key_fields": ["team"]}})
    watched_manager(config)  # before the mappers are configured: checked when they are

    with pytest.raises(SettingsError) as excinfo:
        configure_mappers()

    assert excinfo.value.setting == "DECLCACHE_MODELS[override_accounts].key_fields"
    assert "is not unique" in str(excinfo.value)
    assert "model OverrideAccount" in str(excinfo.value)
    assert account.__name__ == "OverrideAccount"


def test_a_bad_override_fails_the_manager_when_mappers_were_configured_first(
    base: type[DeclarativeBase], monkeypatch: pytest.MonkeyPatch
) -> None:
    account = make_account(base)
    configure_mappers()
    config = env_config(monkeypatch, {"OverrideAccount": {"key_fields": ["nope"]}})

    with pytest.raises(SettingsError) as excinfo:
        _registry.watch(config)

    assert excinfo.value.setting == "DECLCACHE_MODELS[OverrideAccount].key_fields"
    assert "'nope' is not a column of OverrideAccount" in str(excinfo.value)
    assert account.__name__ in str(excinfo.value)


def test_a_failed_configuration_is_reported_once(
    base: type[DeclarativeBase], make_other: Callable[[], type], monkeypatch: pytest.MonkeyPatch
) -> None:
    account = make_account(base)  # referenced: a registry holds its classes weakly
    watched_manager(env_config(monkeypatch, {"override_accounts": {"key_fields": ["team"]}}))
    with pytest.raises(SettingsError):
        configure_mappers()

    other = make_other()
    configure_mappers()  # a later model is not failed by the override that already failed
    assert other is not account


@pytest.fixture
def make_other() -> Iterator[Callable[[], type]]:
    class OtherBase(DeclarativeBase):
        pass

    def make() -> type:
        namespace: dict[str, Any] = {
            "__tablename__": "override_accounts",
            "id": mapped_column(Integer, primary_key=True),
            "team": mapped_column(String(100)),
            "CacheMeta": type("CacheMeta", (), {}),
        }
        return type("OverrideAccount", (OtherBase,), namespace)

    yield make
    OtherBase.registry.dispose()


def test_a_good_override_serves_lookups_by_its_key_from_the_cache(
    base: type[DeclarativeBase],
    monkeypatch: pytest.MonkeyPatch,
    db: Engine,
    statements: Callable[[Engine], StatementLog],
) -> None:
    account = make_account(base)
    manager = watched_manager(
        env_config(monkeypatch, {"override_accounts": {"key_fields": [["id"], ["email"]]}})
    )
    configure_mappers()
    base.metadata.create_all(db)
    repo_type = type("AccountRepo", (SQLAlchemySyncRepository,), {"model_type": account})
    with Session(db) as session:
        session.add_all(account_factory(account).build_batch(3))
        session.commit()
    with Session(db) as session:
        repo_type(session=session, cache_manager=manager).get_one_or_none(
            email="account2@example.com"
        )

    log = statements(db)
    with Session(db) as session:
        found = repo_type(session=session, cache_manager=manager).get_one_or_none(
            email="account2@example.com"
        )

    assert found is not None
    assert found.id == 2
    assert len(log) == 0
    assert manager.stats()["OverrideAccount"].hits == 1


def test_an_override_that_slipped_through_never_fails_a_flush(
    base: type[DeclarativeBase], monkeypatch: pytest.MonkeyPatch, db: Engine
) -> None:
    account = make_account(base)
    manager = watched_manager(
        env_config(monkeypatch, {"override_accounts": {"key_fields": ["team"]}})
    )
    with pytest.raises(SettingsError):
        configure_mappers()  # reported where it belongs; the application carries on anyway
    base.metadata.create_all(db)
    setup_cache_listeners()

    with Session(db, info={"cache_manager": manager}) as session:
        session.add(account_factory(account).build())
        session.commit()
        row = session.scalars(select(account)).one()
        row.email = "changed@example.com"
        session.commit()
        session.delete(row)
        session.commit()

    with Session(db) as session:
        assert session.scalars(select(account)).all() == []


def test_an_override_naming_no_model_is_logged_with_a_did_you_mean(
    base: type[DeclarativeBase], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    account = make_account(base)
    configure_mappers()
    config = env_config(monkeypatch, {"override_acounts": {"ttl": 5}})

    with caplog.at_level(logging.WARNING, logger="declcache.registry"):
        _registry.watch(config)
        _registry.watch(config)

    warnings = [record.getMessage() for record in caplog.records]
    assert account.__name__ == "OverrideAccount"
    assert warnings == [
        "DECLCACHE_MODELS[override_acounts] names no model configured so far, so it overrides "
        "nothing "
        "(did you mean 'override_accounts'?)"
    ]


def test_an_override_naming_a_model_configured_later_is_checked_then(
    base: type[DeclarativeBase], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = env_config(monkeypatch, {"override_accounts": {"key_fields": ["email"]}})
    watched_manager(config)
    account = make_account(base)

    configure_mappers()  # a unique column: fine

    spec = CacheManager(config).spec(account)
    assert spec is not None
    assert spec.key_fields == (("id",), ("email",))
    assert spec.sources["key_fields"] == "DECLCACHE_MODELS[override_accounts]"
