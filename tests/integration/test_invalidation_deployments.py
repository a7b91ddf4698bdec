"""No stale row in the deployments users run (issue 14, points 1, 2, 4, 5, 6, 7).

Each case reads through a *reader* manager (a second process sharing the backend, as far as
the cache can tell), writes through sessions carrying a *writer* manager, then proves with a
counted ``SELECT`` (SQLAlchemy's ``before_cursor_execute``) that the next read went to the
database and returned the new row, and that the read after it is a hit again. Every test runs
on SQLite and PostgreSQL, with the memory, Redis and Memcached backends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from declcache import CacheConfig, CacheManager, setup_cache_listeners
from declcache.exceptions import NotFoundError
from tests.integration._deployment_models import (
    Base,
    ChildRepo,
    Employee,
    Engineer,
    EngineerRepo,
    Gadget,
    GadgetRepo,
    ManagerRepo,
    Parent,
    Tag,
    TagRepo,
    make_engine,
    seed,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Engine

    from declcache.repository import SQLAlchemySyncRepository
    from tests.integration.conftest import StatementLog

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["memory", "redis", "memcached"])
def cache_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('deployments') / 'db.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="module")
def module_engine(database_url: str) -> Iterator[Engine]:
    setup_cache_listeners()
    engine = make_engine(database_url)
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def engine(module_engine: Engine) -> Engine:
    seed(module_engine)
    return module_engine


@pytest.fixture
def writer(cache_config: CacheConfig) -> CacheManager:
    return CacheManager(cache_config)


class Reads:
    """Reads through the reader manager, each in a fresh session, counting SELECTs."""

    def __init__(self, engine: Engine, manager: CacheManager, log: StatementLog) -> None:
        self.engine, self.manager, self.log = engine, manager, log

    def _run(self, repo_type: type[SQLAlchemySyncRepository[Any]], call: Callable[..., Any]) -> Any:
        with Session(self.engine) as session:
            return call(repo_type(session=session, cache_manager=self.manager))

    def get(self, repo_type: type[SQLAlchemySyncRepository[Any]], ident: Any) -> Any:
        """``(column values or None, SELECTs sent)``."""
        with self.log.fresh() as sent:
            try:
                found = self._run(repo_type, lambda repo: repo.get(ident))
            except NotFoundError:
                return None, len(sent)
            return _values(found), len(sent)

    def list(self, repo_type: type[SQLAlchemySyncRepository[Any]]) -> Any:
        """``(column values of every row by id, SELECTs sent)``."""
        with self.log.fresh() as sent:
            rows = self._run(repo_type, lambda repo: repo.list(order_by=repo.model_type.id))
            return [_values(item) for item in rows], len(sent)


def _values(instance: Any) -> dict[str, Any]:
    return {attr.key: getattr(instance, attr.key) for attr in instance.__mapper__.column_attrs}


@pytest.fixture
def reads(
    engine: Engine, cache_config: CacheConfig, statements: Callable[[Engine], StatementLog]
) -> Reads:
    return Reads(engine, CacheManager(cache_config), statements(engine))


def writing(engine: Engine, manager: CacheManager) -> Session:
    return Session(engine, info={"cache_manager": manager})


def assert_fresh(reads: Reads, read: Callable[[], tuple[Any, int]], expected: Any) -> None:
    """The next read queries the database and returns ``expected``; the one after is a hit.

    (A "not found" is only cached for models with ``cache_not_found``: not checked then.)
    """
    assert read() == (expected, 1)
    if expected is not None:
        assert read() == (expected, 0)


def warm(read: Callable[[], tuple[Any, int]]) -> Any:
    value, _ = read()
    assert read() == (value, 0), "the second read must be a hit"
    return value


# -- 1. cascades the database performs -------------------------------------------------------


def test_database_delete_cascade_invalidates_the_children(
    engine: Engine, writer: CacheManager, reads: Reads
) -> None:
    warm(lambda: reads.get(ChildRepo, 1))
    before = warm(lambda: reads.list(ChildRepo))
    assert len(before) == 4
    with writing(engine, writer) as session:
        session.delete(session.get(Parent, 1))  # children not loaded: the database deletes them
        session.commit()
    assert_fresh(reads, lambda: reads.get(ChildRepo, 1), None)
    assert_fresh(reads, lambda: reads.list(ChildRepo), before[2:])


def test_database_delete_cascade_with_loaded_children(
    engine: Engine, writer: CacheManager, reads: Reads
) -> None:
    warm(lambda: reads.get(ChildRepo, 2))
    with writing(engine, writer) as session:
        parent = session.get(Parent, 1)
        assert parent is not None
        assert [child.id for child in parent.children] == [1, 2]
        session.delete(parent)
        session.commit()
    assert_fresh(reads, lambda: reads.get(ChildRepo, 2), None)
    assert warm(lambda: reads.get(ChildRepo, 3))["parent_id"] == 2  # other children stay cached


@pytest.mark.parametrize("load_children", [False, True], ids=["unloaded", "loaded"])
def test_primary_key_rename_cascades_to_the_cached_children(
    engine: Engine, writer: CacheManager, reads: Reads, load_children: bool
) -> None:
    assert warm(lambda: reads.get(ChildRepo, 3))["parent_id"] == 2
    warm(lambda: reads.list(ChildRepo))
    with writing(engine, writer) as session:
        parent = session.get(Parent, 2)
        assert parent is not None
        if load_children:
            assert len(parent.children) == 2
        parent.id = 20  # ON UPDATE CASCADE rewrites the children's parent_id
        session.commit()
    child = reads.get(ChildRepo, 3)
    assert child[0] is not None
    assert (child[0]["parent_id"], child[1]) == (20, 1)
    assert [row["parent_id"] for row in reads.list(ChildRepo)[0]] == [1, 1, 20, 20]


# -- 2. legacy bulk methods ------------------------------------------------------------------


def test_bulk_update_mappings_invalidates_by_primary_key(
    engine: Engine, writer: CacheManager, reads: Reads
) -> None:
    warm(lambda: reads.get(GadgetRepo, 1))
    warm(lambda: reads.get(GadgetRepo, 2))
    warm(lambda: reads.list(GadgetRepo))
    with writing(engine, writer) as session:
        session.bulk_update_mappings(Gadget, [{"id": 1, "name": "renamed"}])  # type: ignore[arg-type]
        session.commit()
    assert_fresh(reads, lambda: reads.get(GadgetRepo, 1), {"id": 1, "name": "renamed"})
    assert reads.get(GadgetRepo, 2)[1] == 0  # keyed: the other entity stays cached
    assert reads.list(GadgetRepo)[0][0]["name"] == "renamed"


def test_bulk_insert_mappings_invalidates_a_cached_not_found(
    engine: Engine, writer: CacheManager, reads: Reads
) -> None:
    assert warm(lambda: reads.get(GadgetRepo, 9)) is None
    warm(lambda: reads.list(GadgetRepo))
    with writing(engine, writer) as session:
        session.bulk_insert_mappings(Gadget, [{"id": 9, "name": "new"}])  # type: ignore[arg-type]
        session.commit()
    assert_fresh(reads, lambda: reads.get(GadgetRepo, 9), {"id": 9, "name": "new"})
    assert len(reads.list(GadgetRepo)[0]) == 4


def test_bulk_save_objects_invalidates_updates_and_inserts(
    engine: Engine, writer: CacheManager, reads: Reads
) -> None:
    warm(lambda: reads.get(GadgetRepo, 3))
    warm(lambda: reads.get(GadgetRepo, 8))
    with writing(engine, writer) as session:
        existing = session.get(Gadget, 3)
        assert existing is not None
        existing.name = "saved"
        session.bulk_save_objects([existing, Gadget(id=8, name="eight")])
        session.commit()
    assert_fresh(reads, lambda: reads.get(GadgetRepo, 3), {"id": 3, "name": "saved"})
    assert_fresh(reads, lambda: reads.get(GadgetRepo, 8), {"id": 8, "name": "eight"})


def test_bulk_update_of_a_model_with_a_second_key_invalidates_it_whole(
    engine: Engine, writer: CacheManager, reads: Reads
) -> None:
    warm(lambda: reads.get(TagRepo, 2))
    with writing(engine, writer) as session:
        session.bulk_update_mappings(Tag, [{"id": 1, "code": "renamed"}])  # type: ignore[arg-type]
        session.commit()
    assert_fresh(reads, lambda: reads.get(TagRepo, 2), {"id": 2, "code": "tag-2"})
    assert_fresh(reads, lambda: reads.get(TagRepo, 1), {"id": 1, "code": "renamed"})


def test_bulk_call_rolled_back_invalidates_nothing(
    engine: Engine, writer: CacheManager, reads: Reads
) -> None:
    warm(lambda: reads.get(GadgetRepo, 1))
    with writing(engine, writer) as session:
        session.bulk_update_mappings(Gadget, [{"id": 1, "name": "never"}])  # type: ignore[arg-type]
        session.rollback()
    assert reads.get(GadgetRepo, 1) == ({"id": 1, "name": "gadget-1"}, 0)


# -- 4. a session joined to an outer transaction ---------------------------------------------


MODES = ["conditional_savepoint", "create_savepoint", "rollback_only"]


@pytest.mark.parametrize("mode", MODES)
def test_joined_session_invalidates_at_the_outer_commit(
    engine: Engine, writer: CacheManager, reads: Reads, mode: Any
) -> None:
    warm(lambda: reads.get(GadgetRepo, 1))
    with engine.connect() as connection:
        outer = connection.begin()
        session = Session(
            bind=connection, join_transaction_mode=mode, info={"cache_manager": writer}
        )
        gadget = session.get(Gadget, 1)
        assert gadget is not None
        gadget.name = "joined"
        session.commit()
        # the joined session reads its own uncommitted row: it must not fill the cache
        assert GadgetRepo(session=session).get(1).name == "joined"
        # another session reads the committed (old) row: a miss that re-caches it
        assert reads.get(GadgetRepo, 1)[0] == {"id": 1, "name": "gadget-1"}
        session.close()
        outer.commit()
    assert_fresh(reads, lambda: reads.get(GadgetRepo, 1), {"id": 1, "name": "joined"})


@pytest.mark.parametrize("mode", MODES)
def test_joined_session_rolled_back_outside_invalidates_nothing(
    engine: Engine, writer: CacheManager, reads: Reads, mode: Any
) -> None:
    warm(lambda: reads.get(GadgetRepo, 2))
    with engine.connect() as connection:
        outer = connection.begin()
        session = Session(
            bind=connection, join_transaction_mode=mode, info={"cache_manager": writer}
        )
        gadget = session.get(Gadget, 2)
        assert gadget is not None
        gadget.name = "discarded"
        session.commit()
        assert GadgetRepo(session=session).get(2).name == "discarded"
        session.close()
        outer.rollback()
    assert reads.get(GadgetRepo, 2) == ({"id": 2, "name": "gadget-2"}, 0)
    with writing(engine, writer) as session:  # the connection's next commit applies nothing old
        session.add(Gadget(id=7, name="seven"))
        session.commit()
    assert reads.get(GadgetRepo, 2) == ({"id": 2, "name": "gadget-2"}, 0)


def test_control_fully_session_invalidates_at_its_commit(
    engine: Engine, writer: CacheManager, reads: Reads
) -> None:
    warm(lambda: reads.get(GadgetRepo, 3))
    with engine.connect() as connection:
        connection.begin()
        session = Session(
            bind=connection, join_transaction_mode="control_fully", info={"cache_manager": writer}
        )
        gadget = session.get(Gadget, 3)
        assert gadget is not None
        gadget.name = "full"
        session.commit()
        assert_fresh(reads, lambda: reads.get(GadgetRepo, 3), {"id": 3, "name": "full"})
        session.close()


# -- 5. single-table inheritance discriminator changes ---------------------------------------


@pytest.mark.filterwarnings("ignore:Flushing object .* incompatible polymorphic identity")
def test_promotion_to_another_subclass_invalidates_both_classes(
    engine: Engine, writer: CacheManager, reads: Reads
) -> None:
    assert warm(lambda: reads.get(ManagerRepo, 1)) is None  # a cached not-found
    assert warm(lambda: reads.list(ManagerRepo)) == []
    assert warm(lambda: reads.get(EngineerRepo, 1)) is not None
    with writing(engine, writer) as session:
        employee = session.get(Employee, 1)
        assert employee is not None
        employee.kind = "manager"
        session.commit()
    promoted = reads.get(ManagerRepo, 1)
    assert promoted[0] is not None
    assert (promoted[0]["kind"], promoted[1]) == ("manager", 1)
    assert [row["id"] for row in reads.list(ManagerRepo)[0]] == [1]
    assert_fresh(reads, lambda: reads.get(EngineerRepo, 1), None)


def test_bulk_promotion_through_a_subclass_invalidates_the_sibling(
    engine: Engine, writer: CacheManager, reads: Reads
) -> None:
    assert warm(lambda: reads.get(ManagerRepo, 2)) is None
    with writing(engine, writer) as session:
        session.execute(update(Engineer).where(Engineer.id == 2).values(kind="manager"))
        session.commit()
    promoted = reads.get(ManagerRepo, 2)
    assert promoted[0] is not None
    assert promoted[1] == 1


# -- 6. a manager attached late --------------------------------------------------------------


def test_rows_flushed_before_the_manager_is_attached_are_invalidated(
    engine: Engine, writer: CacheManager, reads: Reads
) -> None:
    warm(lambda: reads.get(GadgetRepo, 1))
    assert warm(lambda: reads.get(GadgetRepo, 5)) is None
    with Session(engine) as session:  # no manager yet
        gadget = session.get(Gadget, 1)
        assert gadget is not None
        gadget.name = "early"
        session.add(Gadget(id=5, name="five"))
        session.flush()
        repo = GadgetRepo(session=session, cache_manager=writer)  # attaches the manager
        repo.update(Gadget(id=2, name="late"))
        session.commit()
    assert_fresh(reads, lambda: reads.get(GadgetRepo, 1), {"id": 1, "name": "early"})
    assert_fresh(reads, lambda: reads.get(GadgetRepo, 5), {"id": 5, "name": "five"})
    assert_fresh(reads, lambda: reads.get(GadgetRepo, 2), {"id": 2, "name": "late"})


# -- 7. mappers not yet configured (a fresh process) -----------------------------------------

_FRESH_PROCESS = """
import json, sys
from sqlalchemy import update
from sqlalchemy.orm import Session
from declcache import CacheConfig, CacheManager, setup_cache_listeners
from tests.integration import _deployment_models as models
from sqlalchemy.orm import Mapper
url, action, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
configured = models.Gadget.__mapper__.configured
manager = CacheManager(CacheConfig(**config))
setup_cache_listeners()
engine = models.make_engine(url)
if action == "clear":
    result = manager.clear()
else:
    with Session(engine, info={"cache_manager": manager}) as session:
        session.execute(update(models.Gadget.__table__).values(name="core"))
        session.commit()
    result = True
print(json.dumps({"configured_before": configured, "result": result}))
"""


@pytest.mark.parametrize("action", ["clear", "core_update"])
@pytest.mark.parametrize("cache_backend", ["redis", "memcached"])  # shared by two processes
def test_a_fresh_process_invalidates_before_any_query(  # noqa: PLR0917 - fixtures
    engine: Engine,
    reads: Reads,
    database_url: str,
    cache_backend: str,
    cache_config: CacheConfig,
    action: str,
) -> None:
    warm(lambda: reads.get(GadgetRepo, 1))
    config = {
        "backend": cache_config.backend,
        "arguments": dict(cache_config.arguments),
        "key_prefix": cache_config.key_prefix,
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, database_url, action, json.dumps(config)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"configured_before": False, "result": True}
    name = "core" if action == "core_update" else "gadget-1"
    assert_fresh(reads, lambda: reads.get(GadgetRepo, 1), {"id": 1, "name": name})
