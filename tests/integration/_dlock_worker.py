"""One process of the distributed-lock test: read one author once, report its SELECTs.

Run as ``python -m tests.integration._dlock_worker CONFIG_JSON``. The worker gets ready
(engine connected, cache reached), touches ``ready``, waits for ``go`` to exist, reads author 1
through a repository in a fresh session and prints ``{"selects": n, "name": ...}``. Every SELECT
of the table sleeps ``delay`` seconds, so two processes that start together overlap.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, text

from declcache import CacheConfig
from declcache.config import SQLAlchemyAsyncConfig, SQLAlchemySyncConfig
from tests.integration._repo_models import AsyncAuthorRepo, Author, AuthorRepo


def _cache_config(options: dict[str, Any]) -> CacheConfig:
    return CacheConfig(
        backend="dogpile.cache.redis",
        arguments={
            "host": options["host"],
            "port": options["port"],
            "distributed_lock": options["distributed_lock"],
        },
        key_prefix=options["key_prefix"],
    )


def _count_slow_selects(engine: Any, delay: float) -> dict[str, int]:
    count = {"selects": 0}

    @event.listens_for(engine, "before_cursor_execute")
    def slow_select(*args: Any) -> None:
        if args[2].lstrip().upper().startswith("SELECT") and Author.__tablename__ in args[2]:
            count["selects"] += 1
            time.sleep(delay)  # in a greenlet under asyncio: the process has nothing else to do

    return count


def _ready_then_wait(options: dict[str, Any]) -> None:
    Path(options["ready"]).touch()
    deadline = time.monotonic() + 30
    while not Path(options["go"]).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("never told to go")
        time.sleep(0.002)


def run_sync(options: dict[str, Any]) -> dict[str, Any]:
    db = SQLAlchemySyncConfig(
        connection_string=options["db_url"], cache_config=_cache_config(options)
    )
    count = _count_slow_selects(db.engine, options["delay"])
    with db.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    assert db.cache_manager is not None
    db.cache_manager.get(Author, 0)  # connects to Redis
    _ready_then_wait(options)
    with db.get_session() as session:
        author = AuthorRepo(session=session).get(1)
    db.dispose()
    return {"selects": count["selects"], "name": author.name}


async def run_async(options: dict[str, Any]) -> dict[str, Any]:
    url = options["db_url"].replace("sqlite://", "sqlite+aiosqlite://")
    db = SQLAlchemyAsyncConfig(connection_string=url, cache_config=_cache_config(options))
    count = _count_slow_selects(db.engine.sync_engine, options["delay"])
    async with db.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
    assert db.cache_manager is not None
    await asyncio.to_thread(db.cache_manager.get, Author, 0)
    await asyncio.to_thread(_ready_then_wait, options)
    async with db.get_session() as session:
        author = await AsyncAuthorRepo(session=session).get(1)
    async with db.get_session() as session:  # the lock was released: a second read is a hit
        await AsyncAuthorRepo(session=session).get(1)
    await db.dispose()
    return {"selects": count["selects"], "name": author.name}


def main(options: dict[str, Any]) -> dict[str, Any]:
    if options.get("mode") == "async":
        return asyncio.run(run_async(options))
    return run_sync(options)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
