"""The other process of the near-cache coherence test: commits renames when told to.

Run as ``python -m tests.integration._near_writer CONFIG_JSON``. It prints ``ready`` once its
manager has reached Redis, then for each line ``NAME`` on stdin renames item 1 to ``NAME`` in
a committed transaction (the session listeners invalidate through its own manager, which has
no near cache) and prints ``done`` only after ``commit()`` returned. An empty line ends it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from sqlalchemy import create_engine

from declcache import CacheConfig, CacheManager, setup_cache_listeners
from tests.integration._invalidation_models import Item, writing


def main(options: dict[str, Any]) -> None:
    setup_cache_listeners()
    engine = create_engine(options["db_url"])
    manager = CacheManager(
        CacheConfig(
            backend="dogpile.cache.redis",
            arguments={"host": options["host"], "port": options["port"]},
            key_prefix=options["key_prefix"],
        )
    )
    manager.get(Item, 0)  # connects to Redis
    print("ready", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            break
        with writing(engine, manager) as session:
            item = session.get(Item, 1)
            assert item is not None
            item.name = name
            session.commit()
        print("done", flush=True)
    engine.dispose()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
