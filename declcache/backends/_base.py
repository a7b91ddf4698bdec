"""What every backend family shares: the :class:`Backend` base and the async adapter.

A family module (``memory``, ``redis``, ``memcached``…) subclasses :class:`Backend` once per
dogpile backend it serves and declares, as class attributes and methods, everything declcache
needs to know about it: the arguments it adds to the user's, whether its calls block, whether
a near cache can sit on it, how a URL of its scheme reads, and its sync and async stores.
Nothing outside ``declcache.backends`` asks which backend it is talking to.

An instance belongs to one :class:`~declcache.CacheManager` and holds what the regions of
that manager share: a connection pool, the in-process dict, async clients.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, ClassVar, Protocol
from urllib.parse import parse_qsl

from declcache.backends import _arguments

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from dogpile.cache.region import CacheRegion

    from declcache._api import AsyncStore, Store, Swap, Write
    from declcache.backends._arguments import Options

__all__ = [
    "DEFAULT_LOCK_BLOCKING_TIMEOUT",
    "DEFAULT_LOCK_TIMEOUT",
    "SERVER_EXPIRY_GRACE",
    "Backend",
    "BackendSettings",
    "SyncStoreAdapter",
]

#: Seconds a key outlives its ttl on the server: dogpile expires it first (softly), the server
#: then reclaims the memory. Keeps a clock skew between writers from dropping fresh entries.
SERVER_EXPIRY_GRACE = 60
#: Seconds a distributed fill lock lives unless configured (``lock_timeout``): a process that
#: dies holding one must not make the others wait forever (dogpile's default is "never
#: expires"). It only has to outlive one fill (a query and a write); a fill that takes longer
#: loses the lock and another process may fill too, which costs a query, not correctness.
DEFAULT_LOCK_TIMEOUT = 10
#: Seconds a reader waits at most for another process's fill lock unless configured
#: (``lock_blocking_timeout``), then reads the database (see :mod:`declcache._fill_lock`):
#: a fill takes milliseconds, so a lock held longer is most likely orphaned.
DEFAULT_LOCK_BLOCKING_TIMEOUT = 2.0


class BackendSettings(Protocol):
    """The settings a backend reads besides its arguments (a ``CacheConfig`` has them)."""

    @property
    def memory_max_entries(self) -> int:
        """Entries the memory backend keeps."""


def _passthrough(payload: Any) -> Any:
    """Region (de)serializer: payloads are bytes declcache encoded itself."""
    return payload


class Backend:
    """One manager's use of one family of dogpile backends.

    Args:
        name: the dogpile backend name it was registered under (aliases resolved).
        arguments: the backend arguments the user configured.
        settings: the manager's configuration.
    """

    #: Whether its calls do network or file I/O: async callers then run them in a thread.
    blocking: ClassVar[bool] = True
    #: Whether a near cache (Redis client tracking) can keep a copy of its values coherent.
    near_cache: ClassVar[bool] = False
    #: Whether what is written can be read back (the null backend keeps nothing).
    keeps_values: ClassVar[bool] = True
    #: The arguments its dogpile backend reads, each with its kind (see
    #: :mod:`~declcache.backends._arguments`); ``None``: whatever it is given (a plugin).
    accepted: ClassVar[Options | None] = None
    #: ``(mapping, names)``: arguments its client reads that dogpile passes through that
    #: mapping (Redis' ``connection_kwargs``); given at the top level, they are moved there.
    client_arguments: ClassVar[tuple[str, Options] | None] = None

    def __init__(self, name: str, arguments: Mapping[str, Any], settings: BackendSettings) -> None:
        self.name = name
        self.arguments = dict(arguments)
        self.settings = settings
        self._first: CacheRegion | None = None

    # -- what the family declares ------------------------------------------------------------

    @classmethod
    def parse_url(cls, url: str) -> dict[str, Any]:
        """The arguments a URL of this family's scheme means.

        Raises:
            ValueError: the URL is malformed; the message says how.
        """
        raise ValueError(f"{cls.__name__} has no URL form: {url!r}")

    @classmethod
    def check_arguments(cls, arguments: Mapping[str, Any], *, text: bool = False) -> dict[str, Any]:
        """``arguments`` checked: each name against :attr:`accepted`, each value against its kind.

        ``text``: they are a URL's query options, each converted from text by its kind.

        Raises:
            ValueError: an unknown name (with a did-you-mean) or a bad value; the message
                names it and never quotes a secret.
        """
        if cls.accepted is None:
            return dict(arguments)
        return _arguments.checked(
            arguments, cls.accepted, text=text, passed_on=cls.client_arguments
        )

    @classmethod
    def query_options(cls, query: str) -> dict[str, Any]:
        """A URL's query options as checked arguments: ``?socket_timeout=0.2`` → ``0.2``.

        Raises:
            ValueError: an option the backend does not read, or a value of the wrong kind.
        """
        return cls.check_arguments(dict(parse_qsl(query, keep_blank_values=True)), text=True)

    @staticmethod
    def server_ttl(ttl: int) -> int:
        """Seconds a key of a model with ``ttl`` lives on the server: a little longer.

        dogpile expires an entry first (softly); the server then reclaims the memory. The
        grace keeps a clock skew between writers from dropping fresh entries.
        """
        return ttl + SERVER_EXPIRY_GRACE

    def plugin(self) -> str:
        """The dogpile plugin a region is configured with: the backend's own name by default."""
        return self.name

    def region_arguments(self, ttl: int, first: CacheRegion | None) -> dict[str, Any]:  # noqa: ARG002 - families use them
        """The arguments of one model's region: the user's, with declcache's defaults.

        ``first`` is this manager's first region, whose connections a family may share.
        """
        result = dict(self.arguments)
        if result.get("distributed_lock"):
            result.setdefault("lock_timeout", DEFAULT_LOCK_TIMEOUT)
        return result

    def store(self, region: CacheRegion) -> Store:
        """The store on ``region``'s own client."""
        raise NotImplementedError

    def async_store(self, region: CacheRegion, store: Store) -> AsyncStore:
        """The store for coroutines: ``store`` itself, in a worker thread when it blocks.

        Families whose client speaks asyncio override this with a native store.
        """
        del region
        return SyncStoreAdapter(store, blocking=self.blocking)

    def tracking_pool(self, region: CacheRegion) -> Any:
        """The connection pool a near cache opens its tracking connection like."""
        raise NotImplementedError(f"{type(self).__name__} cannot have a near cache")

    async def aclose(self) -> None:
        """Close the running event loop's async connections (none unless the family has any)."""

    def forget_async(self) -> None:
        """Drop every event loop's async connections without awaiting them."""

    # -- what every family does alike -----------------------------------------------------------

    def make_region(self, model_name: str, ttl: int) -> CacheRegion:
        """A dogpile region for one model, with its ttl, on this backend.

        Raises:
            dogpile.cache.exception.PluginNotFound: no dogpile backend of this name.
            ImportError: the backend's client library is not installed.
        """
        from dogpile.cache import make_region  # noqa: PLC0415 - optional at run time

        region = make_region(
            name=f"declcache:{model_name}", serializer=_passthrough, deserializer=_passthrough
        )
        region.configure(
            self.plugin(), expiration_time=ttl, arguments=self.region_arguments(ttl, self._first)
        )
        if self._first is None:
            self._first = region
        return region


class SyncStoreAdapter:
    """An :class:`~declcache._api.AsyncStore` over a sync store.

    A blocking store runs in a worker thread, so the event loop keeps running; an in-process
    one (memory, null) is called inline, where a thread would only add a hop.
    """

    def __init__(self, store: Store, *, blocking: bool) -> None:
        self.store = store
        self._blocking = blocking

    async def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        if self._blocking:
            return await asyncio.to_thread(method, *args)
        return method(*args)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """See :meth:`Store.get_many`."""
        values: list[bytes | None] = await self._call(self.store.get_many, keys)
        return values

    async def write_many(self, entries: Sequence[Write]) -> None:
        """See :meth:`Store.write_many`."""
        await self._call(self.store.write_many, entries)

    async def add(self, key: str, value: bytes, ttl: int) -> bool:
        """See :meth:`Store.add`."""
        return bool(await self._call(self.store.add, key, value, ttl))

    async def compare_and_set(self, swaps: Sequence[Swap], ttl: int) -> list[bool]:
        """See :meth:`Store.compare_and_set`."""
        stored: list[bool] = await self._call(self.store.compare_and_set, swaps, ttl)
        return stored

    async def delete_many(self, keys: Sequence[str]) -> None:
        """See :meth:`Store.delete_many`."""
        await self._call(self.store.delete_many, keys)

    async def reset_connections(self) -> None:
        """See :meth:`Store.reset_connections`."""
        await self._call(self.store.reset_connections)
