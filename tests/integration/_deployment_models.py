"""Models of the deployment invalidation tests (issue 14 points 1, 2 and 4 to 7).

An importable module, so a subprocess maps exactly the same classes (a key holds a fingerprint
of the model's module and name). Every table name starts with ``dep_``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import factory
from sqlalchemy import ForeignKey, String, event
from sqlalchemy.engine import Engine, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from declcache.repository import SQLAlchemySyncRepository


class Base(DeclarativeBase):
    pass


class Parent(Base):
    """Not cached; the database deletes and renames its children (``passive_*``)."""

    __tablename__ = "dep_parents"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    children: Mapped[list[Child]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="Child.id"
    )


class Child(Base):
    """Cached; its foreign key cascades on delete and on update."""

    __tablename__ = "dep_children"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(
        ForeignKey("dep_parents.id", ondelete="CASCADE", onupdate="CASCADE")
    )
    title: Mapped[str] = mapped_column(String(50))

    class CacheMeta:
        ttl = 300


class Gadget(Base):
    """Cached by primary key only, "not found" too: bulk calls can be keyed."""

    __tablename__ = "dep_gadgets"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))

    class CacheMeta:
        ttl = 300
        cache_not_found = True


class Tag(Base):
    """Cached under a second key: a bulk update of it invalidates the whole model."""

    __tablename__ = "dep_tags"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    code: Mapped[str] = mapped_column(String(50), unique=True)

    class CacheMeta:
        ttl = 300
        key_fields = (("id",), ("code",))


class Employee(Base):
    """Single-table inheritance; a promotion changes the discriminator."""

    __tablename__ = "dep_employees"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(50))
    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "employee",
    }

    class CacheMeta:
        ttl = 300
        cache_not_found = True


class Engineer(Employee):
    __mapper_args__ = {"polymorphic_identity": "engineer"}  # noqa: RUF012


class Manager(Employee):
    __mapper_args__ = {"polymorphic_identity": "manager"}  # noqa: RUF012


class ChildRepo(SQLAlchemySyncRepository[Child]):
    model_type = Child


class GadgetRepo(SQLAlchemySyncRepository[Gadget]):
    model_type = Gadget


class TagRepo(SQLAlchemySyncRepository[Tag]):
    model_type = Tag


class EngineerRepo(SQLAlchemySyncRepository[Engineer]):
    model_type = Engineer


class ManagerRepo(SQLAlchemySyncRepository[Manager]):
    model_type = Manager


class ParentFactory(factory.Factory):
    class Meta:
        model = Parent

    id = factory.Sequence(lambda n: n + 1)
    name = factory.Faker("word")


class ChildFactory(factory.Factory):
    class Meta:
        model = Child

    id = factory.Sequence(lambda n: n + 1)
    title = factory.Faker("sentence", nb_words=2)


class GadgetFactory(factory.Factory):
    class Meta:
        model = Gadget

    id = factory.Sequence(lambda n: n + 1)
    name = factory.Sequence(lambda n: f"gadget-{n + 1}")


class TagFactory(factory.Factory):
    class Meta:
        model = Tag

    id = factory.Sequence(lambda n: n + 1)
    code = factory.Sequence(lambda n: f"tag-{n + 1}")


class EngineerFactory(factory.Factory):
    class Meta:
        model = Engineer

    id = factory.Sequence(lambda n: n + 1)
    name = factory.Faker("name")


FACTORIES = (ParentFactory, ChildFactory, GadgetFactory, TagFactory, EngineerFactory)
TABLES_IN_DELETE_ORDER = (Child, Parent, Gadget, Tag, Employee)


def make_engine(url: str) -> Engine:
    """An engine on ``url``; SQLite enforces foreign keys (and so their cascades)."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _foreign_keys(dbapi_connection: object, _record: object) -> None:
            cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def seed(engine: Engine) -> None:
    """Empty every table, then add two parents with two children each, gadgets, tags, staff."""
    for item in FACTORIES:
        item.reset_sequence(0)
    with Session(engine) as session:
        for model in TABLES_IN_DELETE_ORDER:
            session.query(model).delete()
        session.add_all(
            [
                ParentFactory(children=ChildFactory.build_batch(2)),
                ParentFactory(children=ChildFactory.build_batch(2)),
                *GadgetFactory.build_batch(3),
                *TagFactory.build_batch(2),
                *EngineerFactory.build_batch(2),
            ]
        )
        session.commit()
