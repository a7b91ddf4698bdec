"""An ``AsyncSession`` commit awaits its invalidation on the async store — and keeps it.

Once the database has committed, the invalidation must happen even if the caller stops
waiting (a request timeout cancels the task awaiting ``session.commit()``): otherwise every
process would read the old row from the cache until its ttl ends. Runs on every backend of the
``cache_config`` fixture; the invalidation is held at the store until the commit is cancelled.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from declcache import CacheConfig, CacheManager, Lookup, setup_cache_listeners
from tests.integration._invalidation_models import Base, Item, reset_rows, row

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

#: A guard that turns a hang into a failure; never reached when green (nothing is timed).
WAIT = 60.0


async def test_a_cancelled_commit_still_invalidates(
    tmp_path: Path, cache_config: CacheConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup_cache_listeners()
    path = tmp_path / "commit.sqlite"
    sync_engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(sync_engine)
    reset_rows(sync_engine)
    sync_engine.dispose()
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    manager = CacheManager(cache_config)
    info = {"cache_manager": manager}
    try:
        async with AsyncSession(engine, info=info) as session:

            async def load() -> Any:
                return await session.get(Item, 1)

            assert row(await manager.aload(Item, 1, load)) == {"id": 1, "name": "item-1"}
        assert row(manager.get(Item, 1)) == {"id": 1, "name": "item-1"}  # cached

        cache = manager._cache(Item)
        assert cache is not None
        entered, release, written = asyncio.Event(), asyncio.Event(), asyncio.Event()
        write = cache.astore.inner.write_many

        async def held_write(entries: Any) -> None:
            entered.set()
            await release.wait()
            await write(entries)
            written.set()

        monkeypatch.setattr(cache.astore.inner, "write_many", held_write)

        async def rename() -> None:
            async with AsyncSession(engine, info=info) as session:
                item = await session.get(Item, 1)
                assert item is not None
                item.name = "renamed"
                await session.commit()

        committing = asyncio.create_task(rename())
        await asyncio.wait_for(entered.wait(), WAIT)  # the database has committed
        committing.cancel()  # the caller gives up waiting
        await asyncio.gather(committing, return_exceptions=True)
        release.set()
        await asyncio.wait_for(written.wait(), WAIT)

        assert manager.get(Item, 1) is Lookup.MISS  # the old row is gone from the cache
        assert manager.pending_invalidations == 0
        async with AsyncSession(engine, info=info) as session:
            assert row(await manager.aload(Item, 1, load)) == {"id": 1, "name": "renamed"}
    finally:
        await engine.dispose()
