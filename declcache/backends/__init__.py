"""Every backend declcache knows, looked up by dogpile name or URL scheme, imported lazily.

One :func:`register_backend` line per dogpile backend, as dogpile.cache's own
``backends/__init__.py`` does: the names a user may write (dogpile's name first, then
aliases), the URL schemes that mean it, and the class that serves it. A family's module is
imported the first time one of its names or schemes is used, so a Redis deployment never
imports pymemcache. A dogpile backend no line names (a third-party plugin) gets
:class:`~declcache.backends._generic.Generic`.

Adding a backend is one module with a :class:`~declcache.backends._base.Backend` subclass
and one line below.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from declcache._secrets import mask_url, redact, secrets_in
from declcache.backends._base import Backend, BackendSettings
from declcache.backends._generic import Generic

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "Backend",
    "BackendSettings",
    "backend_class",
    "canonical_name",
    "check_arguments",
    "open_backend",
    "parse_url",
    "register_backend",
]


@dataclass(frozen=True)
class _Registration:
    names: tuple[str, ...]
    schemes: tuple[str, ...]
    target: str  # "package.module:Class"


_registrations: list[_Registration] = []
_loaded: dict[str, type[Backend]] = {}
_lock = threading.Lock()


def register_backend(names: tuple[str, ...], schemes: tuple[str, ...], target: str) -> None:
    """Make ``target`` (``"package.module:Class"``) serve dogpile ``names`` and URL ``schemes``.

    The first name is the one a configuration is normalised to; the others are aliases.
    """
    _registrations.append(_Registration(names, schemes, target))


register_backend(("dogpile.cache.redis",), ("redis", "rediss"), "declcache.backends.redis:Redis")
register_backend(
    ("dogpile.cache.redis_cluster",), ("redis+cluster",), "declcache.backends.redis:RedisCluster"
)
register_backend(
    ("dogpile.cache.redis_sentinel",),
    ("redis+sentinel",),
    "declcache.backends.redis:RedisSentinel",
)
register_backend(
    # dogpile's own "memcached" backend needs python-memcached; pymemcache is the maintained
    # client and the one our extra installs, so both names mean the same thing here.
    ("dogpile.cache.pymemcache", "dogpile.cache.memcached"),
    ("memcached",),
    "declcache.backends.memcached:PyMemcache",
)
register_backend(("dogpile.cache.bmemcached",), (), "declcache.backends.memcached:BMemcached")
register_backend(("dogpile.cache.dbm",), ("file",), "declcache.backends.dbm:Dbm")
register_backend(("dogpile.cache.memory",), ("memory",), "declcache.backends.memory:Memory")
register_backend(("dogpile.cache.null",), ("null",), "declcache.backends.null:Null")
register_backend(
    ("dogpile.cache.valkey",), ("valkey", "valkeys"), "declcache.backends.valkey:Valkey"
)
register_backend(
    ("dogpile.cache.valkey_cluster",),
    ("valkey+cluster",),
    "declcache.backends.valkey:ValkeyCluster",
)
register_backend(
    ("dogpile.cache.valkey_sentinel",),
    ("valkey+sentinel",),
    "declcache.backends.valkey:ValkeySentinel",
)


def _registration(name: str) -> _Registration | None:
    return next((found for found in _registrations if name in found.names), None)


def _load(registration: _Registration) -> type[Backend]:
    with _lock:
        loaded = _loaded.get(registration.target)
        if loaded is None:
            module_name, _, attribute = registration.target.partition(":")
            loaded = _loaded[registration.target] = getattr(
                importlib.import_module(module_name), attribute
            )
    return loaded


def canonical_name(name: str) -> str:
    """The name ``name`` stands for: ``dogpile.cache.memcached`` is ``dogpile.cache.pymemcache``."""
    found = _registration(name)
    return name if found is None else found.names[0]


def backend_class(name: str) -> type[Backend]:
    """The family serving dogpile backend ``name`` (an alias, or an unknown name, works too)."""
    found = _registration(name)
    return Generic if found is None else _load(found)


def open_backend(name: str, arguments: Mapping[str, Any], settings: BackendSettings) -> Backend:
    """A manager's use of backend ``name`` with ``arguments``."""
    return backend_class(name)(canonical_name(name), arguments, settings)


def check_arguments(name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """``arguments`` of backend ``name``, each name and value checked against what it reads.

    Raises:
        ValueError: an argument the backend does not read (with a did-you-mean), or a value
            of the wrong kind or out of bounds; the message never quotes a secret.
    """
    return backend_class(name).check_arguments(arguments)


def _parsed(url: str) -> tuple[str, dict[str, Any]] | str:
    """What :func:`parse_url` returns, or the problem (returned, so no exception keeps ``url``)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    for registration in _registrations:
        if scheme in registration.schemes:
            try:
                return registration.names[0], _load(registration).parse_url(url)
            except ValueError as error:
                return str(error)
    known = ", ".join(f"{scheme}://" for found in _registrations for scheme in found.schemes)
    return f"unknown scheme in {mask_url(url)!r}; expected one of {known}"


def parse_url(url: str) -> tuple[str, dict[str, Any]]:
    """``(backend name, arguments)`` a cache URL means.

    Raises:
        ValueError: the URL has an unknown scheme or is malformed; the message says how,
            with the URL's password masked and without its exception chain (which would
            quote the URL).
    """
    parsed = _parsed(url)
    if isinstance(parsed, str):
        raise ValueError(redact(parsed, secrets_in(url)))
    return parsed
