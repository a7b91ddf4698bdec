"""``declcache check``: reach the configured backend and time a round trip."""

from __future__ import annotations

import contextlib
import statistics
import time
import uuid
from typing import TYPE_CHECKING, Annotated

import typer
from dogpile.cache.exception import PluginNotFound

from declcache import backends
from declcache.cli._app import (
    EXIT_UNREACHABLE,
    app,
    config_from_env,
    describe_target,
    fail,
    new_console,
)
from declcache.exceptions import ConfigurationError

if TYPE_CHECKING:
    from declcache.settings import CacheConfig

__all__ = ["check", "probe_backend"]


def probe_backend(config: CacheConfig, rounds: int = 5) -> float:
    """Write, read back and delete a probe key under the prefix; the median round trip in s.

    Raises:
        RuntimeError: the probe read back something else than it wrote.
        Exception: whatever the backend's client raises when it cannot be reached.
    """
    backend = backends.open_backend(config.backend, config.arguments, config)
    store = backend.store(backend.make_region("check", 60))
    keeps_values = backend.keeps_values
    key = f"{config.key_prefix}check:{uuid.uuid4().hex}"
    value = uuid.uuid4().hex.encode("ascii")
    timings = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            store.write_many([(key, value, 60)])
            read = store.get_many([key])[0]
            timings.append(time.perf_counter() - started)
            if read != value and keeps_values:
                raise RuntimeError(f"wrote {value!r} under {key!r} and read back {read!r}")
    finally:
        with contextlib.suppress(Exception):  # the probe key expires on its own
            store.delete_many([key])
    return statistics.median(timings)


@app.command()
def check(
    rounds: Annotated[
        int, typer.Option(min=1, help="Round trips to time (the median is shown).")
    ] = 5,
) -> None:
    """Reach the configured backend: print its name and round-trip time.

    Writes, reads back and deletes one probe key under the key prefix. Exits 1 with the
    client's error when the backend cannot be reached.
    """
    config = config_from_env()
    console = new_console()
    source = config.sources.get("backend", "default")
    target = describe_target(config)
    console.print(f"backend: {config.backend} ({target}; from {source})", markup=False)
    console.print(f"key prefix: {config.key_prefix}", markup=False)
    if not config.enabled:
        disabled_by = config.sources.get("enabled", "default")
        console.print(f"caching is disabled ({disabled_by})", markup=False)
        return
    try:
        elapsed = probe_backend(config, rounds)
    except ConfigurationError as error:
        raise fail(str(error)) from None
    except PluginNotFound:
        raise fail(
            f"{config.setting_name('backend')}: unknown dogpile backend {config.backend!r}"
        ) from None
    except ImportError as error:
        raise fail(f"{config.backend} needs a client library: {error}") from None
    except Exception as error:  # any client error means "unreachable"
        raise fail(
            f"{config.backend} is unreachable ({describe_target(config)}): "
            f"{type(error).__name__}: {error}",
            EXIT_UNREACHABLE,
        ) from None
    console.print(f"ok: round trip {elapsed * 1000:.3f} ms (median of {rounds})", markup=False)
    if not backends.backend_class(config.backend).keeps_values:
        console.print(f"note: {config.backend} stores nothing: every read misses", markup=False)
