"""Valkey: ``dogpile.cache.valkey`` on the ``valkey`` client (``pip install 'declcache[valkey]'``).

Valkey speaks Redis' protocol and valkey-py is redis-py's API under another name, so this family
is :class:`~declcache.backends.redis.Redis` with three names changed: the client package, the
URL scheme for TLS (``valkeys://``) and dogpile's expiry argument. A near cache is not offered
on Valkey (its tracking connection is built and tested on redis-py only).
"""

from __future__ import annotations

from declcache.backends.redis import Redis

__all__ = ["Valkey"]


class Valkey(Redis):
    """``dogpile.cache.valkey``: one Valkey server; ``valkey://`` and ``valkeys://`` URLs."""

    near_cache = False
    client = "valkey"
    expiration_argument = "valkey_expiration_time"
    tls_scheme = "valkeys"
