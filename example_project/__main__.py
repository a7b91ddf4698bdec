"""``python -m example_project``: seed SQLite, read through the cache and without, compare.

``python -m example_project serve`` starts the shop's web API (Litestar, needs uvicorn) instead.
Settings come from the environment and ``example_project/.env`` (see settings.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine

from declcache import CacheConfig, CacheManager, setup_cache_listeners
from example_project.settings import ExampleSettings, load_settings
from example_project.workload import RunResult, run, seed


def _progress(label: str, total: int) -> Callable[[int], None]:
    """A progress bar on a terminal; one line per run otherwise (logs, CI)."""
    if not sys.stdout.isatty():
        return lambda done: print(f"{label}: {done} reads") if done == total else None

    def show(done: int) -> None:
        if done % max(1, total // 40) == 0 or done == total:
            filled = 40 * done // total
            sys.stdout.write(f"\r{label:<9} [{'#' * filled}{'.' * (40 - filled)}] {done}/{total}")
            if done == total:
                sys.stdout.write("\n")
            sys.stdout.flush()

    return show


def _table(cached: RunResult, uncached: RunResult, manager: CacheManager) -> str:
    stats = manager.stats()["Customer"]
    lookups = stats.hits + stats.misses
    rows = [
        ("hit ratio", f"{stats.hits / lookups:.1%}" if lookups else "-"),
        ("database queries (cached)", f"{cached.queries}"),
        ("database queries (uncached)", f"{uncached.queries}"),
        ("queries saved", f"{uncached.queries - cached.queries}"),
        ("median read, cached", f"{cached.median_us:.0f} µs"),
        ("median read, uncached", f"{uncached.median_us:.0f} µs"),
        ("speed-up (median)", f"{uncached.median_us / cached.median_us:.1f}x"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>10}" for name, value in rows)


def serve(argv: list[str], settings: ExampleSettings) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m example_project serve", description="Start the shop's web API."
    )
    parser.add_argument("--host", default=settings.host, help="default: EXAMPLE_HOST")
    parser.add_argument("--port", type=int, default=settings.port, help="default: EXAMPLE_PORT")
    args = parser.parse_args(argv)
    try:
        import uvicorn  # noqa: PLC0415 - optional: only `serve` needs it
    except ImportError:
        print("serve needs uvicorn and litestar: pip install 'declcache[litestar]' uvicorn")
        return 2
    from example_project.api import create_app  # noqa: PLC0415 - needs litestar

    uvicorn.run(create_app(), host=args.host, port=args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = load_settings()
    if argv[:1] == ["serve"]:
        return serve(argv[1:], settings)
    parser = argparse.ArgumentParser(
        prog="python -m example_project",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reads", type=int, default=3000, help="reads per run (default 3000)")
    parser.add_argument(
        "--customers", type=int, default=settings.customers, help="rows to seed (EXAMPLE_CUSTOMERS)"
    )
    parser.add_argument(
        "--database",
        default=settings.database_url or None,
        help="SQLAlchemy URL (EXAMPLE_DATABASE_URL; default: a SQLite file in a temp dir)",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        url = args.database or f"sqlite:///{Path(tmp) / 'shop.db'}"
        engine = create_engine(url)
        seed(engine, customers=args.customers, products=settings.products)
        manager = CacheManager(CacheConfig.from_env())
        setup_cache_listeners()
        print(f"declcache demo: {url.split('://')[0]} database, {manager.config.backend} cache")
        uncached = run(
            engine,
            CacheManager(CacheConfig(enabled=False)),
            label="uncached",
            reads=args.reads,
            customers=args.customers,
            progress=_progress("uncached", args.reads),
        )
        cached = run(
            engine,
            manager,
            label="cached",
            reads=args.reads,
            customers=args.customers,
            progress=_progress("cached", args.reads),
        )
        print(_table(cached, uncached, manager))
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
