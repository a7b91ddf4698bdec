"""The bytes declcache keeps in a backend, in dogpile.cache's own value layout.

Every value is ``<json metadata>|<payload>``, exactly as a dogpile region with a serializer
writes it, so ``region.get()`` and dogpile's tools still read what declcache stores. The
payload is one list encoded by the model's format:

* an entity:   ``[fingerprint, generation, value, value, …]``
* not found:   ``[fingerprint, generation]``
* a list:      ``[fingerprint, version, [values…], [values…], …]`` (or ``[…, version, count]``)
* a tombstone: ``[fingerprint, "x<random>"]`` — written on invalidation; it never matches a
  generation, so it reads as a miss, and its unique bytes let a fill detect that it lost a race.

Tokens (a model's generation and list version) are bare random hex strings in the same layout.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

#: dogpile.cache.region.value_version, the layout version dogpile writes and accepts; kept
#: here so that importing declcache never imports dogpile (a test checks the two agree).
value_version = 2

__all__ = ["new_token", "tombstone_marker", "unwrap", "wrap"]

_SEPARATOR = b"|"


def new_token() -> str:
    """A fresh random token: no two writers, processes or restarts ever draw the same one."""
    return secrets.token_hex(8)


def tombstone_marker() -> str:
    """A generation-like value no generation token ever equals."""
    return "x" + secrets.token_hex(8)


def wrap(payload: bytes) -> bytes:
    """``payload`` in dogpile's layout, stamped with the current time."""
    metadata = json.dumps({"ct": time.time(), "v": value_version}, separators=(",", ":"))
    return metadata.encode("ascii") + _SEPARATOR + payload


def unwrap(raw: Any) -> tuple[float, bytes]:
    """``(created_at, payload)`` of a stored value.

    Raises:
        ValueError: ``raw`` is not in dogpile's layout (a foreign or corrupt value).
    """
    if isinstance(raw, str):
        raw = raw.encode()
    if not isinstance(raw, bytes):
        raise ValueError(f"expected bytes, got {type(raw).__name__}")
    head, separator, payload = raw.partition(_SEPARATOR)
    if not separator:
        raise ValueError("no dogpile metadata")
    metadata = json.loads(head)
    if not isinstance(metadata, dict) or metadata.get("v") != value_version:
        raise ValueError("metadata of another dogpile value version")
    created_at = metadata["ct"]
    if not isinstance(created_at, (int, float)):
        raise ValueError("metadata without a creation time")
    return float(created_at), payload
