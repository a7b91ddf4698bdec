"""Every private API of another library that declcache relies on, in one place.

Each was chosen over a public alternative for a reason given beside it (speed on the hit path,
or no public way at all). A new release of SQLAlchemy, dogpile.cache or redis-py may move any
of them, so ``tests/unit/test_private_apis.py`` calls each one against the installed versions
and fails, naming it, when one is gone. Nothing else in the package touches a private name of
another library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

if TYPE_CHECKING:
    from collections import OrderedDict
    from collections.abc import Callable

    import cachetools
    from sqlalchemy.engine import Connection, Dialect, Engine
    from sqlalchemy.orm import InstanceState, Session
    from sqlalchemy.pool import PoolProxiedConnection
    from sqlalchemy.sql import ClauseElement
    from sqlalchemy.sql.cache_key import CacheKey

__all__ = [
    "after_dbapi_commit",
    "await_only",
    "cache_items",
    "class_loader",
    "dbm_opener",
    "held_connection",
    "in_greenlet",
    "load_as_persistent",
    "lru_order",
    "refresh_as_loaded",
    "resp3_parser",
    "session_is_clean",
    "set_class_loader",
    "set_push_handler",
    "socket_of",
    "sqlite_in_transaction",
    "statement_cache_key",
]

# ``in_greenlet``/``await_only`` (SQLAlchemy's asyncio bridge): the session listeners run
# inside the greenlet of an ``AsyncSession`` and await the commit's invalidation there.


def cache_items(cache: cachetools.Cache[Any, Any]) -> dict[Any, Any]:
    """The dict a cachetools cache keeps its items in (``Cache.__data``).

    Every cache hit reads two such caches (the memory backend's entries, a model's parsed
    payloads): a plain ``dict.get`` on it costs a fraction of ``Cache.__getitem__``'s two
    Python frames. Reads only; every write goes through the cache, which keeps its bounds.
    """
    items: dict[Any, Any] = cache._Cache__data  # type: ignore[attr-defined]
    return items


def lru_order(cache: cachetools.LRUCache[Any, Any]) -> OrderedDict[Any, None]:
    """The recency order of a cachetools LRU cache (``LRUCache.__order``), least recent first.

    With :func:`cache_items`, a read of the memory backend marks its key as recently used
    with one ``move_to_end`` instead of ``LRUCache.__getitem__``'s frames.
    """
    order: OrderedDict[Any, None] = cache._LRUCache__order  # type: ignore[attr-defined]
    return order


def session_is_clean(session: Session) -> bool:
    """Whether ``session`` holds no new, dirty or deleted instance.

    ``Session._is_clean()`` is one check of three internal collections; the public
    ``session.new``/``dirty``/``deleted`` each build a set, and every cached read asks.
    """
    clean: bool = session._is_clean()
    return clean


def load_as_persistent(session: Session, states: list[InstanceState[Any]]) -> None:
    """Make ``states`` persistent in ``session`` as the ORM's loader makes the rows it reads.

    Each state is new, of one class, with its dict filled and its identity key set. What
    ``loading._instance`` does then for a row the identity map does not hold:
    ``state.session_id`` set, the state put in the map by ``IdentityMap._add_unpresent``, the
    ``load`` instance event fired, then the session's ``loaded_as_persistent``; which events
    have listeners is asked once for all, as the loader asks once per query. ``load`` gets
    no query context (``None``), as ``Session.merge`` fires it for the instance it creates.
    No public API enters an instance as loaded: ``Session.add`` fires the attach events a
    load never fires, and walks the save-update cascade on every cache hit.
    """
    session_id = session.hash_key
    add = session.identity_map._add_unpresent
    for state in states:
        state.session_id = session_id
        add(state, state.key)  # type: ignore[arg-type]
    load = states[0].manager.dispatch.load
    if load:
        for state in states:
            load(state, None)
    loaded = session.dispatch.loaded_as_persistent
    if loaded:
        for state in states:
            loaded(session, state)


def refresh_as_loaded(state: InstanceState[Any], keys: list[str]) -> None:
    """Mark ``keys``, just put in ``state``'s dict, loaded: as a query refilling it does.

    ``InstanceState._commit`` is what a load calls for the attributes it refilled on an
    instance the session held (expired ones): they become committed, no longer expired.
    Then the ``refresh`` instance event fires (context ``None``: no query ran), so
    ``sqlalchemy.ext.mutable`` wraps the new values. No public API marks a value loaded
    without a history event but ``set_committed_value``, one attribute and one commit each.
    """
    state._commit(state.dict, keys)
    refresh = state.manager.dispatch.refresh
    if refresh:
        refresh(state, None, keys)


def held_connection(session: Session, bind: Engine | Connection) -> Connection | None:
    """The connection ``session``'s transaction holds for ``bind``, if it holds one yet.

    ``SessionTransaction._connections``. A schema map set on that connection
    (``session.connection(execution_options=…)``) decides what every statement of the
    transaction reads, so the cache scope needs it; ``Session.connection()``, the public way,
    would check a connection out of the pool on every cache hit that holds none yet.
    """
    transaction = session.get_transaction()
    if transaction is None:
        return None
    held = transaction._connections.get(bind)
    return None if held is None else held[0]


def sqlite_in_transaction(connection: Connection) -> bool | None:
    """Whether SQLite holds a transaction open on ``connection``; ``None`` if it cannot tell.

    pysqlite's public ``Connection.in_transaction``; SQLAlchemy's aiosqlite adapter keeps the
    aiosqlite connection, which has the same property, as ``_connection``. A transaction
    begun by SQL (the pysqlite ``BEGIN`` recipe) is known only to the DBAPI connection, and a
    fill must not come from its snapshot when it is older than the cache look-up.
    """
    dbapi: Any = connection.connection.dbapi_connection
    found = getattr(dbapi, "in_transaction", None)
    if found is None:
        found = getattr(getattr(dbapi, "_connection", None), "in_transaction", None)
    return found if isinstance(found, bool) else None


def statement_cache_key(statement: ClauseElement) -> CacheKey | None:
    """SQLAlchemy's own cache key of ``statement``: its shape, and its bound values apart.

    No public API gives it; it spares compiling a statement whose shape was seen before.
    """
    return statement._generate_cache_key()


def after_dbapi_commit(dialect: Dialect, callback: Callable[[PoolProxiedConnection], None]) -> None:
    """Call ``callback`` with the DBAPI connection right after ``dialect`` commits on it.

    Wraps this dialect instance's ``do_commit``, which every root transaction's ``COMMIT``
    goes through (``Connection.commit()``, ``engine.begin()``, a session's commit). No public
    event runs after the database committed: ``ConnectionEvents.commit`` fires *before* the
    ``COMMIT``. The connection passed is the pool's proxy, whose ``.info`` is its pool
    record's. Wrap a dialect once: each call adds a layer.
    """
    original = dialect.do_commit

    def do_commit(dbapi_connection: PoolProxiedConnection) -> None:
        original(dbapi_connection)
        callback(dbapi_connection)

    dialect.do_commit = do_commit  # type: ignore[method-assign]


def dbm_opener(backend: Any) -> Callable[[bool], Any]:
    """Dogpile's ``DBMBackend._dbm_file(write)``: the file opened under its read/write lock.

    The only way to run several steps (compare, then set) inside one hold of dogpile's lock.
    """
    opener: Callable[[bool], Any] = backend._dbm_file
    return opener


def resp3_parser(client: str) -> type:
    """redis-py's (or valkey-py's) pure-Python RESP3 parser class.

    The near cache's tracking connection needs its push handling (a push read with
    ``push_request=True`` is returned, a partly received one rewound); the default parser
    class may be the C one, which handles pushes differently.
    """
    if client == "valkey":
        from valkey._parsers import _RESP3Parser as ValkeyParser  # noqa: PLC0415

        return ValkeyParser
    from redis._parsers import _RESP3Parser as RedisParser  # noqa: PLC0415

    return RedisParser


def set_push_handler(connection: Any, handler: Callable[[Any], object]) -> None:
    """Have ``connection``'s RESP3 parser hand invalidation pushes to ``handler``.

    redis-py offers it on the parser only (``Redis.client_tracking`` does not route pushes
    of a connection we drain ourselves).
    """
    connection._parser.set_invalidation_push_handler(handler)


def socket_of(connection: Any) -> Any:
    """The socket of a redis-py connection, or ``None``: polled without redis-py's 3 syscalls."""
    return getattr(connection, "_sock", None)


def class_loader(mapper: Any, key: str) -> Callable[..., Any] | None:
    """The loader SQLAlchemy calls when relationship ``key`` of an instance is unloaded.

    It is the attribute implementation's ``callable_`` (set by the relationship's loader
    strategy). Wrapping it is the one way to serve every lazy load of a relationship — of
    any instance, however it was loaded — without a per-instance listener on the load path.
    """
    loader: Callable[..., Any] | None = getattr(mapper.class_manager[key].impl, "callable_", None)
    return loader  # ``None``: a dynamic or write-only relationship, which loads nothing


def set_class_loader(mapper: Any, key: str, loader: Callable[..., Any]) -> None:
    """Replace what :func:`class_loader` returns for ``key`` of ``mapper``'s class."""
    mapper.class_manager[key].impl.callable_ = loader
