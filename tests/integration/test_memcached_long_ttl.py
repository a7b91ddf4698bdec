"""A ttl above 30 days works on a real Memcached: the model hits, its tokens persist.

Memcached reads an expiry above 30 days (2 592 000 s) as a Unix time. Sent as seconds, a 7-day
model ttl's token expiry (ten ttls) or a 60-day entity expiry was a date in 1970: the server
dropped the write at once and every read went to the database. The Memcached store now sends
such an expiry as the absolute time it means; these tests read the expiry the server keeps
(meta-get's ``t`` flag, the seconds left) and count the SELECTs a repository sends.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest

from declcache import CacheConfig
from declcache.backends.memcached import LATEST_EXPIRY, RELATIVE_EXPIRY_LIMIT, memcached_expiry
from declcache.config import SQLAlchemySyncConfig
from tests.integration._repo_models import (
    Author,
    AuthorFactory,
    AuthorRepo,
    Base,
    reset_factories,
    selects,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.integration.conftest import StatementLog

DAY = 86_400
#: Seconds memcached's clock may differ from ours when it converts a Unix-time expiry.
CLOCK_SLACK = 120
AUTHORS = "repo_authors"


def seconds_left(address: tuple[str, int], key: str) -> int:
    """The seconds ``key`` has left on the server (meta-get ``t``); ``-1``: never expires."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(f"mg {key} t\r\n".encode())
        reply = sock.recv(256).decode()
    status, *flags = reply.split()
    assert status == "HD", f"{key!r} is not on the server: {reply!r}"
    return int(next(flag[1:] for flag in flags if flag.startswith("t")))


@pytest.fixture
def long_ttl_db(
    request: pytest.FixtureRequest,
    memcached_address: tuple[str, int],
    key_prefix: str,
    tmp_path: Path,
) -> Iterator[SQLAlchemySyncConfig]:
    """Authors cached on the shared Memcached with the ttl (in days) the test is given."""
    reset_factories()
    host, port = memcached_address
    config = CacheConfig(
        url=f"memcached://{host}:{port}",
        key_prefix=key_prefix,
        models={"Author": {"ttl": request.param * DAY}},
    )
    db = SQLAlchemySyncConfig(
        connection_string=f"sqlite:///{tmp_path}/long.db", cache_config=config
    )
    db.create_all(Base.metadata)
    with db.get_session() as session:
        session.add_all(AuthorFactory.build_batch(3))
        session.commit()
    yield db
    db.dispose()


@pytest.mark.parametrize("long_ttl_db", [7, 29, 31, 60, 3650], indirect=True)
def test_a_model_with_a_long_ttl_hits_on_memcached(
    long_ttl_db: SQLAlchemySyncConfig,
    memcached_address: tuple[str, int],
    statements: Callable[..., StatementLog],
) -> None:
    db = long_ttl_db
    sent = statements(db.engine)
    for expected_gets, expected_lists in ((1, 1), (0, 0), (0, 0)):
        sent.clear()
        with db.get_session() as session:
            repo = AuthorRepo(session=session)
            assert repo.get(1).id == 1
        assert selects(sent, AUTHORS) == expected_gets
        sent.clear()
        with db.get_session() as session:
            assert [author.id for author in AuthorRepo(session=session).list()] == [1, 2, 3]
        assert selects(sent, AUTHORS) == expected_lists

    manager = db.cache_manager
    assert manager is not None
    cache = manager._cache(Author)
    assert cache is not None
    assert manager.stats()["Author"].hits == 4
    # the entity and both tokens are on the server, with the expiry their ttl asks for
    ttl = cache.ttl
    entity = seconds_left(memcached_address, cache.keys.entity_key(("id",), (1,)))
    # the grace, and a rounding; an expiry sent as a Unix time is turned back into seconds
    # by memcached's own coarse clock, measured up to 12 s behind on a freshly started server
    slack = 1 if ttl + 60 <= RELATIVE_EXPIRY_LIMIT else CLOCK_SLACK
    assert min(ttl, LATEST_EXPIRY) - 60 <= entity <= ttl + 60 + slack
    for token in (cache.keys.generation_key, cache.keys.list_version_key):
        left = seconds_left(memcached_address, token)
        assert left > min(cache.token_ttl, RELATIVE_EXPIRY_LIMIT) - 60, token


@pytest.mark.parametrize("long_ttl_db", [60], indirect=True)
def test_an_update_of_a_long_ttl_model_is_seen(
    long_ttl_db: SQLAlchemySyncConfig, statements: Callable[..., StatementLog]
) -> None:
    """The tombstone and the new token are written with a long expiry too: no stale read."""
    db = long_ttl_db
    with db.get_session() as session:
        AuthorRepo(session=session).get(2)
    with db.get_session() as session:
        repo = AuthorRepo(session=session)
        author = repo.get(2)
        author.name = "renamed"
        repo.update(author)
        session.commit()
    sent = statements(db.engine)
    for expected in (1, 0):
        sent.clear()
        with db.get_session() as session:
            assert AuthorRepo(session=session).get(2).name == "renamed"
        assert selects(sent, AUTHORS) == expected


@pytest.mark.parametrize(
    ("ttl", "sent"),
    [
        (60, 60),
        (RELATIVE_EXPIRY_LIMIT, RELATIVE_EXPIRY_LIMIT),
        (RELATIVE_EXPIRY_LIMIT + 1, 1_700_000_000 + RELATIVE_EXPIRY_LIMIT + 1),
        (60 * DAY, 1_700_000_000 + 60 * DAY),
        (10**12, LATEST_EXPIRY),
    ],
)
def test_memcached_expiry(ttl: int, sent: int) -> None:
    assert memcached_expiry(ttl, now=1_700_000_000) == sent
