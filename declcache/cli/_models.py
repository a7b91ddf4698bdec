"""An application's models, found from the module name a command is given."""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Mapper, configure_mappers

from declcache.cli._app import fail
from declcache.exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import ModuleType

    from declcache._manager import CacheManager
    from declcache._meta import ModelSpec

__all__ = [
    "find_model",
    "import_app_module",
    "keys_text",
    "load_models",
    "mapped_models",
    "model_spec",
]


def import_app_module(module_name: str) -> ModuleType:
    """The application's module, importable from the working directory as with ``-m``."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the current project is importable
    try:
        return importlib.import_module(module_name)
    except ConfigurationError as error:
        raise fail(str(error)) from None
    except ImportError as error:
        raise fail(f"cannot import {module_name!r}: {error}") from None


def mapped_models(module: ModuleType) -> list[Mapper[Any]]:
    """Every mapper of the registries the classes of ``module`` belong to, sorted by name."""
    registries = []
    for value in vars(module).values():
        if not isinstance(value, type):
            continue
        found: Any = sa_inspect(value, raiseerr=False)
        if isinstance(found, Mapper) and found.registry not in registries:
            registries.append(found.registry)
    mappers = {mapper for registry in registries for mapper in registry.mappers}
    return sorted(mappers, key=lambda mapper: (mapper.class_.__module__, mapper.class_.__name__))


def load_models(module_name: str) -> list[Mapper[Any]]:
    """The module's mappers, configured (which validates every CacheMeta); exit 2 if none."""
    module = import_app_module(module_name)
    try:
        configure_mappers()
    except ConfigurationError as error:
        raise fail(str(error)) from None
    mappers = mapped_models(module)
    if not mappers:
        raise fail(f"{module_name!r} defines no mapped SQLAlchemy models")
    return mappers


def model_spec(manager: CacheManager, model: type) -> ModelSpec | None:
    """The manager's resolved spec of ``model``; exit 2 when its CacheMeta is invalid."""
    try:
        return manager.spec(model)
    except ConfigurationError as error:
        raise fail(str(error)) from None


def find_model(mappers: list[Mapper[Any]], name: str) -> type:
    """The mapped class named ``name`` (class or table name); exit 2 if none."""
    for mapper in mappers:
        table = getattr(mapper.local_table, "name", None)
        if name in {mapper.class_.__name__, table}:
            model: type = mapper.class_
            return model
    known = ", ".join(mapper.class_.__name__ for mapper in mappers)
    raise fail(f"no model named {name!r} (models: {known})")


def keys_text(key_fields: Iterable[Iterable[str]]) -> str:
    """Key sets as a table shows them: ``id | org,slug``."""
    return " | ".join(",".join(fields) for fields in key_fields)
