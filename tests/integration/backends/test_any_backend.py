"""What holds whatever the backend: an unknown backend or a missing client library is named at
first use, a disposed model registry does not break ``clear()``, and without dogpile.cache the
manager is a no-op that misses."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy.orm import DeclarativeBase, Mapped, configure_mappers, mapped_column

from declcache import CacheConfig, CacheManager, SettingsError
from tests.integration.backends._suite import Widget

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_unknown_backend_argument_fails_at_first_use_naming_the_argument(
    key_prefix: str,
) -> None:
    manager = CacheManager(CacheConfig(backend="dogpile.cache.nope", key_prefix=key_prefix))
    with pytest.raises(SettingsError, match=r"CacheConfig\.backend.*dogpile\.cache\.nope") as info:
        manager.get(Widget, 1)
    assert info.value.setting == "CacheConfig.backend"


def test_unknown_backend_variable_fails_at_first_use_naming_the_variable(
    key_prefix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DECLCACHE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("DECLCACHE_BACKEND", "dogpile.cache.nope")
    manager = CacheManager(CacheConfig.from_env(key_prefix=key_prefix))
    with pytest.raises(SettingsError, match=r"DECLCACHE_BACKEND.*dogpile\.cache\.nope") as info:
        manager.is_cached(Widget)
    assert info.value.setting == "DECLCACHE_BACKEND"


def _clear_after_a_registry_was_disposed(key_prefix: str) -> str | None:
    """``repr`` of what ``clear()`` raised with a disposed cached model around, or ``None``."""

    class Disposable(DeclarativeBase):
        pass

    class Gone(Disposable):
        __tablename__ = "gone"

        id: Mapped[int] = mapped_column(primary_key=True)

        class CacheMeta:
            ttl = 60

    configure_mappers()  # the registry reads Gone's CacheMeta
    Disposable.registry.dispose()
    manager = CacheManager(
        CacheConfig(
            backend="dogpile.cache.memory", arguments={"cache_dict": {}}, key_prefix=key_prefix
        )
    )
    try:
        manager.clear()
    except Exception as error:
        return repr(error)
    return None


def test_clear_ignores_models_whose_registry_was_disposed(key_prefix: str) -> None:
    failure = _clear_after_a_registry_was_disposed(key_prefix)
    gc.collect()  # drop Gone, so that no later test sees it registered
    assert failure is None, f"clear() raised {failure}"


def test_backend_without_its_client_library_names_the_backend(key_prefix: str) -> None:
    pytest.importorskip("dogpile.cache.backends.memcached")
    if _importable("bmemcached"):
        pytest.skip("python-binary-memcached is installed here")
    manager = CacheManager(
        CacheConfig(
            backend="dogpile.cache.bmemcached",
            arguments={"url": ["127.0.0.1:1"]},
            key_prefix=key_prefix,
        )
    )
    with pytest.raises(SettingsError, match=r"CacheConfig\.backend.*needs a client library"):
        manager.get(Widget, 1)


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


_NO_DOGPILE_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys

    class HideDogpile:
        def find_spec(self, name, path=None, target=None):
            if name == "dogpile" or name.startswith("dogpile."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
            return None

    sys.meta_path.insert(0, HideDogpile())
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append([record.name, record.levelname, record.getMessage()])

    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(logging.DEBUG)

    from sqlalchemy import create_engine
    from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

    from declcache import CacheConfig, CacheManager, Lookup

    class Base(DeclarativeBase):
        pass

    class Widget(Base):
        __tablename__ = "widgets"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

        class CacheMeta:
            ttl = 300

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine, expire_on_commit=False) as session:
        session.add(Widget(id=1, name="from-the-database"))
        session.commit()
        calls = []

        def loader():
            calls.append(1)
            return session.get(Widget, 1, populate_existing=True)

        manager = CacheManager(CacheConfig(key_prefix=sys.argv[1]))
        first = manager.load(Widget, 1, loader)
        second = manager.load(Widget, 1, loader)
        result = {
            "enabled": manager.enabled,
            "is_cached": manager.is_cached(Widget),
            "names": [first.name, second.name],
            "loader_calls": len(calls),
            "get_misses": manager.get(Widget, 1) is Lookup.MISS,
            "set": manager.set(Widget, first),
            "invalidate": manager.invalidate(Widget, 1),
            "clear": manager.clear(),
            "stats": manager.stats(),
            "dogpile_imported": sorted(m for m in sys.modules if m.split(".")[0] == "dogpile"),
            "records": records,
        }
    print(json.dumps(result))
    """
)


def test_without_dogpile_the_manager_is_a_no_op_that_misses(
    key_prefix: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _NO_DOGPILE_SCRIPT, key_prefix],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["enabled"] is False
    assert result["is_cached"] is False
    assert result["names"] == ["from-the-database"] * 2
    assert result["loader_calls"] == 2
    assert result["get_misses"] is True
    assert result["set"] is False
    assert result["invalidate"] is True
    assert result["clear"] is True
    assert result["stats"] == {}
    assert result["dogpile_imported"] == []
    warnings_logged = [
        message
        for logger, level, message in result["records"]
        if logger.startswith("declcache") and level == "WARNING"
    ]
    assert any("dogpile.cache is not installed" in message for message in warnings_logged)
