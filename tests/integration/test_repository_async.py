"""SQLAlchemyAsyncRepository on every cache backend, over SQLite (aiosqlite) and PostgreSQL
(asyncpg): the sync suite's cases, awaited.

Every hit is proven the same way: the read runs in a FRESH ``AsyncSession`` and the engine sent
no SELECT of the table (``before_cursor_execute`` on the async engine's sync engine).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import inspect
from sqlalchemy.orm.exc import DetachedInstanceError

from declcache import CacheConfig, NotFoundError
from declcache.config import SQLAlchemyAsyncConfig
from tests.integration._repo_models import (
    AsyncAuthorRepo,
    AsyncBookRepo,
    AsyncMembershipRepo,
    AsyncProbeRepo,
    Author,
    AuthorFactory,
    Base,
    Book,
    BookFactory,
    MembershipFactory,
    Probe,
    reset_factories,
    selects,
    values,
)

if TYPE_CHECKING:
    from tests.integration.conftest import StatementLog

AUTHORS = "repo_authors"

Action = Callable[[Any], Awaitable[Any]]


@pytest.fixture(params=["memory", "redis", "memcached", "valkey"])
def cache_backend(request: pytest.FixtureRequest) -> str:
    """Memory, Redis, Memcached and Valkey; dbm is covered by backends/ and test_invalidation.py."""
    return str(request.param)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/repo.db"
    return str(request.getfixturevalue("postgres_async_url"))


@pytest.fixture
async def db(db_url: str, cache_config: CacheConfig) -> AsyncIterator[SQLAlchemyAsyncConfig]:
    config = SQLAlchemyAsyncConfig(connection_string=db_url, cache_config=cache_config)
    await config.drop_all(Base.metadata)
    await config.create_all(Base.metadata)
    reset_factories()
    yield config
    await config.drop_all(Base.metadata)
    await config.dispose()


@pytest.fixture
def sent(db: SQLAlchemyAsyncConfig, statements: Callable[..., StatementLog]) -> StatementLog:
    return statements(db.engine.sync_engine)


async def seed(db: SQLAlchemyAsyncConfig, *items: Any) -> None:
    """Insert rows through a plain session (not a repository)."""
    async with db.get_session() as session:
        session.add_all(items)
        await session.commit()


async def authors(db: SQLAlchemyAsyncConfig, count: int) -> list[Author]:
    made = AuthorFactory.build_batch(count)
    await seed(db, *made)
    return made


async def read(db: SQLAlchemyAsyncConfig, sent: StatementLog, action: Action) -> Any:
    """Await ``action(session)`` in a fresh session; return ``(result, SELECTs of authors)``."""
    sent.clear()
    async with db.get_session() as session:
        result = await action(session)
    return result, selects(sent, AUTHORS)


def repo(session: Any, **options: Any) -> AsyncAuthorRepo:
    return AsyncAuthorRepo(session=session, **options)


# -- get ---------------------------------------------------------------------------------------


async def test_get_reads_through_the_cache(db: SQLAlchemyAsyncConfig, sent: StatementLog) -> None:
    first, _ = await authors(db, 2)

    loaded, queries = await read(db, sent, lambda s: repo(s).get(1))
    assert queries == 1
    assert values(loaded) == values(first)

    cached, queries = await read(db, sent, lambda s: repo(s).get(1))
    assert queries == 0
    assert values(cached) == values(first)
    assert inspect(cached).detached


async def test_hits_are_answered_on_the_event_loop_without_a_worker_thread(
    db: SQLAlchemyAsyncConfig,
    sent: StatementLog,
    cache_backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await authors(db, 3)
    await read(db, sent, lambda s: repo(s).get_many([1, 3]))
    await read(db, sent, lambda s: repo(s).list(order_by=Author.id))
    hops: list[Any] = []
    to_thread = asyncio.to_thread

    async def counted(function: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(function)
        return await to_thread(function, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)

    found, queries = await read(db, sent, lambda s: repo(s).get(1))
    listed, list_queries = await read(db, sent, lambda s: repo(s).list(order_by=Author.id))
    many, many_queries = await read(db, sent, lambda s: repo(s).get_many([3, 1]))

    assert (queries, list_queries, many_queries) == (0, 0, 0)
    assert found.id == 1
    assert [author.id for author in listed] == [1, 2, 3]
    assert [author.id for author in many] == [3, 1]
    # Memory answers in process; Redis and Valkey are awaited through redis.asyncio and
    # valkey.asyncio. Memcached has no asyncio client here: its look-ups hop to a worker thread.
    assert len(hops) == (3 if cache_backend == "memcached" else 0)


@pytest.mark.parametrize("cache_backend", ["redis", "valkey"])  # the native async stores
async def test_an_awaited_redis_look_up_that_fails_reads_the_database(
    db: SQLAlchemyAsyncConfig, sent: StatementLog
) -> None:
    first, *_ = await authors(db, 2)
    await read(db, sent, lambda s: repo(s).get(1))
    manager = db.cache_manager
    assert manager is not None
    cache = manager._cache(Author)
    assert cache is not None
    reader = cache.astore.inner  # the native redis.asyncio (valkey.asyncio) store
    reader._connection_kwargs = {**reader._connection_kwargs, "port": 1}
    reader._clients.clear()  # the next look-up connects to a closed port

    found, queries = await read(db, sent, lambda s: repo(s).get(1))

    assert queries == 1
    assert values(found) == values(first)
    assert manager.stats()["Author"].errors >= 1
    assert manager.breaker_stats().state == "open"


async def test_get_of_a_missing_row_raises_and_is_not_cached(
    db: SQLAlchemyAsyncConfig, sent: StatementLog
) -> None:
    await authors(db, 1)
    for _ in range(2):
        with pytest.raises(NotFoundError):
            await read(db, sent, lambda s: repo(s).get(999))
        assert selects(sent, AUTHORS) == 1


async def test_cache_not_found_caches_the_miss_until_an_insert(
    db: SQLAlchemyAsyncConfig, sent: StatementLog
) -> None:
    for expected_queries in (1, 0):
        sent.clear()
        with pytest.raises(NotFoundError):
            async with db.get_session() as session:
                await AsyncProbeRepo(session=session).get(5)
        assert selects(sent, "repo_probes") == expected_queries

    await seed(db, Probe(id=5, label="now here"))
    sent.clear()
    async with db.get_session() as session:
        assert (await AsyncProbeRepo(session=session).get(5)).label == "now here"
    assert selects(sent, "repo_probes") == 1


async def test_use_cache_false_always_reads_the_database(
    db: SQLAlchemyAsyncConfig, sent: StatementLog
) -> None:
    await authors(db, 1)
    await read(db, sent, lambda s: repo(s).get(1))
    for _ in range(2):
        _, queries = await read(db, sent, lambda s: repo(s).get(1, use_cache=False))
        assert queries == 1
    _, queries = await read(db, sent, lambda s: repo(s).list(use_cache=False))
    assert queries == 1


# -- get_many ----------------------------------------------------------------------------------


async def test_get_many_keeps_order_and_queries_the_misses_once(
    db: SQLAlchemyAsyncConfig, sent: StatementLog
) -> None:
    made = {author.id: author for author in await authors(db, 5)}
    await read(db, sent, lambda s: repo(s).get(2))
    await read(db, sent, lambda s: repo(s).get(4))

    found, queries = await read(db, sent, lambda s: repo(s).get_many([5, 2, 999, 4, 1]))
    assert queries == 1
    assert [None if a is None else a.id for a in found] == [5, 2, None, 4, 1]
    assert values(found[0]) == values(made[5])

    found, queries = await read(db, sent, lambda s: repo(s).get_many([1, 2, 4, 5]))
    assert queries == 0
    assert [a.id for a in found] == [1, 2, 4, 5]


async def test_composite_primary_keys(db: SQLAlchemyAsyncConfig, sent: StatementLog) -> None:
    await seed(db, *MembershipFactory.build_batch(4))  # acme/1, globex/2, acme/3, globex/4
    wanted = [("globex", 2), ("acme", 99), ("acme", 1)]
    for _ in range(2):
        sent.clear()
        async with db.get_session() as session:
            found = await AsyncMembershipRepo(session=session).get_many(wanted)
        assert [m and (m.org, m.user) for m in found] == [("globex", 2), None, ("acme", 1)]
        assert selects(sent, "repo_memberships") == 1  # the miss of acme/99 is not cached
    sent.clear()
    for _ in range(2):
        async with db.get_session() as session:
            assert (await AsyncMembershipRepo(session=session).get(("acme", 3))).user == 3
    assert selects(sent, "repo_memberships") == 1


# -- get_one -----------------------------------------------------------------------------------


async def test_get_one_by_a_key_is_cached_and_by_other_fields_is_queried(
    db: SQLAlchemyAsyncConfig, sent: StatementLog
) -> None:
    made = await authors(db, 3)
    email, name = made[1].email, made[1].name
    await read(db, sent, lambda s: repo(s).get(2))  # the entity itself is cached

    for expected in (1, 0):  # the email pointer is filled, then served
        found, queries = await read(db, sent, lambda s: repo(s).get_one(email=email))
        assert (found.id, queries) == (2, expected)
    found, queries = await read(db, sent, lambda s: repo(s).get_one(id=2))
    assert (found.email, queries) == (email, 0)
    for _ in range(2):
        found, queries = await read(db, sent, lambda s: repo(s).get_one(name=name))
        assert (found.id, queries) == (2, 1)
    found, queries = await read(
        db, sent, lambda s: repo(s).get_one_or_none(email="nobody@example.com")
    )
    assert (found, queries) == (None, 1)
    with pytest.raises(NotFoundError):
        await read(db, sent, lambda s: repo(s).get_one(email="nobody@example.com"))


@pytest.mark.parametrize("cache_backend", ["redis", "valkey"])  # the native async stores
async def test_a_hit_by_a_key_set_follows_its_pointer_without_looking_up_again(
    db: SQLAlchemyAsyncConfig, sent: StatementLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = await authors(db, 2)
    email = made[1].email
    for _ in range(2):  # the entity, then the email pointer, are filled
        await read(db, sent, lambda s: repo(s).get_one(email=email))
    manager = db.cache_manager
    assert manager is not None
    cache = manager._cache(Author)
    assert cache is not None
    reader = cache.astore.inner  # the native redis.asyncio (valkey.asyncio) store
    calls: list[list[str]] = []
    awaited, fetched = reader.get_many, cache.store.inner.get_many

    async def counted_await(keys: list[str]) -> list[bytes | None]:
        calls.append(keys)
        return await awaited(keys)

    def counted_fetch(keys: list[str]) -> list[bytes | None]:
        calls.append(keys)
        return fetched(keys)

    monkeypatch.setattr(reader, "get_many", counted_await)
    monkeypatch.setattr(cache.store.inner, "get_many", counted_fetch)

    found, queries = await read(db, sent, lambda s: repo(s).get_one(email=email))

    assert (found.id, queries) == (2, 0)
    # The awaited MGET read the token and the pointer; only the row it points to is left.
    assert [len(keys) for keys in calls] == [2, 1]


# -- list, count, exists -----------------------------------------------------------------------


async def _change(db: SQLAlchemyAsyncConfig, change: str) -> None:
    """Insert, update or delete one author through a plain session (the listeners' job)."""
    async with db.get_session() as session:
        if change == "insert":
            session.add(Author(id=50, email="new@example.com", name="A new one"))
        elif change == "update":
            (await session.get(Author, 2)).name = "A renamed one"  # type: ignore[union-attr]
        else:
            await session.delete(await session.get(Author, 2))
        await session.commit()


async def _listing(session: Any) -> list[tuple[int, str]]:
    found = await repo(session).list(Author.name != "", order_by=Author.id)
    return [(a.id, a.name) for a in found]


@pytest.mark.parametrize("change", ["insert", "update", "delete"])
async def test_cached_list_is_invalidated_by_a_plain_session_commit(
    db: SQLAlchemyAsyncConfig, sent: StatementLog, change: str
) -> None:
    await authors(db, 3)
    before, queries = await read(db, sent, _listing)
    assert queries == 1
    assert await read(db, sent, _listing) == (before, 0)

    await _change(db, change)
    after, queries = await read(db, sent, _listing)
    assert queries == 1
    if change == "insert":
        assert after == [*before, (50, "A new one")]
    elif change == "update":
        assert after[1] == (2, "A renamed one")
    else:
        assert [a for a, _ in after] == [1, 3]
    assert await read(db, sent, _listing) == (after, 0)


async def test_list_and_count_count_and_exists_are_cached(
    db: SQLAlchemyAsyncConfig, sent: StatementLog
) -> None:
    made = await authors(db, 5)

    async def page(session: Any) -> tuple[list[int], int]:
        items, total = await repo(session).list_and_count(order_by=[Author.id], limit=2, offset=1)
        return [a.id for a in items], total

    async def tallies(session: Any) -> tuple[int, int, bool, bool]:
        authors_ = repo(session)
        return (
            await authors_.count(),
            await authors_.count(Author.id > 3),
            await authors_.exists(email=made[0].email),
            await authors_.exists(email="nobody@example.com"),
        )

    assert await read(db, sent, page) == (([2, 3], 5), 2)
    assert await read(db, sent, page) == (([2, 3], 5), 0)
    assert await read(db, sent, tallies) == ((5, 2, True, False), 3)  # count() was cached
    assert await read(db, sent, tallies) == ((5, 2, True, False), 0)

    async with db.get_session() as session:
        await repo(session).add(AuthorFactory.build(id=6), auto_commit=True)
    assert await read(db, sent, tallies) == ((6, 3, True, False), 4)
    assert await read(db, sent, page) == (([2, 3], 6), 1)


async def test_an_entity_invalidation_never_leaves_a_stale_row_in_a_cached_list(
    db: SQLAlchemyAsyncConfig, sent: StatementLog
) -> None:
    await authors(db, 3)

    async def names(session: Any) -> list[str]:
        return [a.name for a in await repo(session).list(order_by=Author.id)]

    await read(db, sent, names)
    loaded, _ = await read(db, sent, lambda s: repo(s).get(2))
    loaded.name = "Renamed through the repository"
    async with db.get_session() as session:
        await repo(session).update(loaded, auto_commit=True)
    listed, queries = await read(db, sent, names)
    assert (listed[1], queries) == ("Renamed through the repository", 1)
    assert await read(db, sent, names) == (listed, 0)


# -- writes ------------------------------------------------------------------------------------


async def test_add_and_add_many_flush_or_commit(
    db: SQLAlchemyAsyncConfig, sent: StatementLog
) -> None:
    async with db.get_session() as session:
        await repo(session).add(AuthorFactory.build())  # flushed, then rolled back
    with pytest.raises(NotFoundError):
        await read(db, sent, lambda s: repo(s).get(1))

    async with db.get_session() as session:
        authors_ = repo(session, auto_commit=True)
        added = await authors_.add(AuthorFactory.build(id=1))
        many = await authors_.add_many([AuthorFactory.build(id=2), AuthorFactory.build(id=3)])
    found, _ = await read(db, sent, lambda s: repo(s).get_many([1, 2, 3]))
    assert [values(a) for a in found] == [values(added), *map(values, many)]
    assert (await read(db, sent, lambda s: repo(s).count()))[0] == 3


async def test_update_of_a_cached_instance_invalidates_it(
    db: SQLAlchemyAsyncConfig, sent: StatementLog
) -> None:
    await authors(db, 2)
    await read(db, sent, lambda s: repo(s).get(1))
    cached, queries = await read(db, sent, lambda s: repo(s).get(1))
    assert queries == 0

    cached.name = "Updated"
    async with db.get_session() as session:
        updated = await repo(session, auto_expunge=True).update(cached, auto_commit=True)
        assert updated not in session
    fresh, queries = await read(db, sent, lambda s: repo(s).get(1))
    assert (fresh.name, queries) == ("Updated", 1)
    again, queries = await read(db, sent, lambda s: repo(s).get(1))
    assert (again.name, queries) == ("Updated", 0)


async def test_delete_and_delete_many(db: SQLAlchemyAsyncConfig, sent: StatementLog) -> None:
    await authors(db, 4)
    for ident in (1, 2, 3):
        await read(db, sent, lambda s, i=ident: repo(s).get(i))

    async with db.get_session() as session:
        authors_ = repo(session, auto_commit=True)
        assert (await authors_.delete(1)).id == 1
        with pytest.raises(NotFoundError):
            await authors_.delete(999)
        assert sorted(a.id for a in await authors_.delete_many([2, 3, 999])) == [2, 3]
    for ident in (1, 2, 3):
        with pytest.raises(NotFoundError):
            await read(db, sent, lambda s, i=ident: repo(s).get(i))
    assert (await read(db, sent, lambda s: repo(s).count()))[0] == 1

    async with db.get_session() as session:
        await repo(session).delete(4)  # flushed only: rolled back on close
    assert (await read(db, sent, lambda s: repo(s).get(4)))[0].id == 4


async def test_auto_expunge(db: SQLAlchemyAsyncConfig, sent: StatementLog) -> None:
    await authors(db, 2)
    async with db.get_session() as session:
        kept = await repo(session).get(1)  # from the database: stays attached
        assert kept in session
        assert await repo(session).get(1) is kept  # what the session holds, as get()
    async with db.get_session() as session:
        detached = await repo(session, auto_expunge=True).get(2)
        assert detached not in session
        assert detached.name  # every column is loaded
    async with db.get_session() as session:
        cached = await repo(session).get(1)  # a hit: the session's, as a load
        assert cached in session
        assert inspect(cached).persistent
        assert await repo(session).get(1) is cached
    async with db.get_session() as session:
        sent.clear()
        expunged = await repo(session, auto_expunge=True).get(1)  # a hit, detached
        assert selects(sent, AUTHORS) == 0
        assert expunged not in session
        assert inspect(expunged).detached
        assert expunged.name


async def test_a_session_reads_its_own_uncommitted_writes_and_never_caches_them(
    db: SQLAlchemyAsyncConfig, sent: StatementLog
) -> None:
    made = await authors(db, 2)
    await read(db, sent, lambda s: repo(s).get(1))
    await read(db, sent, lambda s: repo(s).list(order_by=Author.id))

    async with db.get_session() as session:
        authors_ = repo(session)
        author = await authors_.get(1, use_cache=False)
        author.name = "Uncommitted"
        await authors_.update(author)  # flushed, not committed
        assert (await authors_.get(1)).name == "Uncommitted"
        assert (await authors_.list(order_by=Author.id))[0].name == "Uncommitted"
        await authors_.add(AuthorFactory.build(id=60))
        assert (await authors_.get(60)).id == 60
        await session.rollback()

    again, queries = await read(db, sent, lambda s: repo(s).get(1))
    assert (again.name, queries) == (made[0].name, 0)
    listed, queries = await read(db, sent, lambda s: repo(s).list(order_by=Author.id))
    assert ([a.name for a in listed], queries) == ([a.name for a in made], 0)
    with pytest.raises(NotFoundError):
        await read(db, sent, lambda s: repo(s).get(60))


# -- what is not cached ------------------------------------------------------------------------


@pytest.mark.parametrize("cache_backend", ["memory"])
async def test_relationships_of_a_hit_load_lazily_an_expunged_one_merge_reattaches(
    db: SQLAlchemyAsyncConfig, sent: StatementLog
) -> None:
    (author,) = await authors(db, 1)
    await seed(db, BookFactory.build(author_id=author.id))
    await read(db, sent, lambda s: repo(s).get(1))

    async with db.get_session() as session:
        sent.clear()
        cached = await repo(session).get(1)
        assert selects(sent, AUTHORS) == 0
        books = await session.run_sync(lambda _: cached.books)  # lazy-loaded, as for a load
        assert [book.author_id for book in books] == [1]
        assert selects(sent, "repo_books") == 1
    async with db.get_session() as session:
        expunged = await repo(session, auto_expunge=True).get(1)
        with pytest.raises(DetachedInstanceError):
            _ = expunged.books
        sent.clear()
        attached = await session.merge(expunged, load=False)
        assert selects(sent, AUTHORS) == 0
        await session.refresh(attached, ["books"])
        assert [book.author_id for book in attached.books] == [1]


@pytest.mark.parametrize("cache_backend", ["memory", "redis"])
@pytest.mark.parametrize(
    ("make_filter", "reason"),
    [
        (lambda: sa.text("repo_authors.name <> ''"), "textual SQL"),
        (lambda: Author.id.in_(sa.select(Book.author_id)), "reads repo_books"),
        (lambda: Author.id != sa.func.random(), "random() changes"),
    ],
    ids=["text", "other-table", "volatile"],
)
async def test_statements_that_cannot_be_keyed_are_not_cached(
    db: SQLAlchemyAsyncConfig,
    sent: StatementLog,
    caplog: pytest.LogCaptureFixture,
    make_filter: Callable[[], Any],
    reason: str,
) -> None:
    await authors(db, 2)
    caplog.set_level(logging.DEBUG, logger="declcache.repository")
    for _ in range(2):
        _, queries = await read(db, sent, lambda s: repo(s).list(make_filter()))
        assert queries == 1
    assert any(reason in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("cache_backend", ["memory"])
async def test_a_model_without_cache_meta_is_read_from_the_database(
    db: SQLAlchemyAsyncConfig, sent: StatementLog
) -> None:
    (author,) = await authors(db, 1)
    await seed(db, BookFactory.build(author_id=author.id))
    for _ in range(2):
        sent.clear()
        async with db.get_session() as session:
            books = AsyncBookRepo(session=session)
            assert (await books.get(1)).author_id == 1
            assert len(await books.list()) == await books.count() == 1
        assert selects(sent, "repo_books") == 3
