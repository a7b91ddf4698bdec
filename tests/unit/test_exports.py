"""The public surface: a curated, sorted ``__all__``, typing marker, lean import."""

import importlib.metadata
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

import declcache
from declcache import (
    CacheMetaError,
    ConfigurationError,
    DeclCacheError,
    NotFoundError,
    SettingsError,
    StrictConsistencyError,
)

EXPECTED_EXPORTS = {
    "CacheConfig",
    "CacheManager",
    "CacheMetaError",
    "CacheSettings",
    "ConfigurationError",
    "DeclCacheError",
    "Lookup",
    "ModelSpec",
    "ModelStats",
    "NotFoundError",
    "SettingsError",
    "StrictConsistencyError",
    "__version__",
    "setup_cache_listeners",
}

PACKAGE_DIR = Path(declcache.__file__).parent


def test_all_is_sorted() -> None:
    assert declcache.__all__ == sorted(declcache.__all__)


def test_all_is_exactly_the_public_api() -> None:
    assert set(declcache.__all__) == EXPECTED_EXPORTS
    assert len(declcache.__all__) == len(EXPECTED_EXPORTS)


def test_every_exported_name_exists() -> None:
    for name in declcache.__all__:
        assert getattr(declcache, name, None) is not None, name


def test_every_public_name_of_the_package_is_exported() -> None:
    public = {
        name
        for name, value in vars(declcache).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }

    assert public <= set(declcache.__all__)


def test_exception_tree() -> None:
    for error in (CacheMetaError, SettingsError):
        assert issubclass(error, ConfigurationError)
    assert issubclass(ConfigurationError, DeclCacheError)
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(NotFoundError, DeclCacheError)
    assert issubclass(NotFoundError, LookupError)
    assert issubclass(StrictConsistencyError, DeclCacheError)
    assert not issubclass(StrictConsistencyError, ConfigurationError)  # a fault, not a setting


def test_version_matches_the_installed_distribution() -> None:
    assert declcache.__version__ == importlib.metadata.version("declcache")


def test_py_typed_is_in_the_package() -> None:
    assert (PACKAGE_DIR / "py.typed").is_file()


def test_py_typed_ships_in_the_wheel(tmp_path: Path) -> None:
    wheel = pytest.importorskip("hatchling.builders.wheel")

    built = wheel.WheelBuilder(str(PACKAGE_DIR.parent)).build(
        directory=str(tmp_path), versions=["standard"]
    )

    names = zipfile.ZipFile(next(iter(built))).namelist()
    assert "declcache/py.typed" in names
    assert "declcache/__init__.py" in names
    assert not any(name.startswith("tests/") for name in names)


def test_import_does_not_import_dogpile() -> None:
    code = (
        "import sys, declcache\n"
        "loaded = sorted(m for m in sys.modules if m == 'dogpile' or m.startswith('dogpile.'))\n"
        "print(','.join(loaded))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
