"""Fixtures of the unit tests: a clean environment and fresh, disposable declarative bases.

A model whose CacheMeta is invalid fails ``configure_mappers()`` once; SQLAlchemy then marks
its mapper configured anyway, so the model stays mapped and every later look-up of its spec
raises again (and a failure before the event fires would fail ``configure_mappers()`` for
every registry). Each test therefore builds its models on bases from :func:`make_base`,
disposed at teardown, and :func:`_no_broken_mappers` proves after each test that every model
still mapped configures and resolves.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import weakref
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import event, inspect
from sqlalchemy.orm import DeclarativeBase, Mapper, configure_mappers

from declcache import CacheManager

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    MakeBase = Callable[[], type[DeclarativeBase]]
    WriteModule = Callable[[str, str], str]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ``DECLCACHE_*`` variable and no stray ``.env`` reaches a test: cwd is a fresh dir."""
    for name in list(os.environ):
        if name.upper().startswith("DECLCACHE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


_mapped_classes: weakref.WeakSet[type] = weakref.WeakSet()


@event.listens_for(Mapper, "instrument_class")
def _track_mapped_class(_mapper: Mapper[object], cls: type) -> None:
    _mapped_classes.add(cls)


@pytest.fixture(autouse=True)
def _no_broken_mappers() -> Iterator[None]:
    """After the test (and after its bases are disposed) every live model still works."""
    yield
    configure_mappers()
    manager = CacheManager()
    for cls in list(_mapped_classes):
        if inspect(cls, raiseerr=False) is not None:  # None once its registry is disposed
            manager.spec(cls)  # raises CacheMetaError for a bad CacheMeta left behind


@pytest.fixture
def make_base() -> Iterator[MakeBase]:
    """A factory of fresh ``DeclarativeBase`` subclasses, each disposed after the test."""
    bases: list[type[DeclarativeBase]] = []

    def make() -> type[DeclarativeBase]:
        class Base(DeclarativeBase):
            pass

        bases.append(Base)
        return Base

    yield make
    for base in bases:
        base.registry.dispose()


@pytest.fixture
def base(make_base: MakeBase) -> type[DeclarativeBase]:
    """One fresh ``DeclarativeBase`` subclass, disposed after the test."""
    return make_base()


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WriteModule]:
    """Write an importable module into ``tmp_path``: ``write_module(name, source) -> name``."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        importlib.invalidate_caches()
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)
