"""Models, factories and helpers shared by the repository, config and singleflight tests.

Importable by a child process too (the distributed-lock test runs ``_dlock_worker`` in two).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import factory
from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from declcache.repository import SQLAlchemyAsyncRepository, SQLAlchemySyncRepository

if TYPE_CHECKING:
    from declcache.config import SQLAlchemySyncConfig
    from tests.integration.conftest import StatementLog


class Base(DeclarativeBase):
    pass


class Author(Base):
    """Cached by id and by email; has a relationship that is never cached."""

    __tablename__ = "repo_authors"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    books: Mapped[list[Book]] = relationship(back_populates="author", lazy="select")

    class CacheMeta:
        ttl = 300
        key_fields = (("id",), ("email",))


class Book(Base):
    """Not cached: no CacheMeta."""

    __tablename__ = "repo_books"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(String(100))
    author_id: Mapped[int] = mapped_column(ForeignKey("repo_authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


class Probe(Base):
    """Caches misses too: ``cache_not_found = True``."""

    __tablename__ = "repo_probes"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column(String(50))

    class CacheMeta:
        cache_not_found = True


class Membership(Base):
    """A composite primary key."""

    __tablename__ = "repo_memberships"

    org: Mapped[str] = mapped_column(String(20), primary_key=True)
    user: Mapped[int] = mapped_column(primary_key=True)
    role: Mapped[str] = mapped_column(String(20))

    class CacheMeta:
        pass


class AuthorFactory(factory.Factory):
    class Meta:
        model = Author

    id = factory.Sequence(lambda n: n + 1)
    email = factory.Sequence(lambda n: f"author{n + 1}@example.com")
    name = factory.Faker("name")


class BookFactory(factory.Factory):
    class Meta:
        model = Book

    id = factory.Sequence(lambda n: n + 1)
    title = factory.Faker("sentence", nb_words=3)


class MembershipFactory(factory.Factory):
    class Meta:
        model = Membership

    org = factory.Iterator(["acme", "globex"])
    user = factory.Sequence(lambda n: n + 1)
    role = "member"


class AuthorRepo(SQLAlchemySyncRepository[Author]):
    model_type = Author


class AsyncAuthorRepo(SQLAlchemyAsyncRepository[Author]):
    model_type = Author


class ProbeRepo(SQLAlchemySyncRepository[Probe]):
    model_type = Probe


class AsyncProbeRepo(SQLAlchemyAsyncRepository[Probe]):
    model_type = Probe


class MembershipRepo(SQLAlchemySyncRepository[Membership]):
    model_type = Membership


class AsyncMembershipRepo(SQLAlchemyAsyncRepository[Membership]):
    model_type = Membership


class BookRepo(SQLAlchemySyncRepository[Book]):
    model_type = Book


class AsyncBookRepo(SQLAlchemyAsyncRepository[Book]):
    model_type = Book


def reset_factories() -> None:
    """Restart every factory sequence at 1 (each test builds its own rows)."""
    for item in (AuthorFactory, BookFactory, MembershipFactory):
        item.reset_sequence(0)


def selects(log: StatementLog, table: str) -> int:
    """How many SELECTs ``log`` recorded that read ``table`` (connect-time probes ignored)."""
    return sum(table in sql for sql in log.of_kind("SELECT"))


def values(item: Any) -> dict[str, Any]:
    """The column values of a model instance, for comparisons."""
    from sqlalchemy import inspect

    return {attr.key: getattr(item, attr.key) for attr in inspect(type(item)).column_attrs}


def seed(db: SQLAlchemySyncConfig, *items: Any) -> None:
    """Insert rows through a plain session (not a repository)."""
    with db.get_session() as session:
        session.add_all(items)
        session.commit()
