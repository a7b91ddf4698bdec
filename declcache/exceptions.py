"""The exceptions declcache raises.

Every error derives from one root, so ``except DeclCacheError`` catches all of them::

    DeclCacheError
    ├── ConfigurationError (also a ValueError)
    │   ├── CacheMetaError      a model's CacheMeta is invalid
    │   └── SettingsError       a DECLCACHE_* variable or CacheConfig value is invalid
    ├── NotFoundError (also a LookupError)   a repository lookup found no row
    └── StrictConsistencyError   a strict commit could not mark its rows: nothing committed

Cache *faults* (a backend that is down, a payload that cannot be decoded) are never raised to
the caller: they degrade to the database and are logged and counted instead — except in
``DECLCACHE_CONSISTENCY=strict``, whose commits refuse to go on without the cache.

This module imports nothing else from the package.
"""

from __future__ import annotations

__all__ = [
    "CacheMetaError",
    "ConfigurationError",
    "DeclCacheError",
    "NotFoundError",
    "SettingsError",
    "StrictConsistencyError",
]


class DeclCacheError(Exception):
    """Root of every exception declcache raises."""


class ConfigurationError(DeclCacheError, ValueError):
    """Configuration that cannot work; raised at start-up, never while serving."""


class CacheMetaError(ConfigurationError):
    """A model's ``CacheMeta`` is invalid.

    Attributes:
        model: name of the mapped class.
        attribute: the CacheMeta attribute at fault.
    """

    def __init__(self, model: str, attribute: str, problem: str) -> None:
        self.model = model
        self.attribute = attribute
        super().__init__(f"{model}.CacheMeta.{attribute}: {problem}")


class SettingsError(ConfigurationError):
    """A setting is invalid; the message names the environment variable or argument.

    Attributes:
        setting: the variable (``DECLCACHE_…``) or ``CacheConfig`` argument at fault.
    """

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {problem}")


class NotFoundError(DeclCacheError, LookupError):
    """A repository lookup matched no row."""


class StrictConsistencyError(DeclCacheError):
    """A strict commit could not mark the rows it changes in the cache: nothing was committed.

    Raised from ``session.commit()`` (or the outer connection's ``commit()``) before the
    database commit; roll the session back. The message names the model and the backend's
    error, never a secret.

    Attributes:
        model: name of the model whose markers could not be written.
    """

    def __init__(self, model: str, problem: str) -> None:
        self.model = model
        super().__init__(problem)
