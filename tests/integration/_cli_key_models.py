"""Models whose keys hold awkward values, for the ``declcache invalidate`` key syntax tests."""

from __future__ import annotations

import factory
from sqlalchemy import String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Tag(Base):
    """A string primary key: any text at all names a row."""

    __tablename__ = "cli_key_tags"

    code: Mapped[str] = mapped_column(String(50), primary_key=True)
    label: Mapped[str] = mapped_column(String(50))

    class CacheMeta:
        pass


class Page(Base):
    """An integer primary key and a composite ``key_fields`` set, as in issue 13."""

    __tablename__ = "cli_key_pages"
    __table_args__ = (UniqueConstraint("org_id", "slug"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    org_id: Mapped[int]
    slug: Mapped[str] = mapped_column(String(50))

    class CacheMeta:
        key_fields = (("org_id", "slug"),)


class Seat(Base):
    """A composite primary key of a string and an integer."""

    __tablename__ = "cli_key_seats"

    row: Mapped[str] = mapped_column(String(20), primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)

    class CacheMeta:
        pass


class TagFactory(factory.Factory):
    class Meta:
        model = Tag

    code = factory.Sequence(lambda n: f"tag-{n}")
    label = factory.Faker("word")


class PageFactory(factory.Factory):
    class Meta:
        model = Page

    id = factory.Sequence(lambda n: n + 1)
    org_id = 7
    slug = factory.Sequence(lambda n: f"page-{n}")


class SeatFactory(factory.Factory):
    class Meta:
        model = Seat

    row = "A"
    number = factory.Sequence(lambda n: n + 1)
