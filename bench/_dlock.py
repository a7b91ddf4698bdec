"""One process of the two-process stampede: 25 threads read one cold key; print the SELECTs.

Run by :func:`bench.suite.two_process_stampede` as ``python -m bench._dlock OPTIONS_JSON``.
The process connects, touches ``ready``, waits for ``go``, then reads. Every SELECT of the
table sleeps ``delay`` seconds, so that the two processes' misses overlap.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.orm import sessionmaker

from bench import _env
from bench._cases import SESSION_OPTIONS, AccountRepository
from declcache import CacheConfig, CacheManager, setup_cache_listeners

THREADS = 25


def main(options: dict[str, Any]) -> dict[str, int]:
    setup_cache_listeners()
    engine = create_engine(options["url"], pool_size=THREADS)
    selects = [0]

    def seen(*args: Any) -> None:
        if args[2].lstrip().upper().startswith("SELECT") and "bench_accounts" in args[2]:
            selects[0] += 1
            time.sleep(options["delay"])

    event.listen(engine, "before_cursor_execute", seen)
    name, arguments = _env.cache_backend("redis")
    manager = CacheManager(
        CacheConfig(
            backend=name,
            arguments={**arguments, "distributed_lock": options["lock"]},
            key_prefix=options["prefix"],
        )
    )
    sessions = sessionmaker(bind=engine, info={"cache_manager": manager}, **SESSION_OPTIONS)
    manager.get(_env.Account, 0)  # connects to Redis
    with engine.connect():
        pass
    ready_then_wait(options["ready"], options["go"])
    barrier = threading.Barrier(THREADS)

    def read() -> None:
        with sessions() as session:
            repository = AccountRepository(session=session)
            barrier.wait()
            repository.get(options["ident"])

    threads = [threading.Thread(target=read) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.dispose()
    return {"selects": selects[0]}


def ready_then_wait(ready: str, go: str, timeout: float = 30) -> None:
    """Touch the file ``ready``, then wait until the file ``go`` exists (the driver's start)."""
    Path(ready).touch()
    deadline = time.monotonic() + timeout
    while not Path(go).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("never told to go")
        time.sleep(0.001)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
