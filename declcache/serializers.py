"""Byte formats for cached payloads: JSON (the default), msgpack, or your own pair.

A format only turns plain data (``None``, ``bool``, ``int``, ``float``, ``str``, lists and
dicts of them) into bytes and back. Giving every column value its exact Python type back
(``Decimal``, aware ``datetime``, ``UUID``, enums …) is the job of the per-model codec, which
runs before the format, so any format that round-trips JSON-like data is exact.

A pair of *model* functions, as advanced-alchemy takes them (``serializer(instance) -> bytes``,
``deserializer(data, model_class) -> instance``), is recognised by its deserializer taking two
positional arguments, and adapted by :class:`ModelFunctionFormat`, so users migrating keep
their functions. What such a deserializer returns is checked like any other cached value.

No format here uses pickle: a cache shared between processes must never be a way to run code.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import inspect
import json
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sqlalchemy.orm.attributes import instance_state

from declcache._codec import ModelCodec, UnencodableValueError
from declcache._keys import normalized, primary_key_names

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.orm import Mapper

__all__ = [
    "BUILTIN_FORMATS",
    "FunctionFormat",
    "JsonFormat",
    "ModelFunctionFormat",
    "MsgpackFormat",
    "SerializationFormat",
    "resolve_format",
]


@runtime_checkable
class SerializationFormat(Protocol):
    """Anything with ``dumps(data) -> bytes | str`` and ``loads(bytes) -> data``.

    The ``json`` module itself, ``orjson`` and ``msgpack``-like objects all qualify.
    """

    def dumps(self, obj: Any, /) -> bytes | str:
        """Encode plain data."""

    def loads(self, data: bytes, /) -> Any:
        """Decode what :meth:`dumps` produced; raise on anything else."""


class JsonFormat:
    """Compact UTF-8 JSON: readable in ``redis-cli`` and safe to share between languages."""

    name = "json"

    def dumps(self, obj: Any, /) -> bytes:
        """Encode plain data as compact UTF-8 JSON."""
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()

    def loads(self, data: bytes, /) -> Any:
        """Decode UTF-8 JSON."""
        return json.loads(data)


class MsgpackFormat:
    """msgpack: smaller and faster than JSON; needs the ``msgpack`` extra."""

    name = "msgpack"

    def __init__(self) -> None:
        import msgpack  # noqa: PLC0415 - optional dependency, imported only when chosen

        self._packb = msgpack.packb
        self._unpackb = msgpack.unpackb

    def dumps(self, obj: Any, /) -> bytes:
        """Encode plain data as msgpack."""
        packed: bytes = self._packb(obj, use_bin_type=True)
        return packed

    def loads(self, data: bytes, /) -> Any:
        """Decode msgpack."""
        return self._unpackb(data, raw=False, strict_map_key=False)


@dataclass(frozen=True)
class FunctionFormat:
    """A format made of a ``(dumps, loads)`` pair of functions."""

    dump: Callable[[Any], bytes | str]
    load: Callable[[bytes], Any]
    name: str

    def dumps(self, obj: Any, /) -> bytes | str:
        """Encode with the user's ``dumps``."""
        return self.dump(obj)

    def loads(self, data: bytes, /) -> Any:
        """Decode with the user's ``loads``."""
        return self.load(data)


#: The kinds of payload that carry rows (see :mod:`declcache._payload`): an entity's row
#: follows its kind, and a list's rows do, one item each (a count is a bare integer).
_ENTITY, _LIST = "e", "l"


@dataclass(frozen=True)
class ModelFunctionFormat:
    """A pair of model functions, advanced-alchemy's shape, as the format of one model.

    ``dump(instance) -> bytes`` encodes one instance; ``load(data, model_class) -> instance``
    decodes it. Every payload stays declcache's (JSON, with its fingerprint, generation and
    kind); each row in it is the bytes ``dump`` made of the instance, stored with the row's
    primary key. Reading, ``load``'s instance must be exactly of the model and be the row it
    was stored as; its column values then go through the model's codec like any cached row,
    so a hit is checked exactly as with any other format (under its key, with its types).
    Anything else raises, which a read counts as an undecodable payload: a miss.

    Attributes:
        dump: the user's ``serializer(instance) -> bytes``.
        load: the user's ``deserializer(data, model_class) -> instance``.
        name: the name the fingerprint holds.
        mapper: the model; ``None`` until :meth:`bound` to one (a config's default format).
    """

    dump: Callable[[Any], bytes | str]
    load: Callable[[bytes, type], Any]
    name: str
    mapper: Mapper[Any] | None = None
    _codec: ModelCodec | None = dataclasses.field(default=None, repr=False, compare=False)

    def bound(self, mapper: Mapper[Any]) -> ModelFunctionFormat:
        """The same functions, as the format of ``mapper``'s model.

        Its codec may unpickle: it only decodes rows this process has just encoded (to hand
        ``serializer`` an instance), never what the cache holds. A cached row is decoded by
        the model cache's own codec, which ``CacheMeta.allow_pickle`` governs.
        """
        codec = ModelCodec(mapper, allow_pickle=True)
        return dataclasses.replace(self, mapper=mapper, _codec=codec)

    def _model(self) -> tuple[Mapper[Any], ModelCodec]:
        if self.mapper is None or self._codec is None:
            raise TypeError(f"{self.name} encodes instances of a model: bind it to one first")
        return self.mapper, self._codec

    def _primary_key(self, instance: object) -> list[str]:
        mapper, _codec = self._model()
        names = primary_key_names(mapper)
        loaded = instance_state(instance).dict
        return list(normalized(mapper, names, [loaded.get(name) for name in names]))

    def dumps(self, obj: Any, /) -> bytes:
        """A payload (a list), each row in it encoded by the user's ``serializer``.

        Raises:
            UnencodableValueError: ``serializer`` failed or returned no bytes: not cached.
        """
        items = list(obj)
        kind = items[2] if len(items) > 2 else None  # fingerprint, generation, kind
        if kind == _ENTITY:
            items[3:] = [self._dump_row(items[3:])]
        elif kind == _LIST:
            items[3:] = [self._dump_row(row) if type(row) is list else row for row in items[3:]]
        return JsonFormat().dumps(items)

    def _dump_row(self, values: list[Any]) -> list[Any]:
        _mapper, codec = self._model()
        instance = codec.decode(values)
        try:
            data = self.dump(instance)
        except Exception as error:
            raise UnencodableValueError(f"{self.name} failed: {error!r}") from error
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, bytearray)):
            raise UnencodableValueError(f"{self.name} returned {type(data).__name__}, not bytes")
        return [self._primary_key(instance), base64.b64encode(data).decode("ascii")]

    def loads(self, data: bytes, /) -> Any:
        """The payload :meth:`dumps` wrote, each row decoded by the user's ``deserializer``.

        Raises:
            ValueError: the payload is malformed, or ``deserializer`` failed, returned something
                other than an instance of the model, or another row than the one stored.
        """
        items = JsonFormat().loads(data)
        if type(items) is not list or len(items) < 4:  # no row: nothing to decode
            return items
        if items[2] == _ENTITY:
            if len(items) != 4:  # one row after the kind
                raise ValueError("an entity payload with more than one row")
            items[3:] = self._load_row(items[3])
        elif items[2] == _LIST:
            items[3:] = [row if type(row) is int else self._load_row(row) for row in items[3:]]
        return items

    def _load_row(self, stored: Any) -> list[Any]:
        mapper, codec = self._model()
        primary_key, encoded = stored
        model = mapper.class_
        try:
            instance = self.load(base64.b64decode(encoded, validate=True), model)
        except Exception as error:
            raise ValueError(f"{self.name} failed: {error!r}") from error
        if type(instance) is not model:
            raise ValueError(
                f"{self.name} returned {type(instance).__qualname__}, not {model.__qualname__}"
            )
        if self._primary_key(instance) != primary_key:
            raise ValueError(f"{self.name} returned another row than the one stored")
        return codec.encode(instance)


def _required_positional(function: Callable[..., Any]) -> int | None:
    """How many positional arguments ``function`` needs; ``None`` when it cannot be told."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # some builtins and C functions have no signature
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in parameters if p.kind in positional and p.default is p.empty)


def _is_model_deserializer(load: Callable[..., Any]) -> bool:
    """Whether ``load`` is advanced-alchemy's ``deserializer(data, model_class)``.

    Only such a function needs two positional arguments: a byte format's ``loads`` takes one.
    """
    return _required_positional(load) == 2  # data and model_class


BUILTIN_FORMATS: dict[str, Callable[[], SerializationFormat]] = {
    "json": JsonFormat,
    "msgpack": MsgpackFormat,
}


def _qualified_name(function: object) -> str:
    if isinstance(function, types.ModuleType):
        return function.__name__
    module = getattr(function, "__module__", None) or "?"
    return f"{module}:{getattr(function, '__qualname__', type(function).__qualname__)}"


def _from_object(obj: object, name: str) -> SerializationFormat:
    if isinstance(obj, tuple) and len(obj) == 2 and all(callable(part) for part in obj):
        dump, load = obj
        if _is_model_deserializer(load):
            return ModelFunctionFormat(dump, load, name.replace("pair:", "model-pair:", 1))
        return FunctionFormat(dump, load, name)
    if isinstance(obj, SerializationFormat) and not isinstance(obj, type):
        return obj
    if isinstance(obj, type) and callable(getattr(obj, "dumps", None)):
        instance = obj()
        if isinstance(instance, SerializationFormat):
            return instance
    raise ValueError(
        f"{name} is neither a (dumps, loads) pair nor an object with dumps() and loads()"
    )


def resolve_format(
    spec: object, mapper: Mapper[Any] | None = None
) -> tuple[str, SerializationFormat]:
    """Return ``(name, format)`` for a serializer as written in CacheMeta or the settings.

    Args:
        spec: ``"json"``, ``"msgpack"``, ``"package.module:attribute"`` naming a format object
            or a ``(dumps, loads)`` pair, or such a pair or object itself. A pair whose
            ``loads`` takes two positional arguments is advanced-alchemy's model pair
            (:class:`ModelFunctionFormat`).
        mapper: the model the format is for; a model pair is bound to it.

    Raises:
        ValueError: unknown name, unimportable module or attribute, or not a format; the
            message says which.
    """
    name, format_ = _resolve(spec)
    if isinstance(format_, ModelFunctionFormat):
        name = format_.name  # a model pair's payloads are not a byte pair's: another fingerprint
        if mapper is not None:
            format_ = format_.bound(mapper)
    return name, format_


def _resolve(spec: object) -> tuple[str, SerializationFormat]:
    if isinstance(spec, str):
        if spec in BUILTIN_FORMATS:
            try:
                return spec, BUILTIN_FORMATS[spec]()
            except ImportError as error:
                raise ValueError(
                    f"{spec!r} needs the {spec!r} package: pip install 'declcache[{spec}]'"
                ) from error
        module_name, colon, attribute = spec.partition(":")
        if not colon or not module_name or not attribute:
            known = ", ".join(repr(name) for name in BUILTIN_FORMATS)
            raise ValueError(
                f"unknown serializer {spec!r}; expected {known} or 'package.module:name'"
            )
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise ValueError(
                f"cannot import module {module_name!r} of {spec!r}: {error}"
            ) from error
        try:
            target = getattr(module, attribute)
        except AttributeError as error:
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}") from error
        return spec, _from_object(target, spec)
    if isinstance(spec, tuple):
        name = "pair:" + _qualified_name(spec[0]) if spec else "pair"
        return name, _from_object(spec, name)
    return _qualified_name(spec), _from_object(spec, repr(spec))
