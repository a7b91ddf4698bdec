"""``declcache check``: reach the configured backend and time a round trip."""

from __future__ import annotations

import contextlib
import statistics
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any

import typer
from dogpile.cache.exception import PluginNotFound

from declcache import backends
from declcache._near import probe_tracking
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

__all__ = ["FeatureRefused", "check", "client_problem", "probe_backend"]

#: What a client's error says when the server dropped a plain connection (a TLS port does).
_DROPPED = ("closed by server", "connection reset", "error while reading", "timeout reading")


class FeatureRefused(Exception):
    """The backend answers, but refuses what a configured feature needs (an ACL rule)."""


def probe_backend(config: CacheConfig, rounds: int = 5) -> float:
    """Write, read back and delete a probe key under the prefix; the median round trip in s.

    Then try what the configured features need beyond reads and writes: the distributed
    lock's own key, and the near cache's client tracking. A user whose ACL refuses either
    would otherwise see the feature silently off at run time.

    Raises:
        RuntimeError: the probe read back something else than it wrote.
        FeatureRefused: a configured feature cannot work with this server or user.
        Exception: whatever the backend's client raises when it cannot be reached.
    """
    backend = backends.open_backend(config.backend, config.arguments, config)
    region = backend.make_region("check", 60)
    store = backend.store(region)
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
        if config.arguments.get("distributed_lock"):
            _probe_lock(region, key)
        if config.near_cache:
            _probe_near_cache(backend.tracking_pool(region), config.key_prefix)
    finally:
        with contextlib.suppress(Exception):  # the probe key expires on its own
            store.delete_many([key])
    return statistics.median(timings)


def _probe_lock(region: Any, key: str) -> None:
    mutex = region.backend.get_mutex(key)
    try:
        if mutex is not None and mutex.acquire(False):
            mutex.release()
    except Exception as error:
        raise FeatureRefused(
            f"distributed_lock: the fill lock on {key!r} was refused; dogpile names it "
            f"'_lock' + the key, so an ACL user needs that pattern too, e.g. "
            f"~_lock<prefix>* ({type(error).__name__}: {error})"
        ) from None


def _probe_near_cache(pool: Any, key_prefix: str) -> None:
    try:
        probe_tracking(pool, key_prefix)
    except Exception as error:
        raise FeatureRefused(
            "near_cache: CLIENT TRACKING was refused, so the near cache would stay off "
            "(an ACL user needs +client|tracking and +client|id) "
            f"({type(error).__name__}: {error})"
        ) from None


def client_problem(error: Exception, config: CacheConfig) -> str:
    """What went wrong reaching the backend, in the user's terms, then the client's own words.

    A refused login, an untrusted certificate and a key outside an ACL user's pattern each
    name what to fix; anything else is "unreachable". The result may quote the client's
    error: the caller redacts it.
    """
    said = f"{type(error).__name__}: {error}"
    lowered = said.lower()
    if type(error).__name__ == "NoPermissionError" or "noperm" in lowered:
        return (
            f"NOPERM: key prefix {config.key_prefix!r} outside the user's key pattern "
            f"(set DECLCACHE_KEY_PREFIX inside it, or widen the ACL's ~pattern) ({said})"
        )
    if type(error).__name__ == "AuthenticationError" or "wrongpass" in lowered:
        user = config.arguments.get("username") or "default"
        return f"authentication failed for user {user!r}: check the password ({said})"
    if "certificate verify failed" in lowered:
        return (
            "certificate verify failed: the server's certificate is not signed by a CA "
            f"this client trusts (set ssl_ca_certs) ({said})"
        )
    problem = f"unreachable ({said})"
    can_tls = "ssl" in (backends.backend_class(config.backend).accepted or {})  # Redis family
    if can_tls and not config.arguments.get("ssl") and any(d in lowered for d in _DROPPED):
        problem += "; a server that speaks TLS drops plain connections: use a rediss:// URL"
    return problem


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
    secrets = config.secrets
    try:
        elapsed = probe_backend(config, rounds)
    except ConfigurationError as error:
        raise fail(str(error), secrets=secrets) from None
    except FeatureRefused as error:
        raise fail(f"{config.backend} ({target}): {error}", EXIT_UNREACHABLE, secrets) from None
    except PluginNotFound:
        raise fail(
            f"{config.setting_name('backend')}: unknown dogpile backend {config.backend!r}"
        ) from None
    except ImportError as error:
        raise fail(f"{config.backend} needs a client library: {error}", secrets=secrets) from None
    except Exception as error:  # a client error: the backend cannot be used as configured
        problem = client_problem(error, config)
        raise fail(f"{config.backend} ({target}): {problem}", EXIT_UNREACHABLE, secrets) from None
    console.print(f"ok: round trip {elapsed * 1000:.3f} ms (median of {rounds})", markup=False)
    if not backends.backend_class(config.backend).keeps_values:
        console.print(f"note: {config.backend} stores nothing: every read misses", markup=False)
