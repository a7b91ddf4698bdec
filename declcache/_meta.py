"""What a ``CacheMeta`` may say, declared once in :data:`OPTIONS`, and how it is resolved.

Each :class:`Option` names a CacheMeta attribute, the check that validates and normalises its
value, its default and what it means. That one table drives everything that knows the
options: reading a CacheMeta, the ``DECLCACHE_MODELS`` per-model overrides, the resolved
:class:`ModelSpec` (one attribute per option, same name) and the columns of ``declcache
inspect``. A new option is one entry plus the code that uses it.

Two steps, at two times:

* :func:`read_cache_meta` runs when SQLAlchemy configures the model's mapper. It walks the
  CacheMeta class and its bases (so mixins, abstract bases and ``class CacheMeta(Parent.
  CacheMeta)`` all work field by field), rejects what cannot work with a
  :class:`~declcache.exceptions.CacheMetaError`, and records which class set each value.
* :func:`resolve_spec` runs once per manager and model. It applies the precedence of the
  settings and freezes the result into a :class:`ModelSpec`, which also says where every
  value came from — ``declcache inspect`` prints exactly that.

The settings import this module to check overrides at start-up, so it reads the settings only
through the :class:`SpecSettings` protocol and never imports them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Column, PrimaryKeyConstraint, UniqueConstraint

from declcache._codec import fingerprint, pickled_columns
from declcache._keys import collation_problem, primary_key_names
from declcache.backends._arguments import MAX_EXPIRY
from declcache.exceptions import CacheMetaError, SettingsError
from declcache.serializers import SerializationFormat, resolve_format

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper

__all__ = [
    "OPTIONS",
    "DeclaredMeta",
    "FromSetting",
    "ModelSpec",
    "Option",
    "SpecSettings",
    "check_override",
    "read_cache_meta",
    "resolve_spec",
]

KeySets = tuple[tuple[str, ...], ...]


class _InvalidError(ValueError):
    """One attribute's problem, before we know whether to blame CacheMeta or the settings."""


def _positive_seconds(value: Any, _mapper: Mapper[Any] | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _InvalidError(
            f"expected a positive whole number of seconds, got {value!r} "
            "(to turn caching off for this model write enabled = False)"
        )
    if value > MAX_EXPIRY:  # the bound of DECLCACHE_EXPIRATION_TIME: a unit mistake
        raise _InvalidError(f"expected at most {MAX_EXPIRY} seconds (ten years), got {value!r}")
    return value


def _boolean(value: Any, _mapper: Mapper[Any] | None) -> bool:
    if not isinstance(value, bool):
        raise _InvalidError(f"expected True or False, got {value!r}")
    return value


def _serializer(value: Any, mapper: Mapper[Any] | None) -> tuple[str, SerializationFormat]:
    try:
        return resolve_format(value, mapper)
    except ValueError as error:
        raise _InvalidError(str(error)) from None


def _column_of(mapper: Mapper[Any], field: str) -> Column[Any]:
    prop = mapper.column_attrs.get(field)
    if prop is None or not isinstance(prop.columns[0], Column):
        names = [p.key for p in mapper.column_attrs]
        hint = difflib.get_close_matches(field, names, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; columns are {names}"
        raise _InvalidError(f"{field!r} is not a column of {mapper.class_.__name__}{suggestion}")
    return prop.columns[0]


def _is_unique(mapper: Mapper[Any], columns: list[Column[Any]]) -> bool:
    wanted = set(columns)
    if wanted == set(mapper.primary_key):
        return True
    if len(columns) == 1 and columns[0].unique:
        return True
    table = columns[0].table
    if any(column.table is not table for column in columns):
        return False
    constraints = [
        set(constraint.columns)
        for constraint in table.constraints
        if isinstance(constraint, (UniqueConstraint, PrimaryKeyConstraint))
    ]
    constraints += [set(index.columns) for index in table.indexes if index.unique]
    return wanted in constraints


def _check_collations(mapper: Mapper[Any], fields: Sequence[str]) -> None:
    """Refuse a key column whose collation finds equal what its key texts tell apart.

    A read under ``"Ada@X.org"`` and an invalidation under ``"ada@x.org"`` must reach one
    key; :func:`declcache._keys.collation_problem` says when that cannot be promised.
    """
    for field in fields:
        problem = collation_problem(_column_of(mapper, field).type)
        if problem is not None:
            raise _InvalidError(f"{field!r} cannot be a cache key: {problem}")


def _pickle_risk(mapper: Mapper[Any]) -> str | None:
    """What caching ``mapper``'s model risks without ``allow_pickle``; ``None`` if nothing.

    A hit unpickles a ``PickleType`` value from what the cache holds: ``pickle.loads`` runs
    whatever code the bytes name. Only the model's own code may accept that.
    """
    pickled = pickled_columns(mapper)
    if not pickled:
        return None
    return (
        f"{', '.join(pickled)}: a PickleType value is unpickled from the cache on a hit, "
        "so a process that can write the cache could run code in yours"
    )


def _relationship_names(value: Any, mapper: Mapper[Any] | None) -> tuple[str, ...]:
    """Normalise ``"posts"`` or ``("posts", "author")``: relationships cached as member ids.

    With a model, each name must be a relationship it can serve from the cache: a
    collection (one-to-many, many-to-many over a plain association table) or a many-to-one
    that references its target's primary key.
    """
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(name, str) for name in value):
        raise _InvalidError(f"expected a tuple of relationship names, got {value!r}")
    if mapper is not None:
        from declcache._associations import relationship_problem  # noqa: PLC0415 - cycle

        for name in value:
            problem = relationship_problem(mapper, name)
            if problem is not None:
                raise _InvalidError(problem)
    return tuple(dict.fromkeys(value))


def _key_fields(value: Any, mapper: Mapper[Any] | None) -> KeySets:
    """Normalise ``"email"``, ``("email",)`` or ``(("email",), ("org", "slug"))``.

    The shape is checked at once; the columns only once there is a model (``mapper``).
    """
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not value:
        raise _InvalidError(f"expected a tuple of column names, got {value!r}")
    sets = value if all(isinstance(item, (tuple, list)) for item in value) else (value,)
    normalised: list[tuple[str, ...]] = []
    for fields in sets:
        if not fields:
            raise _InvalidError("an empty key")
        for field in fields:
            if not isinstance(field, str):
                raise _InvalidError(f"expected column attribute names, got {field!r}")
        if mapper is not None and not _is_unique(
            mapper, [_column_of(mapper, field) for field in fields]
        ):
            raise _InvalidError(
                f"{tuple(fields)!r} is not unique: a key must be the primary key, a column "
                "with unique=True, or the columns of a UniqueConstraint or unique Index"
            )
        if mapper is not None:
            _check_collations(mapper, fields)
        normalised.append(tuple(fields))
    return tuple(normalised)


#: Checks one value and returns it normalised; gets the model's mapper, or ``None`` for a
#: per-model override checked at start-up, before any model is mapped.
Validator = Callable[[Any, "Mapper[Any] | None"], Any]


@dataclass(frozen=True)
class FromSetting:
    """A default the settings give, not a constant: ``ttl`` defaults to ``expiration_time``.

    Attributes:
        field: the setting a user writes; it names the source and the errors.
        attribute: the CacheConfig attribute holding the value, when it is not ``field``.
    """

    field: str
    attribute: str | None = None


@dataclass(frozen=True)
class Option:
    """One attribute a CacheMeta may set.

    Attributes:
        name: the attribute in CacheMeta, in ``DECLCACHE_MODELS`` and on :class:`ModelSpec`.
        validate: checks a value and returns it normalised (see :data:`Validator`).
        default: the value when nothing sets it, or the setting that gives it.
        description: what it means, as ``declcache inspect`` explains it.
    """

    name: str
    validate: Validator
    default: Any
    description: str


#: Every attribute a CacheMeta may set, in the order they are listed to users.
OPTIONS: tuple[Option, ...] = (
    Option("ttl", _positive_seconds, FromSetting("expiration_time"), "seconds an entry lives"),
    Option("enabled", _boolean, True, "whether the model is cached at all"),
    Option(
        "serializer",
        _serializer,
        FromSetting("serializer", "serializer_spec"),
        "the format of the cached payload",
    ),
    Option("key_fields", _key_fields, (), "the unique keys an entity is cached under"),
    Option("cache_not_found", _boolean, False, "whether a lookup that finds no row is cached"),
    Option(
        "cached_relationships",
        _relationship_names,
        (),
        "relationships served from the cache, collections as their members' ids",
    ),
    Option(
        "allow_pickle",
        _boolean,
        False,
        "whether PickleType columns may be cached (a cache writer could run code)",
    ),
)
_OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


def _validated(name: str, value: Any, mapper: Mapper[Any] | None) -> Any:
    """``value`` of option ``name``, validated and normalised.

    Raises:
        _InvalidError: no option has that name, or the value is invalid.
    """
    option = _OPTIONS_BY_NAME.get(name)
    if option is None:
        hint = difflib.get_close_matches(name, list(_OPTIONS_BY_NAME), n=1)
        known = ", ".join(_OPTIONS_BY_NAME)
        raise _InvalidError(
            f"unknown attribute{f'; did you mean {hint[0]!r}?' if hint else ''} (known: {known})"
        )
    return option.validate(value, mapper)


def check_override(attribute: str, value: Any) -> str | None:
    """The problem with one per-model override, checked before any model is mapped.

    What depends on the model (whether ``key_fields`` name unique columns) is checked when
    the mappers are configured: :func:`declcache._registry.watch` resolves every model.
    """
    try:
        _validated(attribute, value, None)
    except _InvalidError as error:
        return str(error)
    return None


@dataclass(frozen=True)
class DeclaredMeta:
    """A model's CacheMeta, validated: the values it sets and the class that set each one."""

    values: Mapping[str, Any]
    origins: Mapping[str, str]


def read_cache_meta(mapper: Mapper[Any]) -> DeclaredMeta | None:
    """Read and validate the CacheMeta of ``mapper``'s class; ``None`` when it has none.

    Raises:
        CacheMetaError: an unknown attribute or an invalid value, naming model and attribute.
    """
    model = mapper.class_.__name__
    meta = getattr(mapper.class_, "CacheMeta", None)
    if meta is None:
        return None
    if not isinstance(meta, type):
        raise CacheMetaError(model, "CacheMeta", f"expected a nested class, got {meta!r}")
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for klass in meta.__mro__[:-1]:  # most derived first; object has nothing to say
        for name, value in vars(klass).items():
            if name.startswith("_") or name in values:
                continue
            try:
                values[name] = _validated(name, value, mapper)
            except _InvalidError as error:
                raise CacheMetaError(model, name, str(error)) from None
            origins[name] = klass.__qualname__
    risk = None if values.get("allow_pickle") else _pickle_risk(mapper)
    if risk is not None:
        raise CacheMetaError(
            model,
            "allow_pickle",
            f"{risk}. Set allow_pickle = True if only trusted processes can write the cache, "
            "or defer the column (deferred columns are not cached)",
        )
    try:  # the primary key is always a key, declared or not
        _check_collations(mapper, primary_key_names(mapper))
    except _InvalidError as error:
        raise CacheMetaError(model, "key_fields", f"the primary key: {error}") from None
    return DeclaredMeta(values, origins)


@dataclass(frozen=True)
class ModelSpec:
    """The settings one manager applies to one model, frozen, with their origins.

    Every option of :data:`OPTIONS` is an attribute of the same name.

    Attributes:
        model: the mapped class.
        enabled: whether this model is cached at all.
        ttl: seconds an entry lives.
        serializer: name of the payload format.
        format: the format object.
        key_fields: every key naming one entity; the primary key comes first.
        cache_not_found: whether a missing key is cached too.
        cached_relationships: relationships read through the cache (member ids).
        allow_pickle: whether PickleType columns are cached (unpickled on a hit).
        fingerprint: hash of the model's schema and format, part of every key.
        sources: for each option, where its value came from.
    """

    model: type
    enabled: bool
    ttl: int
    serializer: str
    format: SerializationFormat
    key_fields: KeySets
    cache_not_found: bool
    cached_relationships: tuple[str, ...]
    allow_pickle: bool
    fingerprint: str
    sources: Mapping[str, str]

    @property
    def primary_key(self) -> tuple[str, ...]:
        """Attribute names of the primary key."""
        return self.key_fields[0]


class SpecSettings(Protocol):
    """What resolving a spec reads from a :class:`~declcache.CacheConfig`."""

    @property
    def sources(self) -> Mapping[str, str]:
        """Where each setting came from."""

    @property
    def models(self) -> Mapping[str, Mapping[str, Any]]:
        """The per-model overrides, keyed by class or table name."""

    def setting_name(self, field_name: str) -> str:
        """The name a user set ``field_name`` by."""

    def model_overrides(self, *names: str) -> tuple[str, Mapping[str, Any]] | None:
        """``(matched_name, overrides)`` for the first of ``names`` that has overrides."""


def _override_values(mapper: Mapper[Any], config: SpecSettings) -> dict[str, tuple[Any, str]]:
    """The per-model overrides of ``mapper``'s model, validated, each with its source."""
    table = getattr(mapper.local_table, "name", None)
    names = [mapper.class_.__name__] + ([table] if table else [])
    matched = config.model_overrides(*names)
    if matched is None:
        return {}
    name, overrides = matched
    source = f"{config.setting_name('models')}[{name}]"
    values: dict[str, tuple[Any, str]] = {}
    for attribute, value in overrides.items():
        try:
            values[attribute] = _validated(attribute, value, mapper), source
        except _InvalidError as error:
            problem = f"{error} (model {mapper.class_.__name__})"
            raise SettingsError(f"{source}.{attribute}", problem) from None
    return values


def _default(option: Option, mapper: Mapper[Any], config: SpecSettings) -> tuple[Any, str]:
    """The value ``option`` takes when nothing sets it for the model, and its source."""
    if not isinstance(option.default, FromSetting):
        return option.default, "default"
    setting = option.default
    try:
        value = option.validate(getattr(config, setting.attribute or setting.field), mapper)
    except _InvalidError as error:
        raise SettingsError(config.setting_name(setting.field), str(error)) from None
    return value, config.sources[setting.field]


def resolve_spec(mapper: Mapper[Any], declared: DeclaredMeta, config: SpecSettings) -> ModelSpec:
    """Apply the precedence (overrides, CacheMeta, settings, defaults) for one model.

    A model :func:`read_cache_meta` accepted opted in to pickling in its CacheMeta; an override
    can only opt out again, and then the model must not be cached at all.

    Raises:
        SettingsError: a per-model override is invalid, or the default serializer is, or an
            override turns ``allow_pickle`` off for a cached model that needs it.
    """
    overrides = _override_values(mapper, config)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        if option.name in overrides:
            values[option.name], sources[option.name] = overrides[option.name]
        elif option.name in declared.values:
            values[option.name] = declared.values[option.name]
            sources[option.name] = declared.origins[option.name]
        else:
            values[option.name], sources[option.name] = _default(option, mapper, config)
    risk = None if values["allow_pickle"] or not values["enabled"] else _pickle_risk(mapper)
    if risk is not None:
        raise SettingsError(
            f"{sources['allow_pickle']}.allow_pickle",
            f"{risk}; the model cannot be cached without it: set enabled to false as well",
        )
    format_name, format_ = values.pop("serializer")
    primary_key = primary_key_names(mapper)
    other_keys = [keys for keys in values.pop("key_fields") if keys != primary_key]
    return ModelSpec(
        model=mapper.class_,
        serializer=format_name,
        format=format_,
        key_fields=(primary_key, *other_keys),
        fingerprint=fingerprint(mapper, format_name),
        sources=sources,
        **values,
    )
