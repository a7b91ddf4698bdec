"""Read a model's ``CacheMeta``, validate it, and resolve it against the settings.

Two steps, at two times:

* :func:`read_cache_meta` runs when SQLAlchemy configures the model's mapper. It walks the
  CacheMeta class and its bases (so mixins, abstract bases and ``class CacheMeta(Parent.
  CacheMeta)`` all work field by field), rejects what cannot work with a
  :class:`~declcache.exceptions.CacheMetaError`, and records which class set each value.
* :func:`resolve_spec` runs once per manager and model. It applies the precedence of the
  settings and freezes the result into a :class:`ModelSpec`, which also says where every
  value came from — ``declcache inspect`` prints exactly that.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, PrimaryKeyConstraint, UniqueConstraint

from declcache._keys import fingerprint
from declcache.exceptions import CacheMetaError, SettingsError
from declcache.serializers import SerializationFormat, resolve_format

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper

    from declcache.settings import CacheConfig

__all__ = [
    "META_ATTRIBUTES",
    "DeclaredMeta",
    "ModelSpec",
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
    return value


def _boolean(value: Any, _mapper: Mapper[Any] | None) -> bool:
    if not isinstance(value, bool):
        raise _InvalidError(f"expected True or False, got {value!r}")
    return value


def _serializer(value: Any, _mapper: Mapper[Any] | None) -> tuple[str, SerializationFormat]:
    try:
        return resolve_format(value)
    except ValueError as error:
        raise _InvalidError(str(error)) from None


def _column_of(mapper: Mapper[Any], field: Any) -> Column[Any]:
    if not isinstance(field, str):
        raise _InvalidError(f"expected column attribute names, got {field!r}")
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


def _key_fields(value: Any, mapper: Mapper[Any] | None) -> KeySets:
    """Normalise ``"email"``, ``("email",)`` or ``(("email",), ("org", "slug"))``."""
    assert mapper is not None, "key_fields is only checked against a mapped class"
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not value:
        raise _InvalidError(f"expected a tuple of column names, got {value!r}")
    sets = value if all(isinstance(item, (tuple, list)) for item in value) else (value,)
    normalised: list[tuple[str, ...]] = []
    for fields in sets:
        if not fields:
            raise _InvalidError("an empty key")
        columns = [_column_of(mapper, field) for field in fields]
        if not _is_unique(mapper, columns):
            raise _InvalidError(
                f"{tuple(fields)!r} is not unique: a key must be the primary key, a column "
                "with unique=True, or the columns of a UniqueConstraint or unique Index"
            )
        normalised.append(tuple(fields))
    return tuple(normalised)


Validator = Callable[[Any, "Mapper[Any] | None"], Any]

#: What a CacheMeta may say, and how each value is checked and normalised.
META_ATTRIBUTES: Mapping[str, Validator] = {
    "ttl": _positive_seconds,
    "enabled": _boolean,
    "serializer": _serializer,
    "key_fields": _key_fields,
    "cache_not_found": _boolean,
}


def _unknown_attribute(name: str) -> str:
    hint = difflib.get_close_matches(name, list(META_ATTRIBUTES), n=1)
    known = ", ".join(META_ATTRIBUTES)
    return f"unknown attribute{f'; did you mean {hint[0]!r}?' if hint else ''} (known: {known})"


def check_override(attribute: str, value: Any) -> str | None:
    """The problem with one per-model override, checked before any model is mapped.

    ``key_fields`` needs the model's columns and is checked when the model is resolved.
    """
    validator = META_ATTRIBUTES.get(attribute)
    if validator is None:
        return _unknown_attribute(attribute)
    if attribute == "key_fields":
        return None
    try:
        validator(value, None)
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
            validator = META_ATTRIBUTES.get(name)
            if validator is None:
                raise CacheMetaError(model, name, _unknown_attribute(name))
            try:
                values[name] = validator(value, mapper)
            except _InvalidError as error:
                raise CacheMetaError(model, name, str(error)) from None
            origins[name] = klass.__qualname__
    return DeclaredMeta(values, origins)


@dataclass(frozen=True)
class ModelSpec:
    """The settings one manager applies to one model, frozen, with their origins.

    Attributes:
        model: the mapped class.
        enabled: whether this model is cached at all.
        ttl: seconds an entry lives.
        serializer: name of the payload format.
        format: the format object.
        key_fields: every key naming one entity; the primary key comes first.
        cache_not_found: whether a missing key is cached too.
        fingerprint: hash of the model's schema and format, part of every key.
        sources: for each attribute, where its value came from.
    """

    model: type
    enabled: bool
    ttl: int
    serializer: str
    format: SerializationFormat
    key_fields: KeySets
    cache_not_found: bool
    fingerprint: str
    sources: Mapping[str, str]

    @property
    def primary_key(self) -> tuple[str, ...]:
        """Attribute names of the primary key."""
        return self.key_fields[0]


def _override_values(
    mapper: Mapper[Any], config: CacheConfig
) -> tuple[dict[str, Any], dict[str, str]]:
    table = getattr(mapper.local_table, "name", None)
    names = [mapper.class_.__name__] + ([table] if table else [])
    matched = config.model_overrides(*names)
    if matched is None:
        return {}, {}
    name, overrides = matched
    source = f"{config.setting_name('models')}[{name}]"
    values: dict[str, Any] = {}
    for attribute, value in overrides.items():
        validator = META_ATTRIBUTES.get(attribute)
        if validator is None:
            raise SettingsError(f"{source}.{attribute}", _unknown_attribute(attribute))
        try:
            values[attribute] = validator(value, mapper)
        except _InvalidError as error:
            raise SettingsError(f"{source}.{attribute}", str(error)) from None
    return values, dict.fromkeys(values, source)


def resolve_spec(mapper: Mapper[Any], declared: DeclaredMeta, config: CacheConfig) -> ModelSpec:
    """Apply the precedence (overrides, CacheMeta, settings, defaults) for one model.

    Raises:
        SettingsError: a per-model override is invalid, or the default serializer is.
    """
    values, sources = _override_values(mapper, config)
    for name, value in declared.values.items():
        if name not in values:
            values[name] = value
            sources[name] = declared.origins[name]
    if "ttl" not in values:
        values["ttl"] = config.expiration_time
        sources["ttl"] = config.sources["expiration_time"]
    if "serializer" not in values:
        try:
            values["serializer"] = resolve_format(config.serializer_spec)
        except ValueError as error:
            raise SettingsError(config.setting_name("serializer"), str(error)) from None
        sources["serializer"] = config.sources["serializer"]
    defaults = {"enabled": True, "cache_not_found": False, "key_fields": ()}
    for name, value in defaults.items():
        if name not in values:
            values[name] = value
            sources[name] = "default"
    primary_key = tuple(mapper.get_property_by_column(column).key for column in mapper.primary_key)
    key_fields = (primary_key, *(keys for keys in values["key_fields"] if keys != primary_key))
    format_name, format_ = values["serializer"]
    return ModelSpec(
        model=mapper.class_,
        enabled=values["enabled"],
        ttl=values["ttl"],
        serializer=format_name,
        format=format_,
        key_fields=key_fields,
        cache_not_found=values["cache_not_found"],
        fingerprint=fingerprint(mapper, format_name),
        sources=sources,
    )
