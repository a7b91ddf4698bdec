"""The ``declcache`` command: check the backend, inspect models, read stats, invalidate.

Every command reads the cache settings the application would: ``CacheConfig.from_env()``
(``DECLCACHE_*`` variables and ``.env``). Exit codes: ``0`` success, ``1`` the backend could
not be reached or did not take the operation, ``2`` a usage or configuration error (an
unimportable module, an unknown model, an invalid CacheMeta or setting).

One module per command, each registering itself on the shared Typer ``app``.
Install it with ``pip install 'declcache[cli]'``; ``python -m declcache`` runs the same.
"""

from __future__ import annotations

from declcache.cli import _check, _inspect, _invalidate, _stats
from declcache.cli._app import app, main

__all__ = ["app", "main"]

_COMMANDS = (_check, _inspect, _invalidate, _stats)  # imported for their registration on app
