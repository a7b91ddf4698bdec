"""dogpile's Valkey Cluster backend, without the line that stops it from starting.

dogpile.cache 1.5's ``ValkeyClusterBackend._create_client`` evaluates
``typing.cast(valkey.Valkey[bytes], …)`` at run time, and valkey-py's ``Valkey`` is not a
generic class: every region fails to configure with ``TypeError``. This subclass builds the
same client without the cast; declcache.backends.valkey configures it for
``dogpile.cache.valkey_cluster``, and dogpile loads this module only then.
"""

from __future__ import annotations

from typing import Any

from dogpile.cache.backends.valkey import ValkeyClusterBackend as _DogpileValkeyClusterBackend

__all__ = ["ValkeyClusterBackend"]


class ValkeyClusterBackend(_DogpileValkeyClusterBackend):
    """dogpile's backend, its client made as dogpile means to."""

    def _create_client(self) -> None:
        import valkey.cluster  # noqa: PLC0415 - dogpile imports its clients late too

        client: Any
        if self.url is not None:
            client = valkey.cluster.ValkeyCluster.from_url(self.url, **self.connection_kwargs)  # type: ignore[no-untyped-call]
        else:
            client = valkey.cluster.ValkeyCluster(
                startup_nodes=self.startup_nodes, **self.connection_kwargs
            )
        self.writer_client = self.reader_client = client
