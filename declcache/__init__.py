"""declcache: declarative, transaction-aware model caching for SQLAlchemy.

Declare ``class CacheMeta`` on a model, build a :class:`CacheManager` from a
:class:`CacheConfig` (or ``CacheConfig.from_env()``), and the stock repositories read through
the cache.
"""

from declcache._api import Lookup
from declcache._listeners import setup_cache_listeners
from declcache._manager import CacheManager
from declcache._meta import ModelSpec
from declcache._stats import ModelStats
from declcache.exceptions import (
    CacheMetaError,
    ConfigurationError,
    DeclCacheError,
    NotFoundError,
    SettingsError,
    StrictConsistencyError,
)
from declcache.settings import CacheConfig, CacheSettings

__version__ = "0.1.0"

__all__ = [
    "CacheConfig",
    "CacheManager",
    "CacheMetaError",
    "CacheSettings",
    "ConfigurationError",
    "DeclCacheError",
    "Lookup",
    "ModelSpec",
    "ModelStats",
    "NotFoundError",
    "SettingsError",
    "StrictConsistencyError",
    "__version__",
    "setup_cache_listeners",
]
