"""The cache key of a query: a hash of its SQL, compiled for the dialect, and its parameters.

Pure, no I/O. A cached list is dropped whenever its model's list version changes, so a query
may only be cached when that version covers every input of its result. A statement is not
cached (and a debug log says why) when:

* it reads a table outside its model's tables (another model's changes would not reach it);
* it holds textual SQL (the tables that text reads are unknown);
* it holds anything not known to be deterministic: statement caching is an allow-list
  (columns, bound values, operators, ``IN``/``LIKE``/``CASE``/``CAST``, ``ORDER BY``,
  ``LIMIT``/``OFFSET``, the model's tables, :data:`DETERMINISTIC_FUNCTIONS`), so
  ``now()``, ``datetime('now')``, ``random()``, ``literal_column("…")`` and any construct
  not listed are not cached, unless the statement carries :data:`CACHEABLE_OPTION`;
* a bound parameter has no stable text (an object whose ``repr`` is its memory address):
  two equal queries would get two keys, or two different ones the same key.

Keying runs on every cached read, hits included, so each statement *shape* (its SQL without
the bound values, as SQLAlchemy's own statement cache key names it) is checked and compiled
once; a later statement of the same shape only has its values extracted.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import cachetools
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    Case,
    Cast,
    ClauseList,
    CollationClause,
    ColumnClause,
    ExpressionClauseList,
    Extract,
    False_,
    Grouping,
    Label,
    Null,
    TextClause,
    True_,
    Tuple,
    TypeCoerce,
    UnaryExpression,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import (
    Alias,
    CompoundSelect,
    Exists,
    Join,
    ScalarSelect,
    Select,
    TableClause,
)
from sqlalchemy.sql.util import find_tables

from declcache._codec import IMMUTABLE_TYPES
from declcache._private_apis import statement_cache_key

if TYPE_CHECKING:
    from sqlalchemy.engine import Compiled, Dialect
    from sqlalchemy.sql import ClauseElement
    from sqlalchemy.sql.cache_key import CacheKey

__all__ = [
    "CACHEABLE_OPTION",
    "DETERMINISTIC_FUNCTIONS",
    "SHAPES_KEPT",
    "nondeterminism",
    "query_key",
]

logger = logging.getLogger("declcache.repository")

#: SQL functions known to give the same result for the same arguments and rows. A function
#: not named here (``now()``, ``datetime('now')``, ``unixepoch()``, ``random()``,
#: ``curdate()``, ``getdate()``, a user's function…) makes a statement uncached, unless its
#: ``GenericFunction`` class says ``declcache_deterministic = True`` or the statement is
#: marked (:data:`CACHEABLE_OPTION`).
DETERMINISTIC_FUNCTIONS = frozenset(
    {
        "abs",
        "avg",
        "ceil",
        "ceiling",
        "char_length",
        "character_length",
        "coalesce",
        "concat",
        "count",
        "floor",
        "greatest",
        "ifnull",
        "instr",
        "least",
        "length",
        "lower",
        "ltrim",
        "max",
        "min",
        "mod",
        "nullif",
        "octet_length",
        "position",
        "replace",
        "round",
        "rtrim",
        "sign",
        "substr",
        "substring",
        "sum",
        "trim",
        "upper",
    }
)

#: Functions known to change by themselves: named so in the debug log (any function not in
#: :data:`DETERMINISTIC_FUNCTIONS` is refused anyway).
_VOLATILE = frozenset(
    {
        "now",
        "random",
        "rand",
        "current_timestamp",
        "current_date",
        "sysdate",
        "getdate",
        "curdate",
        "unixepoch",
        "datetime",
        "date",
        "time",
        "julianday",
        "strftime",
        "clock_timestamp",
        "statement_timestamp",
        "gen_random_uuid",
        "nextval",
        "uuid",
    }
)

#: ``statement.execution_options(declcache_cacheable=True)``: the user vouches that the
#: statement's result changes only with its model's rows (textual SQL, a function of theirs).
CACHEABLE_OPTION = "declcache_cacheable"

#: The constructs a cacheable statement is made of: selects of the model's tables, columns,
#: bound values, operators, ``IN``, ``LIKE``, ``CASE``, ``CAST``, ``ORDER BY``, ``LIMIT``.
#: Anything else (a window, ``literal_column``, textual SQL, a construct added by a future
#: SQLAlchemy) is not known to be deterministic, so it is not cached.
_DETERMINISTIC = (
    Select,
    CompoundSelect,
    Exists,
    ScalarSelect,
    Alias,
    TableClause,
    Join,
    ColumnClause,
    BindParameter,
    Null,
    True_,
    False_,
    BinaryExpression,
    BooleanClauseList,
    ClauseList,
    ExpressionClauseList,
    UnaryExpression,
    Grouping,
    Label,
    Tuple,
    Case,
    Cast,
    TypeCoerce,
    Extract,
    CollationClause,
)

#: Values whose ``repr`` is stable text: the immutable column values the codec knows.
_PLAIN = tuple(IMMUTABLE_TYPES)


class UnkeyableError(ValueError):
    """Why a statement gets no cache key."""


def _stable_text(value: Any) -> str:
    """Text equal for equal values and distinct for distinct ones, or :class:`UnkeyableError`."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__module__}.{type(value).__qualname__}.{value.name}"
    if isinstance(value, _PLAIN):
        text = repr(value)
        if " at 0x" in text:  # e.g. a datetime whose tzinfo has no repr of its own
            raise UnkeyableError(f"{text} has no stable text")
        return text
    if isinstance(value, (list, tuple)):
        inner = ",".join(_stable_text(item) for item in value)
        return f"{type(value).__name__}[{inner}]"
    if isinstance(value, (set, frozenset)):
        return "set[" + ",".join(sorted(_stable_text(item) for item in value)) + "]"
    if isinstance(value, Mapping):
        items = sorted(f"{_stable_text(k)}:{_stable_text(v)}" for k, v in value.items())
        return "map{" + ",".join(items) + "}"
    raise UnkeyableError(f"a bound {type(value).__qualname__} value has no stable text")


def _read_tables(statement: ClauseElement) -> set[TableClause]:
    tables: set[TableClause] = set()
    for found in find_tables(statement, check_columns=True, include_aliases=True):
        element: Any = found
        while isinstance(element, Alias):
            element = element.element
        if isinstance(element, TableClause):
            tables.add(element)
    return tables


def nondeterminism(expression: ClauseElement) -> str | None:
    """Why ``expression`` is not known to give the same result for the same rows, or ``None``.

    The allow-list of statement caching, for other callers: the entity codec caches a
    ``column_property`` with its row only when its expression passes this test.
    """
    try:
        for element in visitors.iterate(expression):
            _check_deterministic(element)
    except UnkeyableError as reason:
        return str(reason)
    return None


def _check_inputs(
    statement: ClauseElement, tables: frozenset[TableClause], *, vouched: bool
) -> None:
    if not vouched:
        reason = nondeterminism(statement)
        if reason is not None:
            raise UnkeyableError(reason)
    foreign = sorted(table.name for table in _read_tables(statement) - tables)
    if foreign:
        raise UnkeyableError(
            f"it reads {', '.join(foreign)}, whose changes do not reach this model's lists"
        )


def _check_deterministic(element: Any) -> None:
    """Refuse whatever is not on the allow-list: an unknown construct may read a clock."""
    if isinstance(element, TextClause):
        raise UnkeyableError("it holds textual SQL, whose tables and results are unknown")
    if isinstance(element, FunctionElement):
        name = str(getattr(element, "name", "")).lower()
        if name not in DETERMINISTIC_FUNCTIONS and not getattr(
            element, "declcache_deterministic", False
        ):
            why = (
                "changes between two runs"
                if name in _VOLATILE
                else "is not known to be deterministic"
            )
            raise UnkeyableError(f"{name or type(element).__name__}() {why}")
        return
    if isinstance(element, ColumnClause) and element.is_literal and element.name != "*":
        raise UnkeyableError(f"it holds raw SQL ({element.name!r} in literal_column)")
    if not isinstance(element, _DETERMINISTIC) and not _is_label_reference(element):
        raise UnkeyableError(f"it holds a {type(element).__name__}, not known to be deterministic")


def _is_label_reference(element: Any) -> bool:
    """``order_by("name")`` names a column of the statement: SQLAlchemy's private wrappers."""
    return type(element).__name__ in {"_label_reference", "_textual_label_reference"}


#: Statement shapes (SQL without its values) remembered with their compiled form.
SHAPES_KEPT = 1024

Shape = tuple["Compiled | None", "str | None"]
_shapes: cachetools.LRUCache[tuple[Any, ...], Shape] = cachetools.LRUCache(SHAPES_KEPT)
_shapes_lock = threading.Lock()


def _analyze(
    statement: ClauseElement,
    dialect: Dialect,
    tables: frozenset[TableClause],
    cache_key: CacheKey | None,
) -> Shape:
    """``(compiled, None)`` for a cacheable statement shape, else ``(None, reason)``."""
    try:
        _check_inputs(statement, tables, vouched=_vouched(statement))
        return statement.compile(dialect=dialect, cache_key=cache_key), None
    except UnkeyableError as reason:
        return None, str(reason)
    except Exception as error:  # a statement this dialect cannot compile offline
        return None, f"it does not compile ({error!r})"


def _shape(statement: ClauseElement, dialect: Dialect, tables: frozenset[TableClause]) -> Any:
    """``(compiled, reason, params)``: SQLAlchemy's cache key spares compiling a known shape."""
    cache_key = statement_cache_key(statement)
    if cache_key is None:  # a construct SQLAlchemy does not cache either
        compiled, reason = _analyze(statement, dialect, tables, None)
        return compiled, reason, None if compiled is None else compiled.params
    slot = (dialect, tables, _vouched(statement), cache_key.key)
    with _shapes_lock:
        known = _shapes.get(slot)
    if known is None:
        known = _analyze(statement, dialect, tables, cache_key)
        with _shapes_lock:
            _shapes[slot] = known
    compiled, reason = known
    if compiled is None:
        return None, reason, None
    return compiled, None, compiled.construct_params(extracted_parameters=cache_key.bindparams)


def _vouched(statement: ClauseElement) -> bool:
    """Whether the statement carries :data:`CACHEABLE_OPTION` (not part of its cache key)."""
    options = getattr(statement, "get_execution_options", None)
    return options is not None and options().get(CACHEABLE_OPTION) is True


def _translated(statement: ClauseElement, schemas: Mapping[str | None, str | None]) -> set[str]:
    """Where ``schemas`` sends each table ``statement`` reads (only these decide its rows)."""
    found = find_tables(statement, include_joins=True, include_aliases=True)
    return {f"{table.schema}>{schemas[table.schema]}" for table in found if table.schema in schemas}


def query_key(
    kind: str,
    statement: ClauseElement,
    dialect: Dialect,
    tables: frozenset[TableClause],
    schemas: Mapping[str | None, str | None] | None = None,
) -> str | None:
    """``kind`` plus a hash of ``statement``'s SQL and parameters; ``None`` if not cacheable.

    Args:
        kind: what the cached result is (``"list"``, ``"count"``, ``"exists"``).
        statement: the statement the repository runs.
        dialect: the dialect it runs on (the SQL text depends on it).
        tables: the tables the model's list version covers.
        schemas: the ``schema_translate_map`` it runs with (the SQL text holds none).
    """
    try:
        compiled, reason, values = _shape(statement, dialect, tables)
        if compiled is None:
            raise UnkeyableError(reason)
        params = ";".join(f"{name}={_stable_text(value)}" for name, value in sorted(values.items()))
    except UnkeyableError as why:
        logger.debug("query not cached: %s: %s", why, statement)
        return None
    except Exception as error:  # e.g. a bind parameter without a value
        logger.debug("query not cached: its parameters are incomplete (%r): %s", error, statement)
        return None
    text = f"{dialect.name}\n{compiled.string}\n{params}"
    if schemas:
        text += "\n" + ";".join(sorted(_translated(statement, schemas)))
    return f"{kind}:{hashlib.sha256(text.encode()).hexdigest()[:32]}"
