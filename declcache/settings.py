"""Settings: ``CacheSettings`` reads ``DECLCACHE_*`` variables, ``CacheConfig`` seeds a manager.

The environment is read in exactly one place, :class:`CacheSettings`; everything downstream
takes a :class:`CacheConfig`, a frozen dataclass validated when it is made. Precedence,
highest first:

1. explicit ``CacheConfig(...)`` / ``CacheConfig.from_env(**overrides)`` arguments,
2. ``DECLCACHE_MODELS`` per-model overrides,
3. the model's ``CacheMeta``,
4. the other ``DECLCACHE_*`` variables (and a ``.env`` file),
5. the defaults below.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Self

from pydantic import ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from declcache._breaker import DEFAULT_BREAKER_INTERVAL
from declcache._lru import DEFAULT_MEMORY_MAX_ENTRIES
from declcache._meta import check_override
from declcache._near import DEFAULT_NEAR_CACHE_MAX_ENTRIES
from declcache._urls import parse_cache_url
from declcache.exceptions import SettingsError
from declcache.serializers import resolve_format

__all__ = ["ENV_PREFIX", "CacheConfig", "CacheSettings"]

ENV_PREFIX = "DECLCACHE_"
DEFAULT_BACKEND = "dogpile.cache.memory"
DEFAULT_EXPIRATION_TIME = 3600
DEFAULT_KEY_PREFIX = "dc:"
DEFAULT_SERIALIZER = "json"
MAX_KEY_PREFIX_LENGTH = 64
#: Payloads larger than this are not cached: below Memcached's 1 MiB item size.
DEFAULT_MAX_VALUE_BYTES = 512 * 1024

#: Backend names a user may write, mapped to the dogpile backend declcache configures.
BACKEND_ALIASES: Mapping[str, str] = {
    # dogpile's own "memcached" backend needs python-memcached; pymemcache is the maintained
    # client and the one our extra installs, so both names mean the same thing here.
    "dogpile.cache.memcached": "dogpile.cache.pymemcache",
    "dogpile.cache.bmemcached": "dogpile.cache.bmemcached",
}

#: The one backend a near cache works with: Redis tracking pushes come from one server.
NEAR_CACHE_BACKEND = "dogpile.cache.redis"

_PREFIX_PATTERN = re.compile(r"[!-~]*")  # printable ASCII, no space: valid in every backend key


def _rank(source: str) -> int:
    """How explicit a source is: an argument beats a variable, which beats a default."""
    if source.startswith("CacheConfig("):
        return 2
    return 1 if source.startswith(ENV_PREFIX) else 0


def _env_name(field_name: str) -> str:
    return f"{ENV_PREFIX}{field_name.upper()}"


class CacheSettings(BaseSettings):
    """Every ``DECLCACHE_*`` variable, read from the environment and a ``.env`` file.

    Build it through :meth:`CacheConfig.from_env`, which turns a validation failure into a
    :class:`~declcache.exceptions.SettingsError` naming the variable.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    enabled: bool = True
    backend: str = DEFAULT_BACKEND
    url: str | None = None
    arguments: Annotated[dict[str, Any], NoDecode] = {}
    expiration_time: int = DEFAULT_EXPIRATION_TIME
    key_prefix: str = DEFAULT_KEY_PREFIX
    serializer: str = DEFAULT_SERIALIZER
    models: Annotated[dict[str, dict[str, Any]], NoDecode] = {}
    memory_max_entries: int = DEFAULT_MEMORY_MAX_ENTRIES
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    breaker_interval: float = DEFAULT_BREAKER_INTERVAL
    near_cache: bool = False
    near_cache_max_entries: int = DEFAULT_NEAR_CACHE_MAX_ENTRIES

    @field_validator("arguments", "models", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        """Decode JSON here, so a bad value is reported with its variable's name."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"invalid JSON: {error}") from None
        return value

    @field_validator("expiration_time")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be a positive number of seconds")
        return value

    @field_validator("memory_max_entries", "max_value_bytes", "near_cache_max_entries")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("breaker_interval")
    @classmethod
    def _not_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError("must be 0 (no circuit breaker) or a positive number of seconds")
        return value


def _validation_error(error: ValidationError) -> SettingsError:
    """Name the variable(s) in a pydantic error, which only knows field names."""
    problems = []
    for detail in error.errors():
        location = detail["loc"][0] if detail["loc"] else "?"
        shown = repr(detail.get("input"))
        if len(shown) > 80:
            shown = shown[:77] + "..."
        problems.append((_env_name(str(location)), f"{detail['msg']} (got {shown})"))
    setting, problem = problems[0]
    for other_setting, other_problem in problems[1:]:
        problem += f"; {other_setting}: {other_problem}"
    return SettingsError(setting, problem)


@dataclass(frozen=True)
class CacheConfig:
    """How a :class:`~declcache.CacheManager` caches: backend, ttl, prefix, format.

    Args:
        backend: dogpile backend name, e.g. ``"dogpile.cache.redis"``.
        expiration_time: default ttl in seconds for models whose CacheMeta sets none.
        arguments: backend arguments (``host``, ``port``, ``db``, ``distributed_lock``, ``url``…).
        key_prefix: prefix of every key; separates applications sharing one server.
        enabled: master switch; ``False`` makes the manager always miss.
        serializer: the default format: ``"json"``, ``"msgpack"``, ``"package.module:name"``,
            a format object with ``dumps``/``loads``, or a ``dumps`` function used together
            with ``deserializer``.
        deserializer: the ``loads`` function paired with a ``serializer`` function.
        url: a cache URL (``redis://host:6379/0``…) that sets ``backend`` and ``arguments``;
            explicit ``arguments`` are merged over the ones the URL gives.
        models: per-model overrides keyed by class or table name,
            e.g. ``{"users": {"ttl": 60}}``; they beat the model's CacheMeta.
        memory_max_entries: entries the memory backend keeps (least recently used dropped);
            only when declcache makes the dict, not for an explicit ``cache_dict`` argument.
        max_value_bytes: a payload larger than this is not cached (counted as ``oversized``).
        breaker_interval: seconds the backend is left alone after a fault before one call
            tries it again; ``0`` turns the circuit breaker off.
        near_cache: keep Redis values in this process too, coherent through Redis client
            tracking (single-node ``dogpile.cache.redis`` only; see docs/near-cache.md).
        near_cache_max_entries: entries the near cache keeps (least recently used dropped).
        sources: where each field came from (``"DECLCACHE_BACKEND"``, ``"argument"``,
            ``"default"``, ``"CacheConfig(ttl=...)"``); shown by ``declcache inspect``.

    Raises:
        SettingsError: a value is invalid; the message names the argument or variable.
    """

    backend: str = DEFAULT_BACKEND
    expiration_time: int = DEFAULT_EXPIRATION_TIME
    arguments: Mapping[str, Any] = field(default_factory=dict)
    key_prefix: str = DEFAULT_KEY_PREFIX
    enabled: bool = True
    serializer: Any = None
    deserializer: Callable[[bytes], Any] | None = None
    url: str | None = None
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    memory_max_entries: int = DEFAULT_MEMORY_MAX_ENTRIES
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    breaker_interval: float = DEFAULT_BREAKER_INTERVAL
    near_cache: bool = False
    near_cache_max_entries: int = DEFAULT_NEAR_CACHE_MAX_ENTRIES
    sources: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    _FIELDS_FROM_ENV: ClassVar[tuple[str, ...]] = (
        "backend",
        "expiration_time",
        "arguments",
        "key_prefix",
        "enabled",
        "serializer",
        "url",
        "models",
        "memory_max_entries",
        "max_value_bytes",
        "breaker_interval",
        "near_cache",
        "near_cache_max_entries",
    )

    def __post_init__(self) -> None:
        sources = {
            item.name: self.sources.get(item.name) or self._default_source(item)
            for item in dataclasses.fields(self)
            if item.name != "sources"
        }
        object.__setattr__(self, "sources", sources)
        self._check_expiration_time()
        self._check_limits()
        self._check_key_prefix()
        self._check_serializer_pair()
        self._check_models()
        self._check_serializer()
        backend, arguments = self.backend, dict(self.arguments)
        if self.url is not None and sources["backend"] != sources["url"]:
            try:
                url_backend, url_arguments = parse_cache_url(self.url)
            except ValueError as error:
                raise SettingsError(self.setting_name("url"), str(error)) from None
            url_rank, backend_rank = _rank(sources["url"]), _rank(sources["backend"])
            contradicts = self._alias(self.backend) != self._alias(url_backend)
            if contradicts and url_rank == backend_rank:
                raise SettingsError(
                    self.setting_name("backend"),
                    f"{self.backend!r} contradicts {self.setting_name('url')}, which means "
                    f"{url_backend!r}; set only one of them",
                )
            if url_rank >= backend_rank:  # the more explicit of the two wins
                backend, arguments = url_backend, {**url_arguments, **arguments}
                sources["backend"] = sources["url"]
                if sources["arguments"] == "default":
                    sources["arguments"] = sources["url"]
        if not isinstance(backend, str) or not backend:
            raise SettingsError(self.setting_name("backend"), "expected a dogpile backend name")
        object.__setattr__(self, "backend", self._alias(backend))
        self._check_near_cache()
        object.__setattr__(self, "arguments", MappingProxyType(arguments))
        object.__setattr__(
            self,
            "models",
            MappingProxyType({k: MappingProxyType(dict(v)) for k, v in self.models.items()}),
        )

    @staticmethod
    def _alias(backend: str) -> str:
        return BACKEND_ALIASES.get(backend, backend)

    def _default_source(self, item: dataclasses.Field[Any]) -> str:
        value = getattr(self, item.name)
        if item.default is not dataclasses.MISSING:
            default = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:  # pragma: no cover - every field has a default
            default = dataclasses.MISSING
        return "default" if value == default else f"CacheConfig({item.name}=...)"

    def setting_name(self, field_name: str) -> str:
        """The name a user set ``field_name`` by: its variable if from the environment."""
        source = self.sources.get(field_name, "")
        if source.startswith(ENV_PREFIX):
            return source
        return f"CacheConfig.{field_name}"

    def _check_expiration_time(self) -> None:
        value = self.expiration_time
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SettingsError(
                self.setting_name("expiration_time"),
                f"expected a positive whole number of seconds, got {value!r}",
            )

    def _check_limits(self) -> None:
        for name in ("memory_max_entries", "max_value_bytes", "near_cache_max_entries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(
                    self.setting_name(name), f"expected a whole number of at least 1, got {value!r}"
                )
        interval = self.breaker_interval
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval < 0:
            raise SettingsError(
                self.setting_name("breaker_interval"),
                f"expected 0 (off) or a positive number of seconds, got {interval!r}",
            )

    def _check_near_cache(self) -> None:
        """Refuse a near cache the backend cannot keep coherent, at start-up, not per read."""
        if not isinstance(self.near_cache, bool):
            raise SettingsError(
                self.setting_name("near_cache"), f"expected true or false, got {self.near_cache!r}"
            )
        if self.near_cache and self.enabled and self.backend != NEAR_CACHE_BACKEND:
            raise SettingsError(
                self.setting_name("near_cache"),
                f"needs a single Redis server ({NEAR_CACHE_BACKEND}, redis:// or rediss://) "
                f"whose client tracking keeps it coherent; the backend is {self.backend!r}",
            )

    def _check_key_prefix(self) -> None:
        prefix = self.key_prefix
        if (
            not isinstance(prefix, str)
            or len(prefix) > MAX_KEY_PREFIX_LENGTH
            or not _PREFIX_PATTERN.fullmatch(prefix)
        ):
            raise SettingsError(
                self.setting_name("key_prefix"),
                f"expected at most {MAX_KEY_PREFIX_LENGTH} printable ASCII characters without "
                f"spaces, got {prefix!r}",
            )

    def _check_serializer_pair(self) -> None:
        function_serializer = callable(self.serializer) and not hasattr(self.serializer, "dumps")
        if function_serializer != (self.deserializer is not None):
            raise SettingsError(
                "CacheConfig.deserializer",
                "a serializer function and a deserializer function go together: pass both "
                "(or pass a format object or name as serializer and no deserializer)",
            )

    def _check_models(self) -> None:
        if not isinstance(self.models, Mapping) or not all(
            isinstance(name, str) and isinstance(value, Mapping)
            for name, value in self.models.items()
        ):
            raise SettingsError(
                self.setting_name("models"),
                'expected an object of objects keyed by model, e.g. {"users": {"ttl": 60}}',
            )
        for name, overrides in self.models.items():
            for attribute, value in overrides.items():
                problem = check_override(attribute, value)
                if problem is not None:
                    setting = f"{self.setting_name('models')}[{name}].{attribute}"
                    raise SettingsError(setting, problem)

    def _check_serializer(self) -> None:
        try:
            resolve_format(self.serializer_spec)
        except ValueError as error:
            raise SettingsError(self.setting_name("serializer"), str(error)) from None

    @property
    def serializer_spec(self) -> Any:
        """The default format as CacheMeta would write it: a name, an object or a pair."""
        if self.deserializer is not None:
            return (self.serializer, self.deserializer)
        return self.serializer if self.serializer is not None else DEFAULT_SERIALIZER

    def model_overrides(self, *names: str) -> tuple[str, Mapping[str, Any]] | None:
        """Return ``(matched_name, overrides)`` for the first of ``names`` in :attr:`models`."""
        for name in names:
            if name in self.models:
                return name, self.models[name]
        return None

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """Build a config from ``DECLCACHE_*`` variables and ``.env``; ``overrides`` win.

        Raises:
            SettingsError: a variable is invalid; the message names it.
        """
        unknown = set(overrides) - {item.name for item in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"CacheConfig.from_env() got unknown arguments: {sorted(unknown)}")
        try:
            settings = CacheSettings()
        except ValidationError as error:
            raise _validation_error(error) from None
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name in cls._FIELDS_FROM_ENV:
            values[name] = getattr(settings, name)
            sources[name] = _env_name(name) if name in settings.model_fields_set else "default"
        for name, value in overrides.items():
            values[name] = value
            sources[name] = f"CacheConfig({name}=...)"
        return cls(**values, sources=sources)

    def with_overrides(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied; their source is recorded as ``"argument"``."""
        sources = {**self.sources, **{name: f"CacheConfig({name}=...)" for name in changes}}
        return dataclasses.replace(self, **changes, sources=sources)
