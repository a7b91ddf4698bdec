"""declcache against a real TLS Redis with an ACL user, the way a production cache is run.

The tests start everything themselves (``tests/_servers.py``): ``openssl`` makes a throwaway
CA and a server certificate, and a private ``redis-server`` listens on a TLS port only
(``--port 0 --tls-port P``), its ``default`` user behind a password of its own and the
application's user created by ``ACL SETUSER app on >… ~dc:* +@all``. So every byte declcache
sends goes over TLS, as ``app``, and may only touch keys under ``dc:``.

Two ways to configure the same connection are run side by side (``tls_form``):

``url``
    ``DECLCACHE_URL=rediss://app:…@127.0.0.1:P/0?ssl_ca_certs=/path/ca.crt``, nothing else.
``connection_kwargs``
    ``DECLCACHE_URL=rediss://app:…@127.0.0.1:P/0`` and
    ``DECLCACHE_ARGUMENTS={"connection_kwargs": {"ssl_ca_certs": "/path/ca.crt"}}``.

What is proven: the stock sync and async repositories and the near cache read through the
cache (SELECTs counted with ``before_cursor_execute``) and see another manager's commit; and
``declcache check`` succeeds. Then each configuration mistake a user can make with TLS and
ACLs -- a key prefix outside the user's key pattern, a wrong password, a certificate the
client does not trust, plain ``redis://`` to the TLS port -- gives ``declcache check`` a clear
error without the secret, and never fails a database read or write: the cache degrades to the
database and counts the fault in ``manager.stats()``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from declcache import CacheConfig
from declcache.config import SQLAlchemyAsyncConfig, SQLAlchemySyncConfig
from tests import _servers
from tests.integration._repo_models import (
    AsyncAuthorRepo,
    Author,
    AuthorFactory,
    AuthorRepo,
    Base,
    reset_factories,
    selects,
    values,
)
from tests.integration.test_cli import run_cli
from tests.integration.test_near_cache import counting

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from declcache import CacheManager
    from tests.integration.conftest import StatementLog

AUTHORS = "repo_authors"
USER = "app"
#: The application user's password; ``@`` and ``#`` must be percent-encoded in a URL.
PASSWORD = "S3cret@TLS#pw"
WRONG_PASSWORD = "Wr0ng@TLS#pw"
#: The key pattern the application user may touch.
KEY_PATTERN = "dc:*"


# -- the server -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_certificates(tmp_path_factory: pytest.TempPathFactory) -> _servers.Certificates:
    """A throwaway CA, a server certificate it signed, and a CA nobody trusts."""
    return _servers.make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def tls_redis(tls_certificates: _servers.Certificates) -> Iterator[_servers.TlsRedisProcess]:
    """A private TLS-only Redis with the application's ACL user ``app``."""
    server = _servers.start_tls_redis_server(tls_certificates)
    server.set_user(USER, "on", f">{PASSWORD}", f"~{KEY_PATTERN}", "+@all")
    yield server
    server.stop()


@pytest.fixture
def admin(tls_redis: _servers.TlsRedisProcess) -> Iterator[Any]:
    """A client of the server's ``default`` user: sees every key and every client."""
    client = tls_redis.admin()
    yield client
    client.close()


@pytest.fixture
def tls_prefix(key_prefix: str, admin: Any) -> Iterator[str]:
    """This test's key prefix, inside the user's key pattern: ``dc:dct…:t17:``."""
    prefix = f"dc:{key_prefix}"
    yield prefix
    delete_keys(admin, prefix)


def delete_keys(admin: Any, prefix: str) -> None:
    """Delete this test's keys (and dogpile lock keys for them): SCAN, never FLUSH."""
    escaped = re.sub(r"([*?\[\]\\])", r"\\\1", prefix)
    for pattern in (f"{escaped}*", f"_lock{escaped}*"):
        keys = list(admin.scan_iter(match=pattern, count=500))
        if keys:
            admin.delete(*keys)


# -- configurations -------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """One way to configure the cache: the environment the CLI reads, and the same in Python."""

    url: str
    key_prefix: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """``DECLCACHE_*`` variables saying the same as :meth:`config`."""
        env = {"DECLCACHE_URL": self.url, "DECLCACHE_KEY_PREFIX": self.key_prefix}
        if self.arguments:
            env["DECLCACHE_ARGUMENTS"] = json.dumps(self.arguments)
        return env

    def config(self, **changes: Any) -> CacheConfig:
        """The ``CacheConfig`` an application would build."""
        return CacheConfig(
            url=self.url, arguments=self.arguments, key_prefix=self.key_prefix, **changes
        )


def setup_for(
    server: _servers.TlsRedisProcess,
    key_prefix: str,
    *,
    form: str = "connection_kwargs",
    scheme: str = "rediss",
    password: str = PASSWORD,
    ca: Path | None = None,
) -> Setup:
    """A :class:`Setup` for ``server``; ``ca`` defaults to the CA that signed its certificate."""
    ca = server.certificates.ca if ca is None else ca
    base = f"{scheme}://{USER}:{quote(password, safe='')}@{server.host}:{server.port}/0"
    if scheme != "rediss":
        return Setup(base, key_prefix)
    if form == "url":
        return Setup(f"{base}?ssl_ca_certs={quote(str(ca), safe='/')}", key_prefix)
    return Setup(base, key_prefix, {"connection_kwargs": {"ssl_ca_certs": str(ca)}})


@pytest.fixture(params=["url", "connection_kwargs"])
def tls_form(request: pytest.FixtureRequest) -> str:
    """Where the CA file is named: a URL query option, or the client's connection kwargs."""
    return str(request.param)


@pytest.fixture
def good(tls_redis: _servers.TlsRedisProcess, tls_prefix: str, tls_form: str) -> Setup:
    """The right user, password, CA and key prefix."""
    return setup_for(tls_redis, tls_prefix, form=tls_form)


SECRETS = (PASSWORD, WRONG_PASSWORD, quote(PASSWORD, safe=""), quote(WRONG_PASSWORD, safe=""))


def assert_no_secret(text: str, server: _servers.TlsRedisProcess) -> None:
    for secret in (*SECRETS, server.admin_password):
        assert secret not in text, f"a secret leaked: {text!r}"


# -- databases ------------------------------------------------------------------------------


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    """One SQLite file, shared by the two "processes" (configs) of a test."""
    reset_factories()
    return tmp_path / "tls.db"


def sync_db(db_file: Path, config: CacheConfig) -> SQLAlchemySyncConfig:
    db = SQLAlchemySyncConfig(connection_string=f"sqlite:///{db_file}", cache_config=config)
    db.create_all(Base.metadata)
    return db


def async_db(db_file: Path, config: CacheConfig) -> SQLAlchemyAsyncConfig:
    return SQLAlchemyAsyncConfig(
        connection_string=f"sqlite+aiosqlite:///{db_file}", cache_config=config
    )


def seed(db: SQLAlchemySyncConfig, count: int) -> list[Author]:
    made: list[Author] = AuthorFactory.build_batch(count)
    with db.get_session() as session:
        session.add_all(made)
        session.commit()
    return made


def read(db: SQLAlchemySyncConfig, sent: StatementLog, action: Callable[[Any], Any]) -> Any:
    """``action(session)`` in a fresh session; ``(result, SELECTs of authors)``."""
    sent.clear()
    with db.get_session() as session:
        result = action(session)
    return result, selects(sent, AUTHORS)


def rename(db: SQLAlchemySyncConfig, ident: int, name: str) -> None:
    """Commit a new name through the stock repository of ``db``."""
    with db.get_session() as session:
        repo = AuthorRepo(session=session)
        author = repo.get(ident, use_cache=False)
        author.name = name
        repo.update(author)
        session.commit()


def name_in_database(db_file: Path, ident: int) -> str:
    """The row as the database has it, read without declcache."""
    engine = sa.create_engine(f"sqlite:///{db_file}")
    try:
        with engine.connect() as connection:
            query = sa.text("SELECT name FROM repo_authors WHERE id = :id")
            return str(connection.execute(query, {"id": ident}).scalar_one())
    finally:
        engine.dispose()


def manager_of(db: SQLAlchemySyncConfig | SQLAlchemyAsyncConfig) -> CacheManager:
    manager = db.cache_manager
    assert manager is not None
    return manager


def clients_of(admin: Any, user: str) -> list[dict[str, Any]]:
    return [client for client in admin.client_list() if client.get("user") == user]


# -- the stock repositories over TLS ---------------------------------------------------------


def test_the_sync_repository_reads_through_the_tls_cache(
    good: Setup,
    db_file: Path,
    statements: Callable[..., StatementLog],
    admin: Any,
) -> None:
    db = sync_db(db_file, good.config())
    sent = statements(db.engine)
    try:
        made = seed(db, 3)

        loaded, queries = read(db, sent, lambda s: AuthorRepo(session=s).get(1))
        assert (queries, values(loaded)) == (1, values(made[0]))
        cached, queries = read(db, sent, lambda s: AuthorRepo(session=s).get(1))
        assert (queries, values(cached)) == (0, values(made[0]))

        email = made[1].email
        read(db, sent, lambda s: AuthorRepo(session=s).get(2))
        for expected in (1, 0):  # the email pointer is filled, then served
            by_email, queries = read(db, sent, lambda s: AuthorRepo(session=s).get_one(email=email))
            assert (queries, values(by_email)) == (expected, values(made[1]))

        read(db, sent, lambda s: AuthorRepo(session=s).list(order_by=Author.id))
        listed, queries = read(db, sent, lambda s: AuthorRepo(session=s).list(order_by=Author.id))
        assert (queries, [values(a) for a in listed]) == (0, [values(a) for a in made])

        stats = manager_of(db).stats()["Author"]
        assert stats.errors == 0
        assert stats.hits >= 3
        # The entries are on the TLS server, written by the ACL user.
        assert list(admin.scan_iter(match=f"{good.key_prefix}*"))
        assert clients_of(admin, USER)
    finally:
        db.dispose()


def test_a_commit_is_seen_by_another_manager_over_tls(
    good: Setup, db_file: Path, statements: Callable[..., StatementLog]
) -> None:
    writer, reader = sync_db(db_file, good.config()), sync_db(db_file, good.config())
    assert manager_of(writer) is not manager_of(reader)
    sent = statements(reader.engine)
    try:
        seed(writer, 2)
        read(reader, sent, lambda s: AuthorRepo(session=s).get(1))
        _, queries = read(reader, sent, lambda s: AuthorRepo(session=s).get(1))
        assert queries == 0

        rename(writer, 1, "renamed over TLS")

        fresh, queries = read(reader, sent, lambda s: AuthorRepo(session=s).get(1))
        assert (queries, fresh.name) == (1, "renamed over TLS")
        again, queries = read(reader, sent, lambda s: AuthorRepo(session=s).get(1))
        assert (queries, again.name) == (0, "renamed over TLS")
        assert manager_of(reader).stats()["Author"].errors == 0
        assert manager_of(writer).stats()["Author"].errors == 0
    finally:
        writer.dispose()
        reader.dispose()


async def test_the_async_repository_reads_through_the_tls_cache_and_sees_commits(
    good: Setup, db_file: Path, statements: Callable[..., StatementLog]
) -> None:
    writer = sync_db(db_file, good.config())
    db = async_db(db_file, good.config())
    sent = statements(db.engine.sync_engine)
    try:
        made = seed(writer, 2)

        async def get(ident: int) -> tuple[Author, int]:
            sent.clear()
            async with db.get_session() as session:
                found = await AsyncAuthorRepo(session=session).get(ident)
            return found, selects(sent, AUTHORS)

        loaded, queries = await get(1)
        assert (queries, values(loaded)) == (1, values(made[0]))
        cached, queries = await get(1)
        assert (queries, values(cached)) == (0, values(made[0]))

        rename(writer, 1, "renamed for the async reader")
        fresh, queries = await get(1)
        assert (queries, fresh.name) == (1, "renamed for the async reader")

        async with db.get_session() as session:  # and an async write, seen by the sync side
            repo = AsyncAuthorRepo(session=session)
            author = await repo.get(2)
            author.name = "written by the async repository"
            await repo.update(author)
            await session.commit()
        with writer.get_session() as sync_session:
            written = AuthorRepo(session=sync_session).get(2)
            assert written.name == "written by the async repository"

        assert manager_of(db).stats()["Author"].errors == 0
    finally:
        await db.dispose()
        writer.dispose()


# -- the near cache over TLS -----------------------------------------------------------------


def test_the_near_cache_over_tls_hits_in_process_and_sees_another_managers_commit(
    good: Setup, db_file: Path, statements: Callable[..., StatementLog], admin: Any
) -> None:
    writer = sync_db(db_file, good.config(near_cache=True))
    reader = sync_db(db_file, good.config(near_cache=True))
    sent = statements(reader.engine)
    try:
        seed(writer, 2)
        redis_reads = counting(manager_of(reader), Author)
        for _ in range(2):  # the first read fills Redis, the second fills L1
            read(reader, sent, lambda s: AuthorRepo(session=s).get(1))

        before = redis_reads.reads
        hit, queries = read(reader, sent, lambda s: AuthorRepo(session=s).get(1))
        assert (queries, hit.name) == (0, values(hit)["name"])
        assert redis_reads.reads == before  # answered from this process's memory
        near = manager_of(reader).near_cache_stats()
        assert near is not None
        assert near.tracking
        assert near.hits >= 2

        # The tracking connection is the ACL user's, over the TLS-only port, tracking.
        tracking_id = manager_of(reader)._near.tracking_client_id  # type: ignore[union-attr]
        (tracking,) = [c for c in admin.client_list() if int(c["id"]) == tracking_id]
        assert tracking["user"] == USER
        assert "t" in tracking["flags"]

        rename(writer, 1, "renamed under a near cache")
        fresh, queries = read(reader, sent, lambda s: AuthorRepo(session=s).get(1))
        assert (queries, fresh.name) == (1, "renamed under a near cache")
        assert manager_of(reader).stats()["Author"].errors == 0
    finally:
        writer.dispose()
        reader.dispose()


#: The least a user needs for declcache with a near cache: reads, writes, the
#: compare-and-set script, and on the tracking connection HELLO, PING, CLIENT TRACKING/ID.
LEAST_PRIVILEGE = ("+@read", "+@write", "+@scripting", "+hello", "+auth", "+ping", "+client|id")


@pytest.mark.parametrize(
    ("rules", "tracking"),
    [
        pytest.param((*LEAST_PRIVILEGE, "+client|tracking"), True, id="least-privilege"),
        pytest.param(LEAST_PRIVILEGE, False, id="without-client-tracking"),
    ],
)
def test_the_near_cache_with_a_least_privilege_user(  # noqa: PLR0917 - fixtures
    tls_redis: _servers.TlsRedisProcess,
    tls_prefix: str,
    db_file: Path,
    statements: Callable[..., StatementLog],
    caplog: pytest.LogCaptureFixture,
    rules: tuple[str, ...],
    tracking: bool,
) -> None:
    """Without ``client|tracking`` the near cache stays off and Redis serves every hit.

    (Whether that is logged is not asserted: the near cache logs a kind of fault once per 30 s
    per process, and another test may have just logged it.)
    """
    user = "app_least"
    tls_redis.set_user(user, "on", f">{PASSWORD}", f"~{KEY_PATTERN}", "-@all", *rules)
    base = setup_for(tls_redis, tls_prefix)
    setup = Setup(base.url.replace(f"{USER}:", f"{user}:", 1), base.key_prefix, base.arguments)
    writer = sync_db(db_file, setup.config(near_cache=True))
    reader = sync_db(db_file, setup.config(near_cache=True))
    sent = statements(reader.engine)
    caplog.set_level(logging.INFO, logger="declcache")
    try:
        seed(writer, 1)
        for _ in range(3):
            read(reader, sent, lambda s: AuthorRepo(session=s).get(1))
        _, queries = read(reader, sent, lambda s: AuthorRepo(session=s).get(1))
        assert queries == 0  # a cache hit either way: L1, or Redis itself
        near = manager_of(reader).near_cache_stats()
        assert near is not None
        assert near.tracking is tracking
        assert (near.hits > 0) is tracking

        rename(writer, 1, "renamed by a least-privilege user")
        fresh, _ = read(reader, sent, lambda s: AuthorRepo(session=s).get(1))
        assert fresh.name == "renamed by a least-privilege user"
        assert manager_of(reader).stats()["Author"].errors == 0
        for record in caplog.records:
            assert_no_secret(logging.Formatter().format(record), tls_redis)
    finally:
        writer.dispose()
        reader.dispose()


# -- the distributed fill lock's keys --------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "locks"),
    [
        pytest.param((f"~{KEY_PATTERN}",), False, id="dc-only"),
        pytest.param((f"~{KEY_PATTERN}", f"~_lock{KEY_PATTERN}"), True, id="dc-and-its-locks"),
    ],
)
def test_the_distributed_lock_needs_its_own_key_pattern(  # noqa: PLR0917 - fixtures
    tls_redis: _servers.TlsRedisProcess,
    tls_prefix: str,
    db_file: Path,
    statements: Callable[..., StatementLog],
    caplog: pytest.LogCaptureFixture,
    patterns: tuple[str, ...],
    locks: bool,
) -> None:
    """dogpile names a fill lock ``_lock<key>``: outside ``~dc:*`` unless granted too.

    Without it the lock is refused (NOPERM) and every fill goes on without it, logged; the
    read itself never fails.
    """
    user = "app_locks"
    tls_redis.set_user(user, "on", f">{PASSWORD}", *patterns, "+@all")
    base = setup_for(tls_redis, tls_prefix)
    setup = Setup(
        base.url.replace(f"{USER}:", f"{user}:", 1),
        base.key_prefix,
        {**base.arguments, "distributed_lock": True},
    )
    db = sync_db(db_file, setup.config())
    sent = statements(db.engine)
    caplog.set_level(logging.WARNING, logger="declcache")
    try:
        made = seed(db, 1)
        for expected in (1, 0):
            found, queries = read(db, sent, lambda s: AuthorRepo(session=s).get(1))
            assert (queries, values(found)) == (expected, values(made[0]))
        refused = [r for r in caplog.records if "lock unavailable" in r.getMessage()]
        assert bool(refused) is not locks
        for record in caplog.records:
            assert_no_secret(logging.Formatter().format(record), tls_redis)
    finally:
        db.dispose()


# -- declcache check ---------------------------------------------------------------------------


def test_declcache_check_succeeds_over_tls(
    good: Setup, tls_redis: _servers.TlsRedisProcess, tmp_path: Path, admin: Any
) -> None:
    result = run_cli("check", "--rounds", "2", cwd=tmp_path, env=good.env())
    assert result.returncode == 0, result.stderr
    assert "ok: round trip" in result.stdout
    assert f"port={tls_redis.port}" in result.stdout
    assert_no_secret(result.stdout + result.stderr, tls_redis)
    assert list(admin.scan_iter(match=f"{good.key_prefix}*")) == []


# -- mistakes: a clear error from check, never a failed database read or write ---------------


@dataclass(frozen=True)
class Mistake:
    """A wrong configuration and what ``declcache check`` must say about it."""

    make: Callable[[_servers.TlsRedisProcess, str], Setup]
    #: Each must appear in check's error output (case-insensitive).
    says: tuple[str, ...]
    #: None may appear: it would send the user looking in the wrong place.
    misleads: tuple[str, ...] = ()


MISTAKES = {
    "key-prefix-outside-the-acl-pattern": Mistake(
        lambda server, prefix: setup_for(server, "other:" + prefix.removeprefix("dc:")),
        says=("NOPERM", "key pattern", "other:"),
        misleads=("unreachable",),
    ),
    "wrong-password": Mistake(
        lambda server, prefix: setup_for(server, prefix, password=WRONG_PASSWORD),
        says=("authentication failed", f"user {USER!r}"),
        misleads=("unreachable",),
    ),
    "untrusted-ca": Mistake(
        lambda server, prefix: setup_for(server, prefix, ca=server.certificates.untrusted_ca),
        says=("certificate verify failed",),
    ),
    "no-ca-file": Mistake(
        lambda server, prefix: Setup(setup_for(server, prefix).url, prefix),
        says=("certificate verify failed",),
    ),
    "plain-redis-to-the-tls-port": Mistake(
        lambda server, prefix: setup_for(server, prefix, scheme="redis"),
        says=("TLS", "rediss://"),
    ),
}


@pytest.fixture(params=sorted(MISTAKES))
def mistake(request: pytest.FixtureRequest) -> Mistake:
    return MISTAKES[str(request.param)]


@pytest.fixture
def wrong(mistake: Mistake, tls_redis: _servers.TlsRedisProcess, tls_prefix: str) -> Setup:
    return mistake.make(tls_redis, tls_prefix)


def test_declcache_check_explains_the_mistake_without_the_secret(
    mistake: Mistake, wrong: Setup, tls_redis: _servers.TlsRedisProcess, tmp_path: Path
) -> None:
    result = run_cli("check", "--rounds", "1", cwd=tmp_path, env=wrong.env())
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert_no_secret(output, tls_redis)
    error = result.stderr.lower()
    for needed in mistake.says:
        assert needed.lower() in error, f"{needed!r} not in {result.stderr!r}"
    for misleading in mistake.misleads:
        assert misleading.lower() not in error, result.stderr


def test_a_wrong_setting_never_fails_a_database_read_or_write(
    wrong: Setup,
    tls_redis: _servers.TlsRedisProcess,
    db_file: Path,
    statements: Callable[..., StatementLog],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    db = sync_db(db_file, wrong.config())
    sent = statements(db.engine)
    try:
        made = seed(db, 2)
        for _ in range(2):
            loaded, queries = read(db, sent, lambda s: AuthorRepo(session=s).get(1))
            assert (queries, values(loaded)) == (1, values(made[0]))  # the database answers

        rename(db, 1, "committed without a cache")
        assert name_in_database(db_file, 1) == "committed without a cache"
        fresh, _ = read(db, sent, lambda s: AuthorRepo(session=s).get(1))
        assert fresh.name == "committed without a cache"
        listed, _ = read(db, sent, lambda s: AuthorRepo(session=s).list(order_by=Author.id))
        assert [a.name for a in listed] == ["committed without a cache", made[1].name]

        stats = manager_of(db).stats()["Author"]
        assert stats.errors > 0
        assert stats.hits == 0
        for record in caplog.records:
            assert_no_secret(logging.Formatter().format(record), tls_redis)
    finally:
        db.dispose()


async def test_a_wrong_setting_never_fails_an_async_read_or_write(
    wrong: Setup,
    tls_redis: _servers.TlsRedisProcess,
    db_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    sync = sync_db(db_file, wrong.config())
    made = seed(sync, 2)
    sync.dispose()
    db = async_db(db_file, wrong.config())
    try:
        for _ in range(2):
            async with db.get_session() as session:
                loaded = await AsyncAuthorRepo(session=session).get(1)
            assert values(loaded) == values(made[0])
        async with db.get_session() as session:
            repo = AsyncAuthorRepo(session=session)
            author = await repo.get(2)
            author.name = "committed asynchronously without a cache"
            await repo.update(author)
            await session.commit()
        assert name_in_database(db_file, 2) == "committed asynchronously without a cache"
        async with db.get_session() as session:
            again = await AsyncAuthorRepo(session=session).get(2)
        assert again.name == "committed asynchronously without a cache"

        assert manager_of(db).stats()["Author"].errors > 0
        for record in caplog.records:
            assert_no_secret(logging.Formatter().format(record), tls_redis)
    finally:
        await db.dispose()


@pytest.mark.parametrize(
    ("feature", "rules", "refused"),
    [
        pytest.param("lock", (f"~{KEY_PATTERN}", "+@all"), True, id="lock-outside-the-pattern"),
        pytest.param(
            "lock", (f"~{KEY_PATTERN}", f"~_lock{KEY_PATTERN}", "+@all"), False, id="lock-granted"
        ),
        pytest.param("near", (f"~{KEY_PATTERN}", *LEAST_PRIVILEGE), True, id="no-tracking"),
        pytest.param(
            "near",
            (f"~{KEY_PATTERN}", *LEAST_PRIVILEGE, "+client|tracking"),
            False,
            id="tracking-granted",
        ),
    ],
)
def test_declcache_check_tries_what_each_configured_feature_needs(  # noqa: PLR0917 - params
    tls_redis: _servers.TlsRedisProcess,
    tls_prefix: str,
    tmp_path: Path,
    feature: str,
    rules: tuple[str, ...],
    refused: bool,
) -> None:
    """A user allowed to read and write may still be refused the lock or client tracking:
    the feature would be silently off at run time, so ``check`` tries it and says which."""
    user = f"app_{feature}"
    tls_redis.set_user(user, "on", f">{PASSWORD}", "-@all", *rules)
    base = setup_for(tls_redis, tls_prefix)
    env = Setup(base.url.replace(f"{USER}:", f"{user}:", 1), base.key_prefix, base.arguments)
    if feature == "lock":
        env = Setup(env.url, env.key_prefix, {**env.arguments, "distributed_lock": True})
        variables = env.env()
    else:
        variables = {**env.env(), "DECLCACHE_NEAR_CACHE": "true"}
    result = run_cli("check", "--rounds", "1", cwd=tmp_path, env=variables)
    output = result.stdout + result.stderr
    assert_no_secret(output, tls_redis)
    if not refused:
        assert result.returncode == 0, output
        return
    assert result.returncode == 1, output
    expected = "_lock" if feature == "lock" else "client|tracking"
    assert expected in result.stderr, result.stderr
    assert ("distributed_lock" if feature == "lock" else "near_cache") in result.stderr
