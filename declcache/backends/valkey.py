"""Valkey: ``dogpile.cache.valkey`` (and its Cluster and Sentinel) on the ``valkey`` client.

``pip install 'declcache[valkey]'``. Valkey speaks Redis' protocol and valkey-py is redis-py's
API under another name, so each class here is its :mod:`~declcache.backends.redis` twin with
three names changed: the client package, the URL scheme for TLS (``valkeys://``) and dogpile's
expiry argument. A near cache is not offered on Valkey (its tracking connection is built and
tested on redis-py only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from declcache.backends.redis import Redis, RedisCluster, RedisSentinel

if TYPE_CHECKING:
    from declcache.backends._arguments import Options

__all__ = ["Valkey", "ValkeyCluster", "ValkeySentinel"]

#: The plugin name of :mod:`declcache.backends._valkey_cluster`'s backend.
PLUGIN = "declcache.valkey_cluster"


def _on_valkey(accepted: Options | None) -> Options:
    """A Redis class's arguments with dogpile's Valkey name for the server expiry."""
    assert accepted is not None  # every Redis class declares its arguments
    return {
        "valkey_expiration_time" if name == "redis_expiration_time" else name: kind
        for name, kind in accepted.items()
    }


class _OnValkey:
    """The names that make a Redis family class a Valkey one."""

    near_cache = False
    client = "valkey"
    expiration_argument = "valkey_expiration_time"
    tls_scheme = "valkeys"


class Valkey(_OnValkey, Redis):
    """``dogpile.cache.valkey``: one Valkey server; ``valkey://`` and ``valkeys://`` URLs."""

    accepted = _on_valkey(Redis.accepted)


class ValkeyCluster(_OnValkey, RedisCluster):
    """``dogpile.cache.valkey_cluster``: ``valkey+cluster://host:port[,host:port]``.

    Configured as declcache's subclass of dogpile's backend, which fails to start as shipped
    (see :mod:`declcache.backends._valkey_cluster`).
    """

    accepted = _on_valkey(RedisCluster.accepted)

    def plugin(self) -> str:
        """Registers and names the subclass."""
        from dogpile.cache import register_backend  # noqa: PLC0415 - only with dogpile present

        register_backend(  # type: ignore[no-untyped-call]
            PLUGIN, "declcache.backends._valkey_cluster", "ValkeyClusterBackend"
        )
        return PLUGIN


class ValkeySentinel(_OnValkey, RedisSentinel):
    """``dogpile.cache.valkey_sentinel``: ``valkey+sentinel://host:port[,…]/service[/db]``."""

    accepted = _on_valkey(RedisSentinel.accepted)
