"""The cache key of a repository query: stable for equal queries, distinct for different ones."""

from __future__ import annotations

import datetime as dt
import enum
import logging
from typing import Any

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


# -- issue 14 point 9: an allow-list ---------------------------------------------------------


class Trusted(sa.sql.functions.GenericFunction[int]):
    """A user's function that says it is deterministic."""

    name = "my_hash"
    inherit_cache = True
    declcache_deterministic = True


@pytest.mark.parametrize(
    "condition",
    [
        sa.func.datetime("now") > Row.name,
        sa.func.unixepoch() > Row.id,
        sa.func.curdate() == Row.name,
        sa.func.getdate() == Row.name,
        sa.func.now() == Row.name,
        sa.func.current_timestamp() == Row.name,
        sa.literal_column("datetime('now')") == Row.name,
        sa.func.row_number().over() == Row.id,
    ],
    ids=["datetime", "unixepoch", "curdate", "getdate", "now", "current_timestamp", "raw", "over"],
)
def test_what_is_not_known_to_be_deterministic_is_not_cached(condition: Any) -> None:
    statement = sa.select(Row).where(condition)
    for dialect in (PG, sqlite.dialect()):
        assert key(statement, dialect) is None
    assert key(statement.execution_options(declcache_cacheable=True)) is not None  # vouched


def test_known_deterministic_constructs_are_cached() -> None:
    statement = (
        sa.select(Row)
        .where(
            sa.func.lower(sa.func.coalesce(Row.name, "")).like("a%"),
            sa.or_(Row.id.in_([1, 2]), sa.not_(Row.id.between(5, 9))),
            sa.case((Row.id > 1, "a"), else_="b") == "a",
            sa.cast(Row.id, sa.String) != "3",
            Trusted(Row.id) > 0,
        )
        .order_by(Row.id.desc())
        .limit(5)
        .offset(1)
    )
    assert key(statement) is not None
    assert key(sa.select(sa.func.count()).select_from(Row)) is not None
