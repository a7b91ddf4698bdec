"""Fixtures of the backend tests: the suite's SQLite session, and the invalidation tables' engine.

``session``
    A session on a fresh SQLite file with the suite's tables (``_suite.py``); the factory-boy
    factories write through it.

``engine``
    The invalidation tests' tables and rows (``_invalidation_models.py``) with items 1 to
    :data:`~tests.integration.backends._suite.ITEMS`: what the scenarios across several
    servers read, enough keys to land on every node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from tests.integration._invalidation_models import Item, sqlite_engine
from tests.integration.backends._suite import ITEMS, Base, DbSession

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    """A session on a fresh SQLite file; the factories write through it."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    Base.metadata.create_all(engine)
    DbSession.configure(bind=engine)
    yield DbSession()
    DbSession.remove()
    engine.dispose()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """The invalidation tables, items 1 to ``ITEMS`` included; the cache listeners set up."""
    with sqlite_engine(tmp_path / "db.sqlite") as engine:
        with Session(engine) as session:
            session.add_all(Item(id=i, name=f"item-{i}") for i in range(4, ITEMS + 1))
            session.commit()
        yield engine
