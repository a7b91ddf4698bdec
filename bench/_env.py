"""What the benchmark runs against: the models, the rows, the databases and the cache servers.

Everything the run creates is its own: a temporary SQLite file, a PostgreSQL database named
``declcache_bench_<random>`` (dropped at the end), and cache keys under a random prefix
(Redis keys are deleted at the end; Memcached keys expire with their ttl). Nothing is flushed.
"""

from __future__ import annotations

import datetime as dt
import decimal
import os
import random
import secrets
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, Numeric, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

ROWS = 1_000
TTL = 600
#: Parents of the collection cases, and the children each one has.
AUTHORS = 100
POSTS_PER_AUTHOR = 10

REDIS = os.environ.get("DECLCACHE_TEST_REDIS") or "127.0.0.1:6379"
MEMCACHED = os.environ.get("DECLCACHE_TEST_MEMCACHED") or "127.0.0.1:11211"
POSTGRES = os.environ.get("DECLCACHE_BENCH_POSTGRES") or "postgres@127.0.0.1:5432/test"


class Base(DeclarativeBase):
    pass


class Account(Base):
    """A realistic row: id, email, name, an int, an aware datetime, a Numeric and a bool."""

    __tablename__ = "bench_accounts"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(120), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    visits: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    balance: Mapped[decimal.Decimal] = mapped_column(Numeric(12, 2))
    active: Mapped[bool] = mapped_column(Boolean)

    class CacheMeta:
        ttl = TTL


class Author(Base):
    """A parent whose collection of posts is a cached relationship (issue 15)."""

    __tablename__ = "bench_authors"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    posts: Mapped[list[Post]] = relationship(order_by="Post.id")

    class CacheMeta:
        ttl = TTL
        cached_relationships = ("posts",)


class Post(Base):
    """A child of :class:`Author`: what a cached ``author.posts`` holds the ids of."""

    __tablename__ = "bench_posts"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    author_id: Mapped[int] = mapped_column(ForeignKey("bench_authors.id"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    words: Mapped[int] = mapped_column(Integer)
    published_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    class CacheMeta:
        ttl = TTL


def make_authors() -> list[Author]:
    """``AUTHORS`` authors with ``POSTS_PER_AUTHOR`` posts each (post ids are consecutive)."""
    rng = random.Random(15)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    return [
        Author(
            id=a,
            name=f"Author {a}",
            posts=[
                Post(
                    id=(a - 1) * POSTS_PER_AUTHOR + n,
                    title=f"Post {n} of author {a}",
                    words=rng.randint(100, 5_000),
                    published_at=start + dt.timedelta(seconds=rng.randint(0, 10**8)),
                )
                for n in range(1, POSTS_PER_AUTHOR + 1)
            ],
        )
        for a in range(1, AUTHORS + 1)
    ]


def make_rows() -> list[Account]:
    rng = random.Random(8)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    return [
        Account(
            id=i,
            email=f"user{i}@example.com",
            name=f"User Number {i}",
            visits=rng.randint(0, 10_000),
            created_at=start + dt.timedelta(seconds=rng.randint(0, 10**8)),
            balance=decimal.Decimal(rng.randint(0, 10**9)) / 100,
            active=rng.random() < 0.8,
        )
        for i in range(1, ROWS + 1)
    ]


def reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


#: Redis with declcache's near cache (L1) in front: its hits are measured beside plain Redis.
NEAR = "redis+near"


def cache_backend(name: str) -> tuple[str, dict[str, Any]]:
    """The dogpile backend and arguments of ``name`` (memory, redis, redis+near, memcached)."""
    if name == "memory":
        return "dogpile.cache.memory", {}
    if name in {"redis", NEAR}:
        host, port = host_port(REDIS)
        return "dogpile.cache.redis", {"host": host, "port": port}
    if name == "memcached":
        return "dogpile.cache.pymemcache", {"url": [MEMCACHED]}
    raise ValueError(name)


def backend_available(name: str) -> bool:
    if name in {"redis", NEAR}:
        return reachable(REDIS)
    if name == "memcached":
        return reachable(MEMCACHED)
    return True


@dataclass
class Databases:
    """The run's databases: ``{name: (sync url, async url)}``; :meth:`close` drops them."""

    urls: dict[str, tuple[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _pg_admin: str | None = None
    _pg_name: str | None = None

    @classmethod
    def create(cls, wanted: list[str]) -> Databases:
        databases = cls()
        if "sqlite" in wanted:
            path = Path(tempfile.mkdtemp(prefix="declcache-bench-")) / "bench.db"
            databases.urls["sqlite"] = (f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}")
        if "postgresql" in wanted:
            databases._create_postgres()
        for sync_url, _ in databases.urls.values():
            engine = create_engine(sync_url)
            Base.metadata.create_all(engine)
            with Session(engine) as session:
                session.add_all(make_rows())
                session.add_all(make_authors())
                session.commit()
            engine.dispose()
        return databases

    def _create_postgres(self) -> None:
        try:
            import psycopg
        except ImportError:
            self.notes.append("PostgreSQL skipped: psycopg is not installed")
            return
        admin = f"postgresql://{POSTGRES}"
        name = f"declcache_bench_{secrets.token_hex(4)}"
        try:
            with psycopg.connect(admin, autocommit=True, connect_timeout=3) as connection:
                connection.execute(f'CREATE DATABASE "{name}"')
        except psycopg.Error as error:
            self.notes.append(f"PostgreSQL skipped: {error}".strip())
            return
        self._pg_admin, self._pg_name = admin, name
        server = POSTGRES.rsplit("/", 1)[0]
        self.urls["postgresql"] = (
            f"postgresql+psycopg://{server}/{name}",
            f"postgresql+asyncpg://{server}/{name}",
        )

    def close(self) -> None:
        if self._pg_admin is None:
            return
        import psycopg

        with psycopg.connect(self._pg_admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{self._pg_name}" WITH (FORCE)')


def delete_redis_keys(prefix: str) -> None:
    """Remove the run's keys: the server may be shared (nothing else is touched)."""
    import redis

    host, port = host_port(REDIS)
    client = redis.Redis(host=host, port=port, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()
