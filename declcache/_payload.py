"""The bytes declcache keeps in a backend: payloads, tombstones and tokens. Pure, no I/O.

Every value is ``<json metadata>|<payload>``, exactly as a dogpile region with a serializer
writes it, so ``region.get()`` and dogpile's tools still read what declcache stores. The
payload is one list encoded by the model's format:

* an entity:   ``[fingerprint, generation, "e", value, value, …]``
* not found:   ``[fingerprint, generation, "n"]``
* a pointer:   ``[fingerprint, generation, "p", primary-key text, …]`` (a ``key_fields`` key)
* a list:      ``[fingerprint, version, "l", [values…], [values…], …]`` (or ``[…, "l", count]``)
* a tombstone: ``[fingerprint, "x<random>"]`` — written on invalidation; it never matches a
  generation, so it reads as a miss, and its unique bytes let a fill detect that it lost a race.
  At a ``key_fields`` key, when the commit knew the row's primary key, it names it:
  ``[fingerprint, "x<random>", "p", primary-key text, …]`` — a pointer under a generation no
  token equals, a miss for every reader (older releases included); a read by that key looks
  the primary-key entry up as well, so that its fill can replace what it saw there.

A *marker* (``DECLCACHE_CONSISTENCY=strict``, :mod:`declcache._strict`) is written by a commit
before the database has it, over entity keys and tokens alike: ``~<claim>@<deadline>…``, one
claim per commit in flight, in dogpile's layout but unstamped and in no model's format, so
that every reader recognises it from its first payload byte whatever the model's serializer.
At an entity key it reads as a miss (as a tombstone does); at a token key it is the token, so
every entry under the old one misses. While one of its claims' deadlines (wall clock) is
ahead, no read may fill what it saw (see :func:`declcache._reads.lagging`).

Every payload's metadata also holds the model's fingerprint, ``{"ct":…,"v":2,"fp":"…"}``,
readable whatever the format. Keys and tokens do not hold it: two releases of a model running
side by side (a column added, another serializer) share every key and token, so a commit by
either invalidates what both cached. Each reads the other's payloads as a plain miss, decided
from the metadata before any row is decoded (an old shape is never deserialized), and its
fill, a compare-and-set against those very bytes, replaces them.

Tokens (a model's generation and list version) are bare random hex strings in the same layout,
without a fingerprint: both releases read and replace the same ones.

A :class:`Payloads` remembers what it parsed by the raw bytes: equal bytes are the same payload,
so parsing and decoding a hot entry once serves every later read of it, in every thread.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cachetools

from declcache._private_apis import cache_items

if TYPE_CHECKING:
    from collections.abc import Mapping

    from declcache._codec import Row
    from declcache.serializers import SerializationFormat

__all__ = [
    "COLLECTION",
    "ENTITY",
    "LIST",
    "NOT_FOUND",
    "POINTER",
    "Payload",
    "PayloadError",
    "Payloads",
    "is_marker",
    "is_tombstone",
    "marker_claims",
    "marker_value",
    "new_token",
    "token_claims",
    "unwrap",
    "unwrap_stamped",
    "wrap",
]

#: dogpile.cache.region.value_version, the layout version dogpile writes and accepts; kept
#: here so that importing declcache never imports dogpile (a test checks the two agree).
value_version = 2

ENTITY, NOT_FOUND, POINTER, LIST = "e", "n", "p", "l"
#: A cached relationship collection: its members' primary keys (:mod:`declcache._associations`).
COLLECTION = "c"
#: What a strict-consistency marker's text starts with, and what separates its claims: a
#: character no token (hex) and no format's payload (a list) starts with.
MARKER = "~"

#: Parsed payloads a model remembers, at most, and the bytes they may take: a payload counts
#: as at least ``REMEMBERED_PAYLOAD_BYTES / REMEMBERED_PAYLOADS`` bytes, so both bounds hold.
REMEMBERED_PAYLOADS = 4096
REMEMBERED_PAYLOAD_BYTES = 8 * 1024 * 1024
#: Parsed tokens a model remembers (its generation and list version, and a few old ones).
REMEMBERED_TOKENS = 8

_SEPARATOR = b"|"

#: A fingerprint's first characters name the model's *lineage* (class and table), the rest
#: its shape: see :func:`declcache._codec.fingerprint`.
LINEAGE_CHARS = 4


class PayloadError(ValueError):
    """A stored value that is not a payload of this model, schema and format."""


def new_token() -> str:
    """A fresh random token: no two writers, processes or restarts ever draw the same one."""
    return secrets.token_hex(8)


def wrap(payload: bytes, stamp: bytes = b"") -> bytes:
    """``payload`` in dogpile's layout, stamped with the current time (and ``stamp``).

    ``stamp`` (a model's fingerprint) goes into the metadata as ``"fp"``: a reader checks
    it before decoding anything, whatever format wrote the payload, and dogpile ignores it.
    The metadata is what ``json.dumps({"ct": time.time(), "v": 2[, "fp": stamp]})`` writes
    (a float's ``repr`` is its JSON text), built without the json module: it is on every
    fill's path.
    """
    if stamp:
        return b'{"ct":%r,"v":%d,"fp":"%b"}|%b' % (time.time(), value_version, stamp, payload)
    return b'{"ct":%r,"v":%d}|%b' % (time.time(), value_version, payload)


#: The metadata every value declcache writes starts and ends with; :func:`unwrap` slices
#: the creation time out from between them instead of running a JSON parser on each read.
_HEAD_START = b'{"ct":'
_HEAD_END = b',"v":%d}' % value_version
_STAMP_START = b',"v":%d,"fp":"' % value_version
_STAMP_END = b'"}'
_MARKER_BYTE = MARKER.encode("ascii")


def marker_value(claims: Mapping[str, float]) -> bytes:
    """What a key holds while the commits ``claims`` names are in flight: ``{claim: deadline}``.

    Deadlines are wall-clock times (``time.time()``), kept to the millisecond.
    """
    text = "".join(f"{MARKER}{claim}@{deadline:.3f}" for claim, deadline in claims.items())
    return wrap(text.encode("ascii"))


def is_marker(raw: Any) -> bool:
    """Whether a stored value is a marker: its first payload byte, after the metadata.

    A quick test, asked of every value a fill would replace: a stamped payload's metadata
    ends before its first ``|``, and no format writes a ``~`` first.
    """
    if type(raw) is not bytes:
        return False
    cut = raw.find(_SEPARATOR)
    return cut > 0 and raw[cut + 1 : cut + 2] == _MARKER_BYTE


def marker_claims(raw: Any) -> dict[str, float] | None:
    """``{claim: deadline}`` of a stored marker; ``None`` when ``raw`` is no marker."""
    if not is_marker(raw):
        return None
    cut = raw.find(_SEPARATOR)
    if not raw.endswith(_HEAD_END, 0, cut):  # a marker is never stamped
        return None
    return _claims(raw[cut + 1 :].decode("ascii", "replace"))


def token_claims(token: str) -> dict[str, float]:
    """``{claim: deadline}`` of the markers in a token as read (``a|b`` in a named scope)."""
    found: dict[str, float] = {}
    for part in token.split("|"):
        if part.startswith(MARKER):
            found.update(_claims(part))
    return found


def _claims(text: str) -> dict[str, float]:
    """Parse ``~claim@deadline~claim@deadline``; an unreadable deadline never ends."""
    found: dict[str, float] = {}
    for item in text.split(MARKER)[1:]:
        claim, _, deadline = item.partition("@")
        try:
            found[claim] = float(deadline)
        except ValueError:
            found[claim] = math.inf
    return found


def unwrap(raw: Any) -> tuple[float, bytes]:
    """``(created_at, payload)`` of a stored value.

    Raises:
        ValueError: ``raw`` is not in dogpile's layout (a foreign or corrupt value).
    """
    created_at, _stamp, payload = unwrap_stamped(raw)
    return created_at, payload


def unwrap_stamped(raw: Any) -> tuple[float, bytes | None, bytes]:
    """``(created_at, stamp, payload)`` of a stored value; ``stamp`` is ``None`` if unstamped.

    Raises:
        ValueError: ``raw`` is not in dogpile's layout (a foreign or corrupt value).
    """
    if type(raw) is bytes and raw.startswith(_HEAD_START):
        cut = raw.find(_SEPARATOR)
        stamp = None
        if raw.endswith(_HEAD_END, 0, cut):
            end = cut - len(_HEAD_END)
        else:
            end = raw.find(_STAMP_START, 0, cut)
            if end > 0 and raw.endswith(_STAMP_END, 0, cut):
                stamp = raw[end + len(_STAMP_START) : cut - len(_STAMP_END)]
        if end > len(_HEAD_START):
            text = raw[len(_HEAD_START) : end]
            if text.replace(b".", b"", 1).isdigit():  # no sign, no exponent
                return float(text), stamp, raw[cut + 1 :]
    return _unwrap_any(raw)


def _unwrap_any(raw: Any) -> tuple[float, bytes | None, bytes]:
    """:func:`unwrap_stamped` for metadata in any JSON spelling, as other writers may use."""
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
    stamp = metadata.get("fp")
    if stamp is not None and not isinstance(stamp, str):
        raise ValueError("metadata with a fingerprint that is not a text")
    return float(created_at), None if stamp is None else stamp.encode(), payload


def is_tombstone(payload: Payload) -> bool:
    """Whether a parsed payload is a tombstone naming a primary key (a dead pointer).

    Its generation is ``x<random>``: a token is hex (and ``|``, ``~`` in a named scope or a
    marker), so it never matches one, and a reader never takes it for a live pointer.
    """
    generation = payload.generation
    return type(generation) is str and generation.startswith("x")


@dataclass(slots=True)
class Payload:
    """A stored payload, parsed; remembered by its raw bytes (see :class:`Payloads`).

    Attributes:
        created_at: when it was written (dogpile's metadata).
        generation: the generation (or list version) it was written under.
        kind: :data:`ENTITY`, :data:`NOT_FOUND`, :data:`POINTER`, :data:`LIST` or
            :data:`COLLECTION`.
        body: what follows the kind: column values, a primary key, rows or a count.
        size: what it counts for against the memo's byte bound.
        rows: the typed rows of an entity or a list, decoded by the first read that needs them.
        owner: the key an entity was last found to belong to (checked once per payload).
    """

    created_at: float
    generation: Any
    kind: Any
    body: list[Any]
    size: int
    rows: list[Row] | None = None
    owner: str | None = None


def _size(payload: Payload) -> int:
    return payload.size


class Payloads:
    """One model's payloads: written in its format under its fingerprint, parsed and remembered.

    Args:
        fingerprint: the model's schema fingerprint, the first item of every payload.
        format: the model's byte format.
    """

    def __init__(self, fingerprint: str, format: SerializationFormat) -> None:
        self._fingerprint = fingerprint
        self._stamp = fingerprint.encode("ascii")
        self._lineage = self._stamp[:LINEAGE_CHARS]
        self._format = format
        # Writes take the lock; reads are plain look-ups of the caches' own dicts.
        self._parsed: cachetools.Cache[bytes, Payload] = cachetools.Cache(
            REMEMBERED_PAYLOAD_BYTES, getsizeof=_size
        )
        self._tokens: cachetools.Cache[bytes, str] = cachetools.Cache(REMEMBERED_TOKENS)
        # Read on every hit, without the lock.
        self._remembered: dict[bytes, Payload] = cache_items(self._parsed)
        self._remembered_tokens: dict[bytes, str] = cache_items(self._tokens)
        self._lock = threading.Lock()
        self._smallest = REMEMBERED_PAYLOAD_BYTES // REMEMBERED_PAYLOADS

    def forget_payloads(self) -> None:
        """Forget every parsed payload: the next read of each parses and decodes it again."""
        with self._lock:
            self._parsed.clear()

    def _bytes(self, data: list[Any]) -> bytes:
        encoded = self._format.dumps(data)
        return wrap(encoded.encode() if isinstance(encoded, str) else encoded, self._stamp)

    def dump(self, generation: str, kind: str, *body: Any) -> bytes:
        """A payload of ``kind`` written under ``generation`` (a generation or list version)."""
        return self._bytes([self._fingerprint, generation, kind, *body])

    def tombstone(self, *primary_key: str) -> bytes:
        """A value no read accepts and no other write ever equals.

        At a ``key_fields`` key, ``primary_key`` (its canonical text, as a pointer holds it)
        names the row the key belonged to: ``[fingerprint, "x<random>", "p", *primary_key]``,
        a pointer under a generation no token ever equals (see :func:`is_tombstone`).
        """
        dead = "x" + secrets.token_hex(8)
        if primary_key:
            return self._bytes([self._fingerprint, dead, POINTER, *primary_key])
        return self._bytes([self._fingerprint, dead])

    @staticmethod
    def token_value(token: str) -> bytes:
        """What a token key holds."""
        return wrap(token.encode("ascii"))

    def token(self, raw: bytes | None) -> str | None:
        """The token a stored token value holds; ``None`` for none or garbage."""
        if raw is None:
            return None
        try:
            return self._remembered_tokens[raw]
        except (KeyError, TypeError):
            pass
        try:
            token = unwrap(raw)[1].decode("ascii")
        except (ValueError, UnicodeDecodeError):
            return None
        if type(raw) is bytes:
            with self._lock:
                self._tokens[raw] = token
        return token

    def parse(self, raw: bytes | None) -> Payload | None:
        """The payload ``raw`` holds, whatever its generation and age; ``None`` if none.

        A tombstone is ``None`` too: it holds nothing, and so does a marker. So is a payload
        another release of this model wrote (same lineage, another fingerprint: another
        schema or format, as while a deploy rolls): expected, so not an error; it is checked
        in the metadata, before anything of it is decoded, and the reader's fill replaces it.

        Raises:
            PayloadError: ``raw`` is not a payload of this model, schema and format.
        """
        if raw is None:
            return None
        try:
            return self._remembered[raw]
        except (KeyError, TypeError):
            pass
        try:
            created_at, stamp, payload = unwrap_stamped(raw)
        except Exception as error:
            raise PayloadError(repr(error)) from error
        if stamp != self._stamp:
            if stamp is not None and stamp[:LINEAGE_CHARS] == self._lineage:
                return None  # another release of this model
            if stamp is None and payload[:1] == _MARKER_BYTE:
                return None  # a strict commit's marker: holds nothing, as a tombstone
            raise PayloadError("a payload of another model, or not stamped by declcache")
        try:
            data = self._format.loads(payload)
        except Exception as error:
            raise PayloadError(repr(error)) from error
        if type(data) is not list or len(data) < 2 or data[0] != self._fingerprint:
            raise PayloadError("a payload of another model, schema or format")
        if len(data) < 3:  # a tombstone
            return None
        parsed = Payload(created_at, data[1], data[2], data[3:], max(len(raw), self._smallest))
        if type(raw) is bytes and parsed.size <= REMEMBERED_PAYLOAD_BYTES:
            with self._lock:
                self._parsed[raw] = parsed
        return parsed
