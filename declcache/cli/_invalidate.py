"""``declcache invalidate``: drop cached entities of a model by key, or all of them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qsl

import typer
from sqlalchemy import inspect as sa_inspect

from declcache._keys import normalized
from declcache._manager import CacheManager
from declcache.cli._app import (
    EXIT_UNREACHABLE,
    app,
    config_from_env,
    describe_target,
    fail,
    new_console,
)
from declcache.cli._models import find_model, keys_text, load_models, model_spec

if TYPE_CHECKING:
    from declcache._meta import ModelSpec

__all__ = ["invalidate", "parse_key"]


def parse_key(text: str) -> Any:
    """A KEY argument: a primary-key value, or ``field=value[&field=value]`` for a key set."""
    if "=" not in text:
        return text
    pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False)
    if not pairs:
        raise fail(f"cannot read the key {text!r}: expected VALUE or field=value[&field=value]")
    return dict(pairs)


def _check_key(model: type, spec: ModelSpec, text: str, ident: Any) -> None:
    """Exit 2 unless ``ident`` names a key of ``model`` with values its columns accept."""
    if isinstance(ident, Mapping):
        if set(ident) not in [set(fields) for fields in spec.key_fields]:
            raise fail(
                f"{sorted(ident)} is not a key of {model.__name__}; keys are "
                f"{keys_text(spec.key_fields)}"
            )
        fields, values = tuple(ident), tuple(ident.values())
    else:
        fields, values = spec.primary_key, (ident,)
        if len(fields) > 1:
            raise fail(
                f"{model.__name__} has a composite primary key: write "
                + "&".join(f"{name}=…" for name in fields)
            )
    try:
        normalized(sa_inspect(model), fields, values)
    except (ValueError, TypeError) as error:
        raise fail(f"{text!r} is not a valid key of {model.__name__}: {error}") from None


@app.command()
def invalidate(
    app_module: Annotated[
        str, typer.Argument(metavar="APP_MODULE", help="Module defining the models.")
    ],
    model_name: Annotated[str, typer.Argument(metavar="MODEL", help="Class or table name.")],
    keys: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="KEY",
            help="Primary-key values, or field=value[&field=value] for a key_fields set. "
            "None: the whole model.",
        ),
    ] = None,
) -> None:
    """Drop cached entities of MODEL by key, or every cached entity and list of it.

    Each KEY is a primary-key value (``42``), or ``field=value`` pairs joined by ``&`` for a
    composite primary key or a ``key_fields`` set (``email=a@b.c``). Exits 1 when the backend
    did not take the invalidation.
    """
    config = config_from_env()
    model = find_model(load_models(app_module), model_name)
    manager = CacheManager(config)
    spec = model_spec(manager, model)
    if spec is None or not spec.enabled or not manager.enabled:
        new_console().print(f"{model.__name__} is not cached: nothing to invalidate", markup=False)
        return
    idents = [parse_key(text) for text in keys or []]
    for text, ident in zip(keys or [], idents, strict=True):
        _check_key(model, spec, text, ident)
    if idents:
        done = [manager.invalidate(model, ident) for ident in idents]
        what = f"{len(idents)} key(s) of {model.__name__} and its cached lists"
    else:
        done = [manager.invalidate_model(model)]
        what = f"every cached entity and list of {model.__name__}"
    if not all(done):
        raise fail(
            f"{config.backend} did not take the invalidation ({describe_target(config)})",
            EXIT_UNREACHABLE,
        )
    new_console().print(f"invalidated {what} (prefix {config.key_prefix})", markup=False)
