"""Settings: declared once, given as ``CacheConfig(...)`` arguments or ``DECLCACHE_*`` variables.

:class:`CacheConfig` is the one declaration of every setting: a field's annotation holds its
type and its check (strict: ``"60"`` is not a number of seconds), the field its default. It is
a frozen pydantic dataclass rather than a ``BaseModel`` because a dataclass keeps what callers
rely on — a typed ``__init__``, ``FrozenInstanceError`` on assignment, equality that ignores
where values came from — while pydantic validates it all the same.

:data:`CacheSettings`, the pydantic-settings class that reads the environment and a ``.env``
file, is generated from those fields. It only turns each variable's text into its field's
type (a mapping is a JSON object) and leaves every check to CacheConfig, so no rule is written
twice. :meth:`CacheConfig.from_env` then validates what it found.

Where each value came from is an :class:`Origin`: a kind (default, variable, argument) and the
field it was set through. It is derived from what pydantic knows — the variables
pydantic-settings found (``model_fields_set``), the arguments given to the dataclass, and, for
:meth:`~CacheConfig.from_env` and :meth:`~CacheConfig.with_overrides`, the origins passed as
validation context — and :attr:`CacheConfig.sources` and the setting named in every
:class:`~declcache.exceptions.SettingsError` are rendered from it. Precedence, highest first:

1. explicit ``CacheConfig(...)`` / ``CacheConfig.from_env(**overrides)`` arguments,
2. ``DECLCACHE_MODELS`` per-model overrides,
3. the model's ``CacheMeta``,
4. the other ``DECLCACHE_*`` variables (and a ``.env`` file),
5. the defaults below.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from collections.abc import Callable, Mapping
from enum import IntEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, TypeVar, cast, get_origin

from pydantic import (
    AfterValidator,
    Field,
    Json,
    ModelWrapValidatorHandler,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    model_validator,
)
from pydantic.dataclasses import dataclass, is_pydantic_dataclass
from pydantic_core import ArgsKwargs
from pydantic_settings import BaseSettings, SettingsConfigDict

from declcache import backends
from declcache._meta import check_override
from declcache._secrets import masked, secrets_in
from declcache.backends._arguments import MAX_EXPIRY, MAX_WAIT
from declcache.exceptions import SettingsError
from declcache.serializers import resolve_format

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

__all__ = ["ENV_PREFIX", "CacheConfig", "CacheSettings", "Origin", "OriginKind"]

ENV_PREFIX = "DECLCACHE_"
DEFAULT_BACKEND = "dogpile.cache.memory"
DEFAULT_EXPIRATION_TIME = 3600
DEFAULT_KEY_PREFIX = "dc:"
DEFAULT_SERIALIZER = "json"
MAX_KEY_PREFIX_LENGTH = 64
#: Payloads larger than this are not cached: below Memcached's 1 MiB item size.
DEFAULT_MAX_VALUE_BYTES = 512 * 1024
#: Entries the memory backend keeps unless configured.
DEFAULT_MEMORY_MAX_ENTRIES = 10_000
#: Seconds the backend is left alone after a fault unless configured.
DEFAULT_BREAKER_INTERVAL = 1.0
#: Entries one process keeps in its near cache unless configured.
DEFAULT_NEAR_CACHE_MAX_ENTRIES = 10_000
#: What a commit does for the processes that read while it commits (docs/scale-out.md).
Consistency = Literal["default", "strict"]
DEFAULT_CONSISTENCY: Consistency = "default"
#: Seconds a strict commit's markers block fills when nothing clears them: long enough for a
#: database ``COMMIT`` that waits on a lock (SQLite's default busy timeout is 5 s) and for the
#: clock skew between hosts, short enough that a writer cut off from the cache costs little.
DEFAULT_STRICT_MARKER_TTL = 10.0
#: The most entries an in-process cache may keep: beyond, it would hold gigabytes.
MAX_ENTRIES = 100_000_000
#: The largest payload worth caching: Redis' largest string (Memcached's items are smaller).
MAX_VALUE_BYTES = 512 * 1024 * 1024
#: Fields whose value may hold a secret: an error shows them masked, or not at all.
_SECRET_FIELDS = frozenset({"arguments", "url"})

_PREFIX_PATTERN = re.compile(r"[!-~]*")  # printable ASCII, no space: valid in every backend key
_ORIGINS = "origins"  # the validation context's key: origins of values that are not arguments


def _env_name(field_name: str) -> str:
    return f"{ENV_PREFIX}{field_name.upper()}"


class OriginKind(IntEnum):
    """How a value was set, in precedence order: a larger kind beats a smaller one."""

    DEFAULT = 0
    ENVIRONMENT = 1
    ARGUMENT = 2


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a value came from: how it was set, and the field it was set through.

    The field is another one only when a URL set ``backend`` and ``arguments``.
    """

    kind: OriginKind
    field: str

    def __str__(self) -> str:
        """As :attr:`CacheConfig.sources` shows it: a variable, an argument or ``default``."""
        if self.kind is OriginKind.ENVIRONMENT:
            return _env_name(self.field)
        if self.kind is OriginKind.ARGUMENT:
            return f"CacheConfig({self.field}=...)"
        return "default"

    def setting_name(self, field_name: str) -> str:
        """The name an error gives ``field_name``: its variable, if it came from one."""
        if self.kind is OriginKind.ENVIRONMENT:
            return _env_name(self.field)
        return f"CacheConfig.{field_name}"


def _settings_error(
    error: ValidationError, origins: Mapping[str, Origin], otherwise: OriginKind
) -> SettingsError:
    """Name the setting(s) in a pydantic error, which only knows field names.

    A field missing from ``origins`` was set as ``otherwise``. A check that raised a
    :class:`SettingsError` itself already named its setting and is passed on as it is.
    """
    problems = []
    for detail in error.errors():
        cause = detail.get("ctx", {}).get("error")
        if isinstance(cause, SettingsError):
            return cause
        field_name = str(detail["loc"][0]) if detail["loc"] else "?"
        origin = origins.get(field_name, Origin(otherwise, field_name))
        shown = _shown_input(field_name, detail.get("input"))
        # our own checks raise ValueError: their text, without pydantic's "Value error, "
        message = str(cause) if isinstance(cause, ValueError) else detail["msg"]
        problems.append((origin.setting_name(field_name), f"{message} (got {shown})"))
    setting, problem = problems[0]
    for other_setting, other_problem in problems[1:]:
        problem += f"; {other_setting}: {other_problem}"
    return SettingsError(setting, problem)


def _shown_input(field_name: str, value: Any) -> str:
    """What an error quotes of an invalid value: masked, shortened; never a secret."""
    if field_name in _SECRET_FIELDS:
        if isinstance(value, str) and "://" not in value:
            return "text not shown: it may hold a secret"  # e.g. arguments' invalid JSON
        if not isinstance(value, str | Mapping):  # a list's items have no names to mask by
            return f"a {type(value).__name__}, not shown: it may hold a secret"
    shown = repr(masked(value))
    return shown if len(shown) <= 80 else shown[:77] + "..."


_Config = TypeVar("_Config")


_Result = TypeVar("_Result")
_Value = TypeVar("_Value")


def _raise_settings_error(
    call: Callable[[], _Result], origins: Mapping[str, Origin], otherwise: OriginKind
) -> _Result:
    """``call()``, its ``ValidationError`` raised as a :class:`SettingsError`.

    Raised after the ``except`` block, so the error has no ``__context__``: pydantic's error
    quotes every input, a password among them.
    """
    try:
        return call()
    except ValidationError as error:
        problem = _settings_error(error, origins, otherwise)
    raise problem


def _raising_settings_errors(cls: type[_Config]) -> type[_Config]:
    """Make ``cls(...)`` raise a :class:`SettingsError`, not pydantic's ``ValidationError``.

    pydantic generates the dataclass ``__init__``, so this wraps it: the one boundary where a
    direct construction's errors are translated (every value in it is an argument).
    """
    validate: Callable[..., None] = cls.__init__

    @functools.wraps(validate)
    def __init__(self: _Config, *args: Any, **kwargs: Any) -> None:
        _raise_settings_error(lambda: validate(self, *args, **kwargs), {}, OriginKind.ARGUMENT)

    setattr(cls, "__init__", __init__)  # noqa: B010 - mypy refuses to assign a method
    return cls


def _key_prefix(prefix: str) -> str:
    if len(prefix) > MAX_KEY_PREFIX_LENGTH or not _PREFIX_PATTERN.fullmatch(prefix):
        raise ValueError(
            f"expected at most {MAX_KEY_PREFIX_LENGTH} printable ASCII characters without spaces"
        )
    return prefix


#: Marks a field no variable can set: a function has no text form.
_ARGUMENT_ONLY = object()

_Entries = Annotated[StrictInt, Field(ge=1, le=MAX_ENTRIES)]

#: What ``scope`` holds once validated: a function of the session, or nothing.
ScopeFunction = Callable[[Any], "str | None"]


def _scope_function(value: Any) -> ScopeFunction | None:
    """A scope function, or ``"package.module:name"`` naming one (as a variable can)."""
    if value is None or callable(value):
        return cast("ScopeFunction | None", value)
    if not isinstance(value, str):
        raise ValueError(
            "expected a function of the session or 'package.module:name', "
            f"got {type(value).__name__}"
        )
    module_name, colon, attribute = value.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"expected 'package.module:name', got {value!r}")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import {value!r}: {error}") from None
    if not callable(target):
        raise ValueError(f"{value!r} is not a function of the session")
    return cast("ScopeFunction", target)


@_raising_settings_errors
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
        deserializer: the ``loads`` function paired with a ``serializer`` function; or,
            in advanced-alchemy's shape, ``deserializer(data, model_class) -> instance``
            paired with ``serializer(instance) -> bytes`` (see docs/serialization.md).
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
        scope: ``scope(session) -> str | None``, the tenant (or other context) a session
            reads and writes in, when the database cannot tell it (row-level tenancy); or
            ``"package.module:name"`` naming that function. Every key of a session's reads
            and writes is scoped by it (see docs/tenancy.md). ``None``: no such context.
        consistency: ``"default"``, or ``"strict"``: before its database commit, a session
            marks the keys it will invalidate, so that no process reads the old row from the
            cache even if this one loses the backend right after committing; a commit whose
            marks cannot be written fails before the database changes (docs/scale-out.md,
            "Strict consistency"). Every process sharing the backend should use the same.
        strict_marker_ttl: seconds a strict commit's marks keep other processes from filling
            what it changed when it cannot lift them itself (it lost the backend).

    Attributes:
        origins: where each field's value came from; not an argument, and not compared.

    Raises:
        SettingsError: a value is invalid; the message names the argument or variable.
    """

    backend: Annotated[StrictStr, Field(min_length=1)] = DEFAULT_BACKEND
    expiration_time: Annotated[StrictInt, Field(gt=0, le=MAX_EXPIRY)] = DEFAULT_EXPIRATION_TIME
    arguments: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    key_prefix: Annotated[StrictStr, AfterValidator(_key_prefix)] = DEFAULT_KEY_PREFIX
    enabled: StrictBool = True
    serializer: Any = None
    deserializer: Annotated[Callable[..., Any] | None, _ARGUMENT_ONLY] = None
    url: StrictStr | None = None
    models: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    memory_max_entries: _Entries = DEFAULT_MEMORY_MAX_ENTRIES
    max_value_bytes: Annotated[StrictInt, Field(ge=1, le=MAX_VALUE_BYTES)] = DEFAULT_MAX_VALUE_BYTES
    breaker_interval: Annotated[StrictFloat, Field(ge=0, le=MAX_WAIT, allow_inf_nan=False)] = (
        DEFAULT_BREAKER_INTERVAL
    )
    near_cache: StrictBool = False
    near_cache_max_entries: _Entries = DEFAULT_NEAR_CACHE_MAX_ENTRIES
    scope: Annotated[Any, AfterValidator(_scope_function)] = None
    consistency: Consistency = DEFAULT_CONSISTENCY
    strict_marker_ttl: Annotated[StrictFloat, Field(gt=0, le=MAX_WAIT, allow_inf_nan=False)] = (
        DEFAULT_STRICT_MARKER_TTL
    )
    origins: Mapping[str, Origin] = dataclasses.field(
        init=False, default_factory=dict, repr=False, compare=False
    )

    @model_validator(mode="wrap")
    @classmethod
    def _settle(
        cls,
        data: Any,
        handler: ModelWrapValidatorHandler[Self],
        info: ValidationInfo,
    ) -> Self:
        """Validate each field, then record origins and settle what depends on several fields.

        ``data`` holds the arguments of ``__init__`` (``ArgsKwargs``) or the mapping
        :meth:`_validated` passes. A value in it is an argument unless the validation context
        gives its origin; a value not in it is the default.
        """
        if isinstance(data, cls):  # a field of a pydantic model given a config: already valid
            return handler(data)
        names = [item.name for item in dataclasses.fields(cls) if item.init]
        if isinstance(data, ArgsKwargs):
            given = {*names[: len(data.args)], *(data.kwargs or {})}
        else:
            given = set(data)
        unknown = given.difference(names)
        if unknown:
            raise TypeError(f"CacheConfig got unknown arguments: {sorted(unknown)}")
        config = handler(data)
        known: Mapping[str, Origin] = (info.context or {}).get(_ORIGINS, {})
        config._resolve(
            {
                name: known.get(name)
                or Origin(OriginKind.ARGUMENT if name in given else OriginKind.DEFAULT, name)
                for name in names
            }
        )
        return config

    def _resolve(self, origins: dict[str, Origin]) -> None:
        """Check what spans fields, let the URL set backend and arguments, freeze the mappings."""
        object.__setattr__(self, "origins", origins)  # first: every check names settings by it
        self._check_serializer()
        self._check_models()
        backend, arguments, url_origin = self._from_url()
        if url_origin is not None:
            origins["backend"] = url_origin
            if origins["arguments"].kind is OriginKind.DEFAULT:
                origins["arguments"] = url_origin
        object.__setattr__(self, "backend", backends.canonical_name(backend))
        object.__setattr__(self, "arguments", MappingProxyType(self._checked(arguments)))
        object.__setattr__(
            self,
            "models",
            MappingProxyType({k: MappingProxyType(dict(v)) for k, v in self.models.items()}),
        )
        object.__setattr__(self, "origins", MappingProxyType(origins))
        self._check_near_cache()

    def _from_url(self) -> tuple[str, dict[str, Any], Origin | None]:
        """Backend and arguments once the URL is applied, and the URL's origin if it won.

        The more explicit of ``url`` and ``backend`` wins; set equally explicitly, they must
        agree. A URL that already set the backend (a copy by :meth:`with_overrides`) is not
        applied twice.
        """
        backend, arguments = self.backend, dict(self.arguments)
        url, backend_origin = self.origins["url"], self.origins["backend"]
        if self.url is None or backend_origin == url:
            return backend, arguments, None
        url_backend, url_arguments = self._reporting(backends.parse_url, "url", self.url)
        contradicts = backends.canonical_name(backend) != backends.canonical_name(url_backend)
        if contradicts and url.kind == backend_origin.kind:
            raise SettingsError(
                self.setting_name("backend"),
                f"{backend!r} contradicts {self.setting_name('url')}, which means "
                f"{url_backend!r}; set only one of them",
            )
        if url.kind < backend_origin.kind:
            return backend, arguments, None
        return url_backend, {**url_arguments, **arguments}, url

    def _checked(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The arguments, each name and value checked against what the backend reads."""
        return self._reporting(
            functools.partial(backends.check_arguments, self.backend), "arguments", arguments
        )

    def _reporting(self, check: Callable[[_Value], _Result], field: str, value: _Value) -> _Result:
        """``check(value)``, its ``ValueError`` raised as a SettingsError naming ``field``.

        Raised after the ``except`` block, so the error has no ``__context__`` (which could
        quote a secret the message leaves out).
        """
        try:
            return check(value)
        except ValueError as error:
            problem = SettingsError(self.setting_name(field), str(error))
        raise problem

    def __repr__(self) -> str:
        """Every field, with the URL's password and secret arguments masked."""
        shown = ", ".join(
            f"{item.name}={masked(getattr(self, item.name), item.name)!r}"
            for item in dataclasses.fields(self)
            if item.repr
        )
        return f"{type(self).__name__}({shown})"

    def _check_near_cache(self) -> None:
        """Refuse a near cache the backend cannot keep coherent, at start-up, not per read."""
        if self.near_cache and self.enabled and not backends.backend_class(self.backend).near_cache:
            raise SettingsError(
                self.setting_name("near_cache"),
                "needs a single Redis server (dogpile.cache.redis, redis:// or rediss://) "
                f"whose client tracking keeps it coherent; the backend is {self.backend!r}",
            )

    def _check_serializer(self) -> None:
        function_serializer = callable(self.serializer) and not hasattr(self.serializer, "dumps")
        if function_serializer != (self.deserializer is not None):
            raise SettingsError(
                "CacheConfig.deserializer",
                "a serializer function and a deserializer function go together: pass both "
                "(or pass a format object or name as serializer and no deserializer)",
            )
        try:
            resolve_format(self.serializer_spec)
        except ValueError as error:
            raise SettingsError(self.setting_name("serializer"), str(error)) from None

    def _check_models(self) -> None:
        for name, overrides in self.models.items():
            for attribute, value in overrides.items():
                problem = check_override(attribute, value)
                if problem is not None:
                    setting = f"{self.setting_name('models')}[{name}].{attribute}"
                    raise SettingsError(setting, problem)

    @property
    def sources(self) -> Mapping[str, str]:
        """Where each field came from, as ``declcache inspect`` shows it.

        ``"DECLCACHE_BACKEND"``, ``"CacheConfig(backend=...)"`` or ``"default"``; a backend
        and arguments a URL set show the URL's.
        """
        return MappingProxyType({name: str(origin) for name, origin in self.origins.items()})

    @property
    def secrets(self) -> frozenset[str]:
        """Every secret this config holds: its URL's password, secret-named arguments.

        What error messages, log records and command output redact.
        """
        found = secrets_in(self.arguments) | (secrets_in(self.url) if self.url else set())
        return frozenset(found)

    def setting_name(self, field_name: str) -> str:
        """The name a user set ``field_name`` by: its variable if from the environment."""
        return self.origins[field_name].setting_name(field_name)

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
            TypeError: an override names no setting.
        """
        settings = _raise_settings_error(CacheSettings, {}, OriginKind.ENVIRONMENT)
        found = settings.model_fields_set.difference(overrides)
        values = {name: getattr(settings, name) for name in found}
        origins = {name: Origin(OriginKind.ENVIRONMENT, name) for name in found}
        return cls._validated({**values, **overrides}, origins)

    def with_overrides(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied as arguments; every other value keeps its origin."""
        values = {
            item.name: getattr(self, item.name) for item in dataclasses.fields(self) if item.init
        }
        kept = {name: origin for name, origin in self.origins.items() if name not in changes}
        return self._validated({**values, **changes}, kept)

    @classmethod
    def _validated(cls, values: Mapping[str, Any], origins: Mapping[str, Origin]) -> Self:
        """Validate ``values``; ``origins`` tells where those that are not arguments came from."""
        return _raise_settings_error(
            lambda: TypeAdapter(cls).validate_python(values, context={_ORIGINS: origins}),
            origins,
            OriginKind.ARGUMENT,
        )


class _Environment(BaseSettings):
    """Where the variables are found; the fields are CacheConfig's (see :data:`CacheSettings`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        validate_default=False,  # CacheConfig's defaults, which are not text (JSON) to decode
    )


def _variable(field: FieldInfo) -> tuple[Any, Any]:
    """How pydantic-settings reads a field: its bare type from text, a mapping as JSON."""
    annotation = field.annotation
    if get_origin(annotation) is Mapping:  # decoded by pydantic, so a bad text names its variable
        annotation = cast("Any", Json)[annotation]
    return annotation, field.get_default(call_default_factory=True)


def _variables(config: type) -> dict[str, Any]:
    """Every field of ``config`` a variable can set, as pydantic-settings reads it."""
    assert is_pydantic_dataclass(config)  # for the type checker: pydantic's fields are there
    return {
        name: _variable(field)
        for name, field in config.__pydantic_fields__.items()
        if field.init is not False and _ARGUMENT_ONLY not in field.metadata
    }


CacheSettings = create_model(
    "CacheSettings",
    __base__=_Environment,
    __module__=__name__,
    __doc__="""Every ``DECLCACHE_*`` variable, read from the environment and a ``.env`` file.

    Generated from :class:`CacheConfig`'s fields: it turns each variable's text into the
    field's type and checks nothing else. Build a config through :meth:`CacheConfig.from_env`,
    which validates the values and names the variable of an invalid one.
    """,
    **_variables(CacheConfig),
)
