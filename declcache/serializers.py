"""Byte formats for cached payloads: JSON (the default), msgpack, or your own pair.

A format only turns plain data (``None``, ``bool``, ``int``, ``float``, ``str``, lists and
dicts of them) into bytes and back. Giving every column value its exact Python type back
(``Decimal``, aware ``datetime``, ``UUID``, enums …) is the job of the per-model codec, which
runs before the format, so any format that round-trips JSON-like data is exact.

No format here uses pickle: a cache shared between processes must never be a way to run code.
"""

from __future__ import annotations

import importlib
import json
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "BUILTIN_FORMATS",
    "FunctionFormat",
    "JsonFormat",
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


def resolve_format(spec: object) -> tuple[str, SerializationFormat]:
    """Return ``(name, format)`` for a serializer as written in CacheMeta or the settings.

    Args:
        spec: ``"json"``, ``"msgpack"``, ``"package.module:attribute"`` naming a format object
            or a ``(dumps, loads)`` pair, or such a pair or object itself.

    Raises:
        ValueError: unknown name, unimportable module or attribute, or not a format; the
            message says which.
    """
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
