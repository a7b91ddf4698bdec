"""Event-loop lag while cached async repository reads run against Redis.

Runs 2,000 ``await repo.get(id)`` reads (every one a cache hit, checked by counting SELECTs)
with a ticker on the same loop that wakes every millisecond and records how late it woke. The
async repository calls Redis from worker threads, so the loop stays free; for contrast, the
same lookups are then made by calling the manager directly on the loop, as a naive async
integration of a blocking client would.

Usage::

    python bench/loop_lag.py [--redis HOST:PORT] [--reads 2000] [--concurrency 50]
                             [--rounds 3] [--gc-freeze]

Redis: ``--redis``, else ``DECLCACHE_TEST_REDIS``, else 127.0.0.1:6379, else a private
``redis-server`` started for the run. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from declcache import CacheConfig
from declcache.config import SQLAlchemyAsyncConfig
from declcache.repository import SQLAlchemyAsyncRepository

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

ROWS = 200


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "bench_customers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(100), unique=True)

    class CacheMeta:
        ttl = 600


class CustomerRepository(SQLAlchemyAsyncRepository[Customer]):
    model_type = Customer


class LagMonitor:
    """Wakes every ``interval`` seconds and records how late each wake-up was."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self._due = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.lags.append(loop.time() - self._due)

    def __enter__(self) -> LagMonitor:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self.interval
        self._task = loop.create_task(self._tick())
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        # a wake-up still pending is late too (a blocked loop never lets it run at all)
        self.lags.append(max(0.0, asyncio.get_running_loop().time() - self._due))

    def report(self) -> str:
        ordered = sorted(self.lags)
        p99 = ordered[int(len(ordered) * 0.99) - 1] if ordered else 0.0
        return (
            f"max lag {max(ordered, default=0.0) * 1000:7.2f} ms   "
            f"p99 {p99 * 1000:6.2f} ms   median {statistics.median(ordered or [0]) * 1000:5.2f} ms"
            f"   ({len(ordered)} ticks)"
        )


def redis_address(argument: str | None) -> tuple[tuple[str, int], Any]:
    """The Redis to use, and a private server to stop afterwards (or ``None``)."""
    value = argument or os.environ.get("DECLCACHE_TEST_REDIS") or "127.0.0.1:6379"
    host, _, port = value.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return (host, int(port)), None
    except OSError as error:
        from tests._servers import RedisProcess

        server = RedisProcess()
        problem = server._launch(10.0)
        if problem is not None:
            raise SystemExit(f"no Redis at {value} and none could be started: {problem}") from error
        return server.address, server


def delete_keys(host: str, port: int, prefix: str) -> None:
    """Remove this run's keys: the server may be shared (nothing else is touched)."""
    import redis

    client = redis.Redis(host=host, port=port, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


async def run_reads(reads: int, concurrency: int, read: Callable[[int], Awaitable[Any]]) -> float:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with semaphore:
            await read(index % ROWS + 1)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(reads)))
    return time.perf_counter() - started


async def main(options: argparse.Namespace) -> None:
    (host, port), server = redis_address(options.redis)
    prefix = f"bench{secrets.token_hex(4)}:"
    directory = tempfile.mkdtemp()
    db = SQLAlchemyAsyncConfig(
        connection_string=f"sqlite+aiosqlite:///{directory}/bench.db",
        cache_config=CacheConfig(
            backend="dogpile.cache.redis",
            arguments={"host": host, "port": port},
            key_prefix=prefix,
        ),
    )
    manager = db.cache_manager
    assert manager is not None
    selects = []
    event.listen(
        db.engine.sync_engine,
        "before_cursor_execute",
        lambda *args: selects.append(args[2]) if "bench_customers" in args[2] else None,
    )
    try:
        await db.create_all(Base.metadata)
        async with db.get_session() as session:
            session.add_all(
                Customer(id=i, name=f"Customer {i}", email=f"c{i}@example.com")
                for i in range(1, ROWS + 1)
            )
            await session.commit()

        async def repository_read(ident: int) -> Customer:
            async with db.get_session() as session:
                return await CustomerRepository(session=session).get(ident)

        await run_reads(ROWS, options.concurrency, repository_read)  # warm the cache
        selects.clear()
        if options.gc_freeze:  # start-up objects leave the collector's scans
            gc.collect()
            gc.freeze()

        print(
            f"Redis {host}:{port}, {options.reads} cached reads, concurrency {options.concurrency}"
        )
        for round_ in range(1, options.rounds + 1):
            with LagMonitor() as monitor:
                elapsed = await run_reads(options.reads, options.concurrency, repository_read)
            print(
                f"  async repository #{round_}  {elapsed:6.2f} s  "
                f"{options.reads / elapsed:6.0f} reads/s   {monitor.report()}   "
                f"SELECTs: {len(selects)}"
            )

        async def blocking_read(ident: int) -> Any:
            return manager.get(Customer, ident)  # Redis I/O on the loop thread

        with LagMonitor() as monitor:
            elapsed = await run_reads(options.reads, options.concurrency, blocking_read)
        print(
            f"  manager on the loop  {elapsed:6.2f} s  {options.reads / elapsed:6.0f} reads/s   "
            f"{monitor.report()}   (contrast: what not to do)"
        )
    finally:
        delete_keys(host, port, prefix)
        await db.dispose()
        if server is not None:
            server.stop(kill=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", help="HOST:PORT of the Redis server")
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after warm-up")
    asyncio.run(main(parser.parse_args()))
