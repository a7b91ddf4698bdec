"""The cases of issue 15: a parent and its cached collection, cached and uncached.

``author.posts`` (10 posts each) is declared in ``CacheMeta.cached_relationships``: on a hit
it is served from the cache as member ids, the posts read through their own entity cache.
Each cached case has its uncached twin, the same reads in a session without a manager (the
repository reads the database and the collection is a lazy load, or a ``selectinload`` for
``preload``), so that the suite can print their ratio; and the list as one would write it by
hand without a cache, a query with ``selectinload``. The lists read 20 parents, at one of
five offsets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from bench import _env
from bench._cases import Case
from bench._env import Author
from declcache.repository import SQLAlchemySyncRepository

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from bench._cases import Stack

#: Parents per list read; lists start at one of ``AUTHORS // LISTED`` offsets.
LISTED = 20
PRELOAD = ("posts",)


class AuthorRepository(SQLAlchemySyncRepository[Author]):
    model_type = Author


def _author(ident: int) -> int:
    return ident % _env.AUTHORS + 1


def _titles(author: Author) -> list[str]:
    """Access the collection, and a column of every member."""
    return [post.title for post in author.posts]


def read_one(sessions: sessionmaker[Session], ident: int) -> list[str]:
    with sessions() as session:
        return _titles(AuthorRepository(session=session).get(_author(ident)))


def _offset(ident: int) -> int:
    return (ident % (_env.AUTHORS // LISTED)) * LISTED


def read_list(sessions: sessionmaker[Session], ident: int, *, preload: bool) -> list[str]:
    options: dict[str, Any] = {"preload": PRELOAD} if preload else {}
    with sessions() as session:
        authors = AuthorRepository(session=session).list(
            order_by=Author.id, limit=LISTED, offset=_offset(ident), **options
        )
        return [title for author in authors for title in _titles(author)]


def select_list(sessions: sessionmaker[Session], ident: int) -> list[str]:
    """The list and its posts in two queries, ``selectinload``: no repository, no cache."""
    statement = (
        select(Author)
        .order_by(Author.id)
        .limit(LISTED)
        .offset(_offset(ident))
        .options(selectinload(Author.posts))
    )
    with sessions() as session:
        return [title for author in session.scalars(statement) for title in _titles(author)]


def warm(sessions: sessionmaker[Session]) -> None:
    """Every author and its posts read twice, every list read with and without preload."""
    for _ in range(2):
        for ident in range(_env.AUTHORS):
            read_one(sessions, ident)
    for ident in range(_env.AUTHORS // LISTED):
        for preload in (True, False):
            read_list(sessions, ident, preload=preload)


def uncached_cases(stack: Stack, db: str) -> list[Case]:
    """The reads of :func:`cached_cases` in a session without a manager."""
    plain = stack.sessions(db)
    return [
        Case("collections", f"get + 10 posts uncached {db}", run=lambda i: read_one(plain, i)),
        Case(
            "20 parents",
            f"list(20) + posts, preload, uncached {db}",
            run=lambda i: read_list(plain, i, preload=True),
            ops_divisor=4,
        ),
        Case(
            "20 parents",
            f"list(20) + posts, lazy, uncached {db}",
            run=lambda i: read_list(plain, i, preload=False),
            ops_divisor=4,
        ),
        Case(
            "20 parents",
            f"select(20) + posts, selectinload {db}",
            run=lambda i: select_list(plain, i),
            ops_divisor=4,
        ),
    ]


def cached_cases(stack: Stack, backend: str, db: str) -> list[Case]:
    """A parent hit and its 10 posts; 20 parents and their posts, with and without preload."""
    manager = stack.manager(backend, f"posts-{backend}-{db}")
    sessions = stack.sessions(db, manager)
    warm(sessions)
    return [
        Case(
            "collections",
            f"get + 10 posts hit {backend} {db}",
            run=lambda i: read_one(sessions, i),
        ),
        Case(
            "20 parents",
            f"list(20) + posts, preload, hit {backend} {db}",
            run=lambda i: read_list(sessions, i, preload=True),
            ops_divisor=4,
        ),
        Case(
            "20 parents",
            f"list(20) + posts, lazy, hit {backend} {db}",
            run=lambda i: read_list(sessions, i, preload=False),
            ops_divisor=4,
        ),
    ]


def comparisons(
    by_name: dict[str, float], databases: list[str], backends: list[str]
) -> list[tuple[str, str, str]]:
    """``(what, ratio, medians)`` of each cached read of issue 15 against its twin."""
    rows: list[tuple[str, str, str]] = []

    def ratio(label: str, slower: str, faster: str) -> None:
        if slower in by_name and faster in by_name:
            rows.append(
                (
                    label,
                    f"{by_name[slower] / by_name[faster]:.2f}x",
                    f"{by_name[slower]:.1f} / {by_name[faster]:.1f} µs",
                )
            )

    for db in databases:
        for backend in backends:
            for mode in ("sync", "async"):
                ratio(
                    f"repo.get use_cache=False / hit joining the session, {backend} {db} {mode}",
                    f"repo.get {db} {mode}, use_cache=False",
                    f"repo.get {backend} {db} {mode}",
                )
            ratio(
                f"get + 10 posts: uncached / hit, {backend} {db}",
                f"get + 10 posts uncached {db}",
                f"get + 10 posts hit {backend} {db}",
            )
            for loading in ("preload", "lazy"):
                ratio(
                    f"list(20) + posts, {loading}: uncached / hit, {backend} {db}",
                    f"list(20) + posts, {loading}, uncached {db}",
                    f"list(20) + posts, {loading}, hit {backend} {db}",
                )
            ratio(
                f"list(20) + posts: selectinload / preload hit, {backend} {db}",
                f"select(20) + posts, selectinload {db}",
                f"list(20) + posts, preload, hit {backend} {db}",
            )
            ratio(
                f"list(20) + posts, hit: lazy / preload, {backend} {db}",
                f"list(20) + posts, lazy, hit {backend} {db}",
                f"list(20) + posts, preload, hit {backend} {db}",
            )
    return rows
