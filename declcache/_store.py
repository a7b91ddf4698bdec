"""The few atomic operations declcache needs, on top of each dogpile backend's own client.

dogpile's region API has ``get``/``set``/``delete`` but no "set if absent" and no
"compare and set", and the no-stale-fill guarantee needs both: a fill may only replace exactly
what the reader saw before it queried the database. Each store here uses the backend's native
atomic primitive — Redis ``SET NX`` and a Lua compare-and-set, Memcached ``add`` and
``gets``/``cas``, a lock for the in-process memory dict, dogpile's file lock for dbm — on the
very connections the region configured.

Values are the raw bytes of :mod:`declcache._wire`; ``None`` means "no value".
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping, MutableMapping, Sequence

__all__ = ["Store", "store_for"]

logger = logging.getLogger("declcache.store")

#: One compare-and-set: ``(key, expected raw value or None for absent, new raw value)``.
Swap = tuple[str, bytes | None, bytes]


class Store(Protocol):
    """Atomic access to one backend; every method may raise the client's own errors."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Raw values in the order of ``keys``, ``None`` where absent."""

    def set_many(self, mapping: Mapping[str, bytes], ttl: int) -> None:
        """Write unconditionally, each key expiring after ``ttl`` seconds on the server."""

    def write_many(self, entries: Sequence[tuple[str, bytes, int]]) -> None:
        """Write unconditionally in one round trip: each (key, value, ttl in seconds)."""

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        """Write ``value`` only if ``key`` is absent; whether it was written."""

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:
        """For each swap, write the new value only if the key still holds the expected one."""

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove keys; absent keys are fine."""


class MemoryStore:
    """The dict behind dogpile's memory backend, guarded by one lock for the atomic steps."""

    def __init__(self, data: MutableMapping[str, Any]) -> None:
        self._data = data
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Plain dict reads: atomic under the GIL."""
        get = self._data.get
        return [get(key) for key in keys]

    def set_many(self, mapping: Mapping[str, bytes], ttl: int) -> None:  # noqa: ARG002
        """Write under the lock so a concurrent compare-and-set sees all or nothing."""
        with self._lock:
            self._data.update(mapping)

    def write_many(self, entries: Sequence[tuple[str, bytes, int]]) -> None:
        """Write under the lock, like :meth:`set_many`: the ttls are the LRU's business."""
        with self._lock:
            for key, value, _ in entries:
                self._data[key] = value

    def add(self, key: str, value: bytes, ttl: int) -> bool:  # noqa: ARG002
        """Set if absent, under the lock."""
        with self._lock:
            if key in self._data:
                return False
            self._data[key] = value
            return True

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:  # noqa: ARG002
        """Compare and set each key, under the lock."""
        results = []
        with self._lock:
            for key, expected, new in swaps:
                matches = self._data.get(key) == expected
                if matches:
                    self._data[key] = new
                results.append(matches)
        return results

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove under the lock."""
        with self._lock:
            for key in keys:
                self._data.pop(key, None)


_REDIS_COMPARE_AND_SET = """
local results = {}
local ttl = ARGV[#ARGV]
for i, key in ipairs(KEYS) do
  local expected = ARGV[2 * i - 1]
  local current = redis.call('GET', key)
  if (current == false and expected == '') or current == expected then
    redis.call('SET', key, ARGV[2 * i], 'EX', ttl)
    results[i] = 1
  else
    results[i] = 0
  end
end
return results
"""


class RedisStore:
    """Redis through the region's own client: ``MGET``, ``SET NX EX`` and a Lua script."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._script = client.register_script(_REDIS_COMPARE_AND_SET)
        # A cluster runs a script only on keys of one slot: one call per key there.
        self._per_key = type(client).__name__ == "RedisCluster"

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One ``MGET`` (on a cluster, one per slot, in the order of ``keys``)."""
        if self._per_key:
            found: list[bytes | None] = self._client.mget_nonatomic(list(keys))
            return found
        values: list[bytes | None] = self._client.mget(keys)
        return values

    def set_many(self, mapping: Mapping[str, bytes], ttl: int) -> None:
        """``SET EX`` for every key in one pipeline."""
        self.write_many([(key, value, ttl) for key, value in mapping.items()])

    def write_many(self, entries: Sequence[tuple[str, bytes, int]]) -> None:
        """``SET EX`` for every entry in one non-transactional pipeline: one round trip.

        On a cluster, redis-py's cluster pipeline sends one batch per node instead.
        """
        pipe = self._client.pipeline(transaction=False)
        for key, value, ttl in entries:
            pipe.set(key, value, ex=ttl)
        pipe.execute()

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        """``SET key value NX EX ttl``."""
        return bool(self._client.set(key, value, nx=True, ex=ttl))

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:
        """One script call (one per key on a cluster)."""
        if self._per_key:
            return [flag for swap in swaps for flag in self._script_call([swap], ttl)]
        return self._script_call(swaps, ttl)

    def _script_call(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:
        keys = [key for key, _, _ in swaps]
        args: list[bytes | int] = []
        for _, expected, new in swaps:
            args += [expected if expected is not None else b"", new]
        args.append(ttl)
        return [bool(flag) for flag in self._script(keys=keys, args=args)]

    def reset_connections(self) -> None:
        """Close every pooled connection; each reconnects on its next use."""
        if self._per_key:
            self._client.disconnect_connection_pools()
        else:
            self._client.connection_pool.disconnect()

    def delete_many(self, keys: Sequence[str]) -> None:
        """``DEL`` (one per key on a cluster)."""
        if self._per_key:
            for key in keys:
                self._client.delete(key)
        else:
            self._client.delete(*keys)


class MemcachedStore:
    """Memcached through pymemcache: ``get_many``, ``add`` and ``gets``/``cas``."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend  # its ``client`` is thread-local: fetch it per call

    def reset_connections(self) -> None:
        """Close every thread's client; each reconnects on its next call."""
        close = getattr(self._backend, "close_clients", None)  # declcache's backend has it
        if close is not None:
            close()

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One multi-get."""
        found = self._backend.client.get_many(keys)
        return [found.get(key) for key in keys]

    def set_many(self, mapping: Mapping[str, bytes], ttl: int) -> None:
        """One multi-set; keys the server refused are reported by the client and re-raised."""
        self._set_many(self._backend.client, dict(mapping), ttl)

    @staticmethod
    def _set_many(client: Any, mapping: dict[str, bytes], ttl: int) -> None:
        failed = client.set_many(mapping, expire=ttl, noreply=False)
        if failed:
            raise ConnectionError(f"memcached did not store {len(failed)} keys")

    def write_many(self, entries: Sequence[tuple[str, bytes, int]]) -> None:
        """One acknowledged multi-set per distinct ttl: the fewest pymemcache allows.

        pymemcache gives a whole ``set_many`` one expiry, and pipelining the other batches as
        ``noreply`` is not an option: memcached then drops a refused store without a word,
        and a lost tombstone would let a stale row back in.
        """
        latest = {key: (value, ttl) for key, value, ttl in entries}  # the last write wins
        batches: dict[int, dict[str, bytes]] = {}
        for key, (value, ttl) in latest.items():
            batches.setdefault(ttl, {})[key] = value
        client = self._backend.client
        for ttl, batch in batches.items():
            self._set_many(client, batch, ttl)

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        """Memcached ``add``."""
        return bool(self._backend.client.add(key, value, expire=ttl, noreply=False))

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:
        """``add`` where the reader saw nothing, else ``gets`` then ``cas``."""
        client = self._backend.client
        results = []
        for key, expected, new in swaps:
            if expected is None:
                results.append(bool(client.add(key, new, expire=ttl, noreply=False)))
                continue
            current, token = client.gets(key)
            results.append(
                current == expected and bool(client.cas(key, new, token, expire=ttl, noreply=False))
            )
        return results

    def delete_many(self, keys: Sequence[str]) -> None:
        """One multi-delete."""
        self._backend.client.delete_many(list(keys), noreply=False)


class DbmStore:
    """dogpile's dbm file: every step inside one open of the file under its read/write lock.

    The lock is a file lock, so the atomic steps hold between processes on one host too.
    """

    def __init__(self, backend: Any) -> None:
        self._open = backend._dbm_file

    @staticmethod
    def _get(db: Any, key: str) -> bytes | None:
        try:
            value: bytes = db[key]
        except KeyError:
            return None
        return value

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read under the shared lock."""
        with self._open(False) as db:
            return [self._get(db, key) for key in keys]

    def set_many(self, mapping: Mapping[str, bytes], ttl: int) -> None:
        """Write under the exclusive lock."""
        self.write_many([(key, value, ttl) for key, value in mapping.items()])

    def write_many(self, entries: Sequence[tuple[str, bytes, int]]) -> None:
        """Write in one open of the file, under the exclusive lock; the file has no expiry."""
        with self._open(True) as db:
            for key, value, _ in entries:
                db[key] = value

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        """Set if absent, under the exclusive lock."""
        return self.compare_and_set([(key, None, value)], ttl)[0]

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:  # noqa: ARG002
        """Compare and set under the exclusive lock."""
        results = []
        with self._open(True) as db:
            for key, expected, new in swaps:
                matches = self._get(db, key) == expected
                if matches:
                    db[key] = new
                results.append(matches)
        return results

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove under the exclusive lock."""
        with self._open(True) as db:
            for key in keys:
                if key in db:
                    del db[key]


class SerializedStore:
    """A third-party dogpile backend through its serialized API.

    It offers no atomic step, so set-if-absent and compare-and-set are a read then a write
    under a lock of this process: correct between threads, racy between processes (a warning
    says so when the store is made).
    """

    def __init__(self, backend: Any) -> None:
        from dogpile.cache.api import NO_VALUE  # noqa: PLC0415

        self._backend = backend
        self._no_value = NO_VALUE
        self._lock = threading.Lock()
        logger.warning(
            "%s has no atomic set-if-absent: fills after a concurrent invalidation "
            "are refused only within one process",
            type(backend).__name__,
        )

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The backend's serialized multi-get."""
        values = self._backend.get_serialized_multi(list(keys))
        return [None if value is self._no_value else value for value in values]

    def set_many(self, mapping: Mapping[str, bytes], ttl: int) -> None:  # noqa: ARG002
        """The backend's serialized multi-set."""
        with self._lock:
            self._backend.set_serialized_multi(dict(mapping))

    def write_many(self, entries: Sequence[tuple[str, bytes, int]]) -> None:
        """One serialized multi-set: the backend expires entries by its own region ttl."""
        self.set_many({key: value for key, value, _ in entries}, 0)

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        """Set if absent (within this process)."""
        return self.compare_and_set([(key, None, value)], ttl)[0]

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:  # noqa: ARG002
        """Compare and set (within this process)."""
        results = []
        with self._lock:
            for key, expected, new in swaps:
                current = self._backend.get_serialized(key)
                matches = (None if current is self._no_value else current) == expected
                if matches:
                    self._backend.set_serialized(key, new)
                results.append(matches)
        return results

    def delete_many(self, keys: Sequence[str]) -> None:
        """The backend's multi-delete."""
        with self._lock:
            self._backend.delete_multi(list(keys))


class NullStore:
    """``dogpile.cache.null``: remembers nothing, so every lookup misses."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Nothing is ever found."""
        return [None] * len(keys)

    def set_many(self, mapping: Mapping[str, bytes], ttl: int) -> None:
        """Dropped."""

    def write_many(self, entries: Sequence[tuple[str, bytes, int]]) -> None:
        """Dropped."""

    def add(self, key: str, value: bytes, ttl: int) -> bool:  # noqa: ARG002
        """Claims success; the value is dropped."""
        return True

    def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:  # noqa: ARG002
        """Claims success; the values are dropped."""
        return [True] * len(swaps)

    def delete_many(self, keys: Sequence[str]) -> None:
        """Nothing to delete."""


def store_for(backend: Any) -> Store:
    """The store for a configured dogpile backend instance."""
    from dogpile.cache.backends.memory import MemoryBackend  # noqa: PLC0415
    from dogpile.cache.backends.null import NullBackend  # noqa: PLC0415

    if isinstance(backend, MemoryBackend):
        return MemoryStore(backend._cache)
    if isinstance(backend, NullBackend):
        return NullStore()
    client = getattr(backend, "writer_client", None)
    if client is not None:  # dogpile's redis, redis_sentinel and redis_cluster backends
        return RedisStore(client)
    if type(backend).__name__ == "PyMemcacheBackend":
        return MemcachedStore(backend)
    if type(backend).__name__ == "DBMBackend":
        return DbmStore(backend)
    return SerializedStore(backend)
