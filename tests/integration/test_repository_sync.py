"""SQLAlchemySyncRepository on every cache backend, over SQLite and PostgreSQL.

Every hit is proven the same way: the read runs in a FRESH session (so the session's identity
map cannot answer) and the engine sent no SELECT of the table (``before_cursor_execute``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import inspect
from sqlalchemy.orm.exc import DetachedInstanceError

from declcache import CacheConfig, NotFoundError
from declcache.config import SQLAlchemySyncConfig
from tests.integration._repo_models import (
    Author,
    AuthorFactory,
    AuthorRepo,
    Base,
    Book,
    BookFactory,
    BookRepo,
    Membership,
    MembershipFactory,
    MembershipRepo,
    Probe,
    ProbeRepo,
    reset_factories,
    seed,
    selects,
    values,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.integration.conftest import StatementLog

AUTHORS = "repo_authors"


@pytest.fixture(params=["memory", "redis", "memcached", "valkey"])
def cache_backend(request: pytest.FixtureRequest) -> str:
    """Memory, Redis, Memcached and Valkey; dbm is covered by backends/ and test_invalidation.py."""
    return str(request.param)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/repo.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def db(db_url: str, cache_config: CacheConfig) -> Iterator[SQLAlchemySyncConfig]:
    config = SQLAlchemySyncConfig(connection_string=db_url, cache_config=cache_config)
    config.drop_all(Base.metadata)
    config.create_all(Base.metadata)
    reset_factories()
    yield config
    config.drop_all(Base.metadata)
    config.dispose()


@pytest.fixture
def sent(db: SQLAlchemySyncConfig, statements: Callable[..., StatementLog]) -> StatementLog:
    return statements(db.engine)


def authors(db: SQLAlchemySyncConfig, count: int) -> list[Author]:
    made = AuthorFactory.build_batch(count)
    seed(db, *made)
    return made


def read(db: SQLAlchemySyncConfig, sent: StatementLog, action: Callable[[Any], Any]) -> Any:
    """Run ``action(session)`` in a fresh session; return ``(result, SELECTs of authors)``."""
    sent.clear()
    with db.get_session() as session:
        result = action(session)
    return result, selects(sent, AUTHORS)


# -- get ---------------------------------------------------------------------------------------


def test_get_reads_through_the_cache(db: SQLAlchemySyncConfig, sent: StatementLog) -> None:
    first, _ = authors(db, 2)

    loaded, queries = read(db, sent, lambda s: AuthorRepo(session=s).get(1))
    assert queries == 1
    assert values(loaded) == values(first)

    cached, queries = read(db, sent, lambda s: AuthorRepo(session=s).get(1))
    assert queries == 0
    assert values(cached) == values(first)
    assert inspect(cached).detached


class CountingStore:
    """The real store of a model, counting its calls: each call is one backend round trip."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return method(*args, **kwargs)

        return counted


def count_backend_calls(db: SQLAlchemySyncConfig, model: type) -> CountingStore:
    manager = db.cache_manager
    assert manager is not None
    cache = manager._cache(model)
    assert cache is not None
    counting = CountingStore(cache.store.inner)
    cache.store.inner = counting
    return counting


def test_a_hit_is_one_backend_call_and_a_miss_two(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    authors(db, 3)
    backend = count_backend_calls(db, Author)
    read(db, sent, lambda s: AuthorRepo(session=s).get(3))  # both tokens exist from now on
    read(db, sent, lambda s: AuthorRepo(session=s).list(order_by=Author.id))

    backend.calls.clear()
    _, queries = read(db, sent, lambda s: AuthorRepo(session=s).get(1))
    assert queries == 1
    assert backend.calls == ["get_many", "compare_and_set"]  # the look-up is not repeated

    backend.calls.clear()
    _, queries = read(db, sent, lambda s: AuthorRepo(session=s).get(1))
    assert queries == 0
    assert backend.calls == ["get_many"]

    backend.calls.clear()
    _, queries = read(db, sent, lambda s: AuthorRepo(session=s).list(Author.id > 1))
    assert queries == 1
    assert backend.calls == ["get_many", "write_many"]  # one look-up, one unconditional write
    backend.calls.clear()
    found, queries = read(db, sent, lambda s: AuthorRepo(session=s).list(Author.id > 1))
    assert (queries, backend.calls) == (0, ["get_many"])
    assert [author.id for author in found] == [2, 3]


def test_hits_of_one_cached_payload_are_independent_instances(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    authors(db, 2)
    read(db, sent, lambda s: AuthorRepo(session=s).get(1))
    read(db, sent, lambda s: AuthorRepo(session=s).list(order_by=Author.id))

    first, _ = read(db, sent, lambda s: AuthorRepo(session=s).get(1))
    second, queries = read(db, sent, lambda s: AuthorRepo(session=s).get(1))
    assert queries == 0
    assert first is not second
    assert inspect(first).dict is not inspect(second).dict
    first.name = "changed in memory only"
    assert second.name != first.name
    listed, queries = read(db, sent, lambda s: AuthorRepo(session=s).list(order_by=Author.id))
    again, _ = read(db, sent, lambda s: AuthorRepo(session=s).list(order_by=Author.id))
    assert queries == 0
    assert all(a is not b for a, b in zip(listed, again, strict=True))
    assert again[0].name == second.name
    assert not inspect(again[0]).modified


def test_get_of_a_missing_row_raises_and_is_not_cached(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    authors(db, 1)
    for _ in range(2):
        with pytest.raises(NotFoundError):
            read(db, sent, lambda s: AuthorRepo(session=s).get(999))
        assert selects(sent, AUTHORS) == 1


def test_cache_not_found_caches_the_miss_until_an_insert(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    def probe(session: Any) -> Probe:
        return ProbeRepo(session=session).get(5)

    for expected_queries in (1, 0):
        sent.clear()
        with pytest.raises(NotFoundError), db.get_session() as session:
            probe(session)
        assert selects(sent, "repo_probes") == expected_queries

    seed(db, Probe(id=5, label="now here"))
    sent.clear()
    with db.get_session() as session:
        assert probe(session).label == "now here"
    assert selects(sent, "repo_probes") == 1


def test_use_cache_false_always_reads_the_database(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    authors(db, 1)
    read(db, sent, lambda s: AuthorRepo(session=s).get(1))
    for _ in range(2):
        _, queries = read(db, sent, lambda s: AuthorRepo(session=s).get(1, use_cache=False))
        assert queries == 1
    _, queries = read(db, sent, lambda s: AuthorRepo(session=s).list(use_cache=False))
    assert queries == 1


# -- get_many ----------------------------------------------------------------------------------


def test_get_many_keeps_order_and_queries_the_misses_once(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    made = {author.id: author for author in authors(db, 5)}
    read(db, sent, lambda s: [AuthorRepo(session=s).get(i) for i in (2, 4)])

    wanted = [5, 2, 999, 4, 1]
    found, queries = read(db, sent, lambda s: AuthorRepo(session=s).get_many(wanted))
    assert queries == 1
    assert [None if a is None else a.id for a in found] == [5, 2, None, 4, 1]
    assert values(found[0]) == values(made[5])

    found, queries = read(db, sent, lambda s: AuthorRepo(session=s).get_many([1, 2, 4, 5]))
    assert queries == 0
    assert [a.id for a in found] == [1, 2, 4, 5]


def test_composite_primary_keys(db: SQLAlchemySyncConfig, sent: StatementLog) -> None:
    seed(db, *MembershipFactory.build_batch(4))  # acme/1, globex/2, acme/3, globex/4
    wanted = [("globex", 2), ("acme", 99), ("acme", 1)]

    def many(session: Any) -> list[Membership | None]:
        return MembershipRepo(session=session).get_many(wanted)

    for _expected_queries in (1, 0):
        sent.clear()
        with db.get_session() as session:
            found = many(session)
        assert [m and (m.org, m.user) for m in found] == [("globex", 2), None, ("acme", 1)]
        # the miss of ("acme", 99) is not cached, so the second call still asks for it
        assert selects(sent, "repo_memberships") == 1
    sent.clear()
    with db.get_session() as session:
        assert MembershipRepo(session=session).get(("acme", 3)).user == 3
    with db.get_session() as session:
        assert MembershipRepo(session=session).get(("acme", 3)).role == "member"
    assert selects(sent, "repo_memberships") == 1


# -- get_one -----------------------------------------------------------------------------------


def test_get_one_by_a_key_is_cached_and_by_other_fields_is_queried(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    made = authors(db, 3)
    email, name = made[1].email, made[1].name
    read(db, sent, lambda s: AuthorRepo(session=s).get(2))  # the entity itself is cached

    for expected in (1, 0):  # the email pointer is filled, then served
        found, queries = read(db, sent, lambda s: AuthorRepo(session=s).get_one(email=email))
        assert (found.id, queries) == (2, expected)
    found, queries = read(db, sent, lambda s: AuthorRepo(session=s).get_one(id=2))
    assert (found.email, queries) == (email, 0)
    for _ in range(2):
        found, queries = read(db, sent, lambda s: AuthorRepo(session=s).get_one(name=name))
        assert (found.id, queries) == (2, 1)
    found, queries = read(
        db, sent, lambda s: AuthorRepo(session=s).get_one_or_none(email="nobody@example.com")
    )
    assert (found, queries) == (None, 1)
    with pytest.raises(NotFoundError):
        read(db, sent, lambda s: AuthorRepo(session=s).get_one(email="nobody@example.com"))


# -- list, count, exists -----------------------------------------------------------------------


def _change(db: SQLAlchemySyncConfig, change: str) -> None:
    """Insert, update or delete one author through a plain session (the listeners' job)."""
    with db.get_session() as session:
        if change == "insert":
            session.add(Author(id=50, email="new@example.com", name="A new one"))
        elif change == "update":
            session.get(Author, 2).name = "A renamed one"  # type: ignore[union-attr]
        else:
            session.delete(session.get(Author, 2))
        session.commit()


@pytest.mark.parametrize("change", ["insert", "update", "delete"])
def test_cached_list_is_invalidated_by_a_plain_session_commit(
    db: SQLAlchemySyncConfig, sent: StatementLog, change: str
) -> None:
    authors(db, 3)

    def listing(session: Any) -> list[tuple[int, str]]:
        found = AuthorRepo(session=session).list(Author.name != "", order_by=Author.id)
        return [(a.id, a.name) for a in found]

    before, queries = read(db, sent, listing)
    assert queries == 1
    assert read(db, sent, listing) == (before, 0)

    _change(db, change)
    after, queries = read(db, sent, listing)
    assert queries == 1
    if change == "insert":
        assert after == [*before, (50, "A new one")]
    elif change == "update":
        assert after[1] == (2, "A renamed one")
    else:
        assert [a for a, _ in after] == [1, 3]
    assert read(db, sent, listing) == (after, 0)


def test_list_and_count_count_and_exists_are_cached(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    made = authors(db, 5)

    def page(session: Any) -> tuple[list[int], int]:
        repo = AuthorRepo(session=session)
        items, total = repo.list_and_count(order_by=[Author.id], limit=2, offset=1)
        return [a.id for a in items], total

    def tallies(session: Any) -> tuple[int, int, bool, bool]:
        repo = AuthorRepo(session=session)
        return (
            repo.count(),
            repo.count(Author.id > 3),
            repo.exists(email=made[0].email),
            repo.exists(email="nobody@example.com"),
        )

    assert read(db, sent, page) == (([2, 3], 5), 2)
    assert read(db, sent, page) == (([2, 3], 5), 0)
    assert read(db, sent, tallies) == ((5, 2, True, False), 3)  # count() is the page's total
    assert read(db, sent, tallies) == ((5, 2, True, False), 0)

    with db.get_session() as session:
        AuthorRepo(session=session).add(AuthorFactory.build(id=6), auto_commit=True)
    assert read(db, sent, tallies) == ((6, 3, True, False), 4)
    assert read(db, sent, page) == (([2, 3], 6), 1)  # the total is cached since tallies()


def test_an_entity_invalidation_never_leaves_a_stale_row_in_a_cached_list(
    db: SQLAlchemySyncConfig, sent: StatementLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    authors(db, 3)

    def names(session: Any) -> list[str]:
        return [a.name for a in AuthorRepo(session=session).list(order_by=Author.id)]

    read(db, sent, names)
    cached = read(db, sent, lambda s: AuthorRepo(session=s).get(2))[0]
    cached.name = "Renamed through the repository"
    with db.get_session() as session:
        AuthorRepo(session=session).update(cached, auto_commit=True)
    assert read(db, sent, names)[0][1] == "Renamed through the repository"

    # A list read whose query ran before a commit and whose fill comes after it must not
    # serve the old row afterwards.
    manager = db.cache_manager
    assert manager is not None
    original = manager.load_list

    def racing_load_list(model: type, key: str, loader: Callable[[], Any], **options: Any) -> Any:
        def loader_then_commit() -> Any:
            result = loader()
            with db.get_session() as other:
                other.get(Author, 3).name = "Renamed while the list was read"  # type: ignore[union-attr]
                other.commit()
            return result

        return original(model, key, loader_then_commit, **options)

    manager.invalidate_model(Author)  # the next list read must query
    with db.get_session() as session:
        monkeypatch.setattr(manager, "load_list", racing_load_list)
        stale = names(session)
        monkeypatch.undo()
    assert stale[2] != "Renamed while the list was read"
    fresh, queries = read(db, sent, names)
    assert fresh[2] == "Renamed while the list was read"
    assert queries == 1


# -- writes ------------------------------------------------------------------------------------


def test_add_and_add_many_flush_or_commit(db: SQLAlchemySyncConfig, sent: StatementLog) -> None:
    with db.get_session() as session:
        AuthorRepo(session=session).add(AuthorFactory.build())  # flushed, then rolled back
    with pytest.raises(NotFoundError):
        read(db, sent, lambda s: AuthorRepo(session=s).get(1))

    with db.get_session() as session:
        repo = AuthorRepo(session=session, auto_commit=True)
        added = repo.add(AuthorFactory.build(id=1))
        many = repo.add_many([AuthorFactory.build(id=2), AuthorFactory.build(id=3)])
    found, _ = read(db, sent, lambda s: AuthorRepo(session=s).get_many([1, 2, 3]))
    assert [values(a) for a in found] == [values(added), *map(values, many)]
    assert read(db, sent, lambda s: AuthorRepo(session=s).count())[0] == 3


def test_update_of_a_cached_instance_invalidates_it(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    authors(db, 2)
    read(db, sent, lambda s: AuthorRepo(session=s).get(1))
    cached, queries = read(db, sent, lambda s: AuthorRepo(session=s).get(1))
    assert queries == 0

    cached.name = "Updated"
    with db.get_session() as session:
        updated = AuthorRepo(session=session, auto_expunge=True).update(cached, auto_commit=True)
        assert updated not in session
    fresh, queries = read(db, sent, lambda s: AuthorRepo(session=s).get(1))
    assert (fresh.name, queries) == ("Updated", 1)
    assert read(db, sent, lambda s: AuthorRepo(session=s).get(1).name) == ("Updated", 0)


def test_delete_and_delete_many(db: SQLAlchemySyncConfig, sent: StatementLog) -> None:
    authors(db, 4)
    read(db, sent, lambda s: [AuthorRepo(session=s).get(i) for i in (1, 2, 3)])

    with db.get_session() as session:
        repo = AuthorRepo(session=session, auto_commit=True)
        assert repo.delete(1).id == 1
        with pytest.raises(NotFoundError):
            repo.delete(999)
        assert sorted(a.id for a in repo.delete_many([2, 3, 999])) == [2, 3]
    for ident in (1, 2, 3):
        with pytest.raises(NotFoundError):
            read(db, sent, lambda s, i=ident: AuthorRepo(session=s).get(i))
    assert read(db, sent, lambda s: AuthorRepo(session=s).count())[0] == 1

    with db.get_session() as session:
        AuthorRepo(session=session).delete(4)  # flushed only: rolled back on close
    assert read(db, sent, lambda s: AuthorRepo(session=s).get(4).id)[0] == 4


def test_auto_expunge(db: SQLAlchemySyncConfig, sent: StatementLog) -> None:
    authors(db, 2)
    with db.get_session() as session:
        kept = AuthorRepo(session=session).get(1)  # from the database: stays attached
        assert kept in session
        assert AuthorRepo(session=session).get(1) is kept  # what the session holds, as get()
    with db.get_session() as session:
        detached = AuthorRepo(session=session, auto_expunge=True).get(2)
        assert detached not in session
        assert detached.name  # every column is loaded
    with db.get_session() as session:
        cached = AuthorRepo(session=session).get(1)  # a hit: the session's, as a load
        assert cached in session
        assert inspect(cached).persistent
        assert AuthorRepo(session=session).get(1) is cached
    with db.get_session() as session:
        sent.clear()
        expunged = AuthorRepo(session=session, auto_expunge=True).get(1)  # a hit, detached
        assert selects(sent, AUTHORS) == 0
        assert expunged not in session
        assert inspect(expunged).detached
        assert expunged.name


def test_a_session_reads_its_own_uncommitted_writes_and_never_caches_them(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    made = authors(db, 2)
    read(db, sent, lambda s: AuthorRepo(session=s).get(1))
    read(db, sent, lambda s: AuthorRepo(session=s).list(order_by=Author.id))

    with db.get_session() as session:
        repo = AuthorRepo(session=session)
        author = repo.get(1, use_cache=False)
        author.name = "Uncommitted"
        repo.update(author)  # flushed, not committed
        assert repo.get(1).name == "Uncommitted"
        assert next(a.name for a in repo.list(order_by=Author.id)) == "Uncommitted"
        repo.add(AuthorFactory.build(id=60))
        assert repo.get(60).id == 60
        session.rollback()

    again, queries = read(db, sent, lambda s: AuthorRepo(session=s).get(1))
    assert (again.name, queries) == (made[0].name, 0)
    listed, queries = read(db, sent, lambda s: AuthorRepo(session=s).list(order_by=Author.id))
    assert ([a.name for a in listed], queries) == ([a.name for a in made], 0)
    with pytest.raises(NotFoundError):
        read(db, sent, lambda s: AuthorRepo(session=s).get(60))


# -- what is not cached ------------------------------------------------------------------------


@pytest.mark.parametrize("cache_backend", ["memory"])
def test_relationships_of_a_hit_load_lazily_an_expunged_one_merge_reattaches(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    (author,) = authors(db, 1)
    seed(db, BookFactory.build(author_id=author.id))
    read(db, sent, lambda s: AuthorRepo(session=s).get(1))

    with db.get_session() as session:
        sent.clear()
        cached = AuthorRepo(session=session).get(1)
        assert selects(sent, AUTHORS) == 0
        assert [book.author_id for book in cached.books] == [1]  # lazy-loaded, as for a load
        assert selects(sent, "repo_books") == 1
    with db.get_session() as session:
        expunged = AuthorRepo(session=session, auto_expunge=True).get(1)
        with pytest.raises(DetachedInstanceError):
            _ = expunged.books
        sent.clear()
        attached = session.merge(expunged, load=False)
        assert selects(sent, AUTHORS) == 0
        assert [book.author_id for book in attached.books] == [1]


class Opaque:
    """A value without a stable text: its repr is its memory address."""


class OpaqueType(sa.types.TypeDecorator[Any]):
    impl = sa.String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str:
        return "never matches"


@pytest.mark.parametrize("cache_backend", ["memory"])
@pytest.mark.parametrize(
    ("make_filter", "reason"),
    [
        (lambda: sa.text("repo_authors.name <> ''"), "textual SQL"),
        (lambda: Author.id.in_(sa.select(Book.author_id)), "reads repo_books"),
        (lambda: Author.id != sa.func.random(), "random() changes"),
        (lambda: Author.name != sa.literal(Opaque(), OpaqueType()), "no stable text"),
    ],
    ids=["text", "other-table", "volatile", "opaque-bind"],
)
def test_statements_that_cannot_be_keyed_are_not_cached(
    db: SQLAlchemySyncConfig,
    sent: StatementLog,
    caplog: pytest.LogCaptureFixture,
    make_filter: Callable[[], Any],
    reason: str,
) -> None:
    authors(db, 2)
    caplog.set_level(logging.DEBUG, logger="declcache.repository")
    for _ in range(2):
        _, queries = read(db, sent, lambda s: AuthorRepo(session=s).list(make_filter()))
        assert queries == 1
    assert any(reason in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("cache_backend", ["memory"])
def test_a_model_without_cache_meta_is_read_from_the_database(
    db: SQLAlchemySyncConfig, sent: StatementLog
) -> None:
    (author,) = authors(db, 1)
    seed(db, BookFactory.build(author_id=author.id))
    for _ in range(2):
        sent.clear()
        with db.get_session() as session:
            repo = BookRepo(session=session)
            assert repo.get(1).author_id == 1
            assert len(repo.list()) == repo.count() == 1
        assert selects(sent, "repo_books") == 3
