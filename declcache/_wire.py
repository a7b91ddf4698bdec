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
import math
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
    """``payload`` in dogpile's layout, stamped with the current time.

    The metadata is what ``json.dumps({"ct": time.time(), "v": 2})`` writes (a float's
    ``repr`` is its JSON text), built without the json module: it is on every fill's path.
    """
    return b'{"ct":%r,"v":%d}|%b' % (time.time(), value_version, payload)


#: The metadata every value declcache writes starts and ends with; :func:`unwrap` slices
#: the creation time out from between them instead of running a JSON parser on each read.
_HEAD_START = b'{"ct":'
_HEAD_END = b',"v":%d}' % value_version


def unwrap(raw: Any) -> tuple[float, bytes]:
    """``(created_at, payload)`` of a stored value.

    Raises:
        ValueError: ``raw`` is not in dogpile's layout (a foreign or corrupt value).
    """
    if type(raw) is bytes and raw.startswith(_HEAD_START):
        cut = raw.find(_SEPARATOR)
        if raw.endswith(_HEAD_END, 0, cut) and cut > len(_HEAD_START) + len(_HEAD_END):
            text = raw[len(_HEAD_START) : cut - len(_HEAD_END)]
            if text.replace(b".", b"", 1).isdigit():  # no sign, no exponent
                return float(text), raw[cut + 1 :]
    return _unwrap_any(raw)


def _unwrap_any(raw: Any) -> tuple[float, bytes]:
    """:func:`unwrap` for metadata in any JSON spelling, as other dogpile writers may use."""
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
    if isinstance(created_at, bool) or not isinstance(created_at, (int, float)):
        raise ValueError("metadata without a creation time")
    if not math.isfinite(created_at):
        raise ValueError("metadata with a creation time that is not a number")
    return float(created_at), payload
