"""The cache key of a repository query: stable for equal queries, distinct for different ones."""

from __future__ import annotations

import datetime as dt
import enum
import logging

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from declcache.repository._statement_key import query_key


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "key_rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


class Other(Base):
    __tablename__ = "key_others"
    id: Mapped[int] = mapped_column(primary_key=True)


class Color(enum.Enum):
    RED = 1


TABLES = frozenset({Row.__table__})
PG = postgresql.dialect()


def key(statement: sa.Select[tuple[Row]], dialect: sa.Dialect = PG) -> str | None:
    return query_key("list", statement, dialect, TABLES)


def page(name: object, limit: int = 20) -> sa.Select[tuple[Row]]:
    return sa.select(Row).where(Row.name == name).order_by(Row.id).limit(limit)


def test_equal_queries_share_a_key_and_any_value_changes_it() -> None:
    first = key(page("a"))
    assert first is not None
    assert first.startswith("list:")
    assert key(page("a")) == first  # a new statement object, the same query
    others = {key(page("b")), key(page("a", limit=21)), key(page(1)), key(page(True))}
    assert first not in others
    assert len(others) == 4
    assert key(page("a"), sqlite.dialect()) != first  # the SQL text depends on the dialect
    assert query_key("count", page("a"), PG, TABLES) != first


def test_expanding_and_rich_values_are_keyed() -> None:
    in_list = sa.select(Row).where(Row.id.in_([1, 2, 3]))
    assert key(in_list) == key(sa.select(Row).where(Row.id.in_([1, 2, 3])))
    assert key(in_list) != key(sa.select(Row).where(Row.id.in_([1, 2])))
    when = dt.datetime(2024, 1, 2, tzinfo=dt.UTC)
    assert key(page(when)) == key(page(when)) != key(page(when.replace(tzinfo=None)))
    assert key(page(Color.RED)) is not None


@pytest.mark.parametrize(
    ("statement", "reason"),
    [
        (sa.select(Row).where(sa.text("name = 'x'")), "textual SQL"),
        (sa.select(Row).where(Row.id.in_(sa.select(Other.id))), "reads key_others"),
        (sa.select(Row).where(Row.id > sa.func.random()), "random() changes"),
        (sa.select(Row).where(Row.name == object()), "no stable text"),
        (sa.select(Row).where(Row.name == sa.bindparam("unset")), "incomplete"),
    ],
    ids=["text", "other-table", "volatile", "opaque", "unbound"],
)
def test_unkeyable_statements_get_no_key_and_a_debug_log(
    statement: sa.Select[tuple[Row]], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="declcache.repository")
    for _ in range(2):  # also once its shape is remembered
        assert key(statement) is None
    assert sum(reason in record.getMessage() for record in caplog.records) == 2
