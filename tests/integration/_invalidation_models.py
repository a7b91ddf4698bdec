"""Models and helpers shared by the invalidation, stale-fill, backend-fault and backend tests.

The models live in an importable module (not in a test file) so that a subprocess can import
exactly the same classes: a payload carries a fingerprint of its model's shape, so a second
process only reads the first one's entries if it maps the very same columns.

Every table name starts with ``inv_``, so these tables never clash with other test modules'
tables in the shared per-run PostgreSQL database.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import ForeignKey, String, create_engine, delete, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine

    from declcache import CacheManager


class Base(DeclarativeBase):
    pass


class Person(Base):
    """Cached under its primary key and under its unique email."""

    __tablename__ = "inv_people"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(100))

    class CacheMeta:
        ttl = 300
        key_fields = (("id",), ("email",))


class Item(Base):
    """Cached under its primary key only: one fill writes exactly one key."""

    __tablename__ = "inv_items"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))

    class CacheMeta:
        ttl = 300


class Slot(Base):
    """Caches "not found" too, until an insert of the key."""

    __tablename__ = "inv_slots"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))

    class CacheMeta:
        ttl = 300
        cache_not_found = True


class Note(Base):
    """A one-second ttl: the bound on staleness of writes declcache cannot see."""

    __tablename__ = "inv_notes"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(String(100))

    class CacheMeta:
        ttl = 1


class Folder(Base):
    """Not cached; owns documents with an ORM delete cascade."""

    __tablename__ = "inv_folders"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    documents: Mapped[list[Document]] = relationship(
        cascade="all, delete-orphan", order_by="Document.id"
    )


class Document(Base):
    """A cached child of :class:`Folder` (no back-reference)."""

    __tablename__ = "inv_documents"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    folder_id: Mapped[int] = mapped_column(ForeignKey("inv_folders.id"))
    title: Mapped[str] = mapped_column(String(100))

    class CacheMeta:
        ttl = 300


#: Children first, so a DELETE of every table never breaks a foreign key.
TABLES_IN_DELETE_ORDER = (Document, Folder, Person, Item, Slot, Note)


def reset_rows(engine: Engine) -> None:
    """Empty every table, then add the rows each test starts from."""
    with Session(engine) as session:
        for model in TABLES_IN_DELETE_ORDER:
            session.execute(delete(model))
        session.add_all(
            [
                Person(id=1, email="ann@example.com", name="Ann"),
                Person(id=2, email="bob@example.com", name="Bob"),
                *(Item(id=i, name=f"item-{i}") for i in (1, 2, 3)),
                Note(id=1, body="first"),
                Folder(
                    id=1,
                    name="docs",
                    documents=[Document(id=1, title="one"), Document(id=2, title="two")],
                ),
            ]
        )
        session.commit()


def row(instance: Any) -> dict[str, Any] | None:
    """The column values of a (detached) instance, or ``None``: what a test compares."""
    if instance is None:
        return None
    mapper = instance.__mapper__
    return {attr.key: getattr(instance, attr.key) for attr in mapper.column_attrs}


@dataclass
class Reader:
    """Reads through one manager, each read in a fresh session, counting database loads.

    This is what a repository does, without depending on one: ``manager.load`` with a loader
    that queries the session.
    """

    engine: Engine
    manager: CacheManager
    loads: int = 0
    seen: list[dict[str, Any] | None] = field(default_factory=list)

    def get(self, model: type, ident: Any) -> dict[str, Any] | None:
        """The row ``ident`` (a primary key or ``{"email": ...}``) names, via the cache."""
        with Session(self.engine, info={"cache_manager": self.manager}) as session:

            def loader() -> Any:
                self.loads += 1
                if isinstance(ident, dict):
                    query = select(model).filter_by(**ident)
                    return session.scalars(query).one_or_none()
                return session.get(model, ident)

            result = row(self.manager.load(model, ident, loader))
        self.seen.append(result)
        return result

    def list_all(self, model: type) -> list[dict[str, Any] | None]:
        """Every row of ``model`` by primary key, through ``load_list``."""
        with Session(self.engine, info={"cache_manager": self.manager}) as session:

            def loader() -> list[Any]:
                self.loads += 1
                return list(session.scalars(select(model).order_by(model.id)))  # type: ignore[attr-defined]

            return [row(item) for item in self.manager.load_list(model, "all", loader)]

    def loads_during(self, action: Callable[[], Any]) -> int:
        """How many database loads ``action()`` caused."""
        before = self.loads
        action()
        return self.loads - before


#: Seconds any step of a race may take before the test gives up: a guard that turns a hang
#: into a failure, never reached when green (nothing is timed).
WAIT = 60.0


class PausedRead(threading.Thread):
    """``manager.load`` in a thread whose loader stops right after its SELECT."""

    def __init__(
        self,
        engine: Engine,
        manager: CacheManager,
        model: type,
        ident: Any,
        query: Callable[[Session], Any],
    ) -> None:
        super().__init__(daemon=True)
        self.engine, self.manager, self.query = engine, manager, query
        self.model, self.key = model, ident
        self.selected = threading.Event()
        self.resume = threading.Event()
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Session(self.engine, info={"cache_manager": self.manager}) as session:

                def loader() -> Any:
                    found = self.query(session)
                    self.selected.set()
                    if not self.resume.wait(WAIT):
                        raise TimeoutError("never resumed")
                    return found

                self.result = row(self.manager.load(self.model, self.key, loader))
        except BaseException as error:  # reported by finish()
            self.error = error
            self.selected.set()

    def pause(self) -> None:
        """Start, and return once the loader has SELECTed."""
        self.start()
        assert self.selected.wait(WAIT), "the reader never reached its SELECT"
        assert self.error is None, self.error

    def finish(self) -> dict[str, Any] | None:
        """Let the loader return, wait for the fill, give the reader's own result."""
        self.resume.set()
        self.join(WAIT)
        assert not self.is_alive(), "the reader did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def race(
    engine: Engine,
    manager: CacheManager,
    model: type,
    ident: Any,
    *,
    query: Callable[[Session], Any],
    commit: Callable[[], None],
) -> dict[str, Any] | None:
    """Pause a reader after its SELECT, run ``commit()``, let the reader fill."""
    reader = PausedRead(engine, manager, model, ident, query)
    reader.pause()
    commit()
    return reader.finish()


@contextmanager
def writing(engine: Engine, manager: CacheManager) -> Iterator[Session]:
    """A plain session whose commits invalidate through ``manager``."""
    with Session(engine, info={"cache_manager": manager}) as session:
        yield session


@contextmanager
def sqlite_engine(path: Path) -> Iterator[Engine]:
    """A SQLite file database at ``path`` with every table and the starting rows, the cache
    listeners registered; disposed on exit."""
    from declcache import setup_cache_listeners

    setup_cache_listeners()
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    reset_rows(engine)
    try:
        yield engine
    finally:
        engine.dispose()
