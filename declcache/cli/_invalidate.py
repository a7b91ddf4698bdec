"""``declcache invalidate``: drop cached entities of a model by key, or all of them.

A key must be nameable whatever its values hold — ``+``, ``=``, ``&``, ``%``, spaces, quotes,
unicode, leading zeros — so nothing here decodes URLs. Three spellings, all exact:

* ``KEY``: a primary-key value as written (``42``, ``a=b`` when ``a`` is not a column);
  or, when the text before its first ``=`` is a column, ``field=value`` pairs joined by ``&``,
  each split on its first ``=`` and its value taken as written (the short form, for values
  without ``&``);
* ``--json JSON``: an object of fields (``{"org_id": 7, "slug": "c++"}``), an array for a
  composite primary key, or a scalar primary-key value (``"a=b"``);
* ``--field NAME=VALUE``, repeated: the fields of one key, each value as written.

Text is converted by the column's type (``"7"`` for an integer column is ``7``, ``"007"`` for
a string column stays ``"007"``), then checked by the model's :class:`~declcache._keys.
KeyBuilder`, as the manager checks it; what is printed is each key as the cache spells it.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import typer
from sqlalchemy import inspect as sa_inspect

from declcache._keys import KeyBuilder, ident_parts, normalized
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
    from collections.abc import Callable

    from sqlalchemy.orm import Mapper

    from declcache._api import Ident
    from declcache._meta import ModelSpec

__all__ = ["Key", "invalidate", "parse_field", "parse_json", "parse_key"]

#: One key as the command line wrote it: the text (for messages) and the ident it names.
Key = tuple[str, "Ident"]

_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def _boolean(text: str) -> bool:
    try:
        return _BOOLEANS[text.lower()]
    except KeyError:
        raise ValueError(f"expected true or false, got {text!r}") from None


#: Text to a column's Python type, for the types whose key text is not the value's ``str``;
#: integers and UUIDs are left to the key normaliser, which reads their text already.
_FROM_TEXT: dict[type, Callable[[str], Any]] = {
    bool: _boolean,
    float: float,
    decimal.Decimal: decimal.Decimal,
    dt.datetime: dt.datetime.fromisoformat,
    dt.date: dt.date.fromisoformat,
    dt.time: dt.time.fromisoformat,
}


def _typed(mapper: Mapper[Any], field: str, value: Any) -> Any:
    """``value`` as ``field``'s column holds it, when it was given as text."""
    prop = mapper.column_attrs.get(field)
    if not isinstance(value, str) or prop is None:
        return value
    try:
        python_type = prop.columns[0].type.python_type
    except NotImplementedError:
        return value
    convert = _FROM_TEXT.get(python_type)
    return value if convert is None else convert(value)


def _typed_ident(mapper: Mapper[Any], primary_key: tuple[str, ...], ident: Ident) -> Ident:
    if isinstance(ident, Mapping):
        return {field: _typed(mapper, field, value) for field, value in ident.items()}
    if isinstance(ident, tuple):
        return tuple(_typed(mapper, f, v) for f, v in zip(primary_key, ident, strict=False))
    return _typed(mapper, primary_key[0], ident)


def _pairs(pairs: list[str], how: str) -> dict[str, str]:
    """``name=value`` texts as fields, split on the first ``=``; values as written."""
    fields: dict[str, str] = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise fail(f"cannot read {pair!r}: expected {how}")
        if name in fields:
            raise fail(f"{name!r} is given twice")
        fields[name] = value
    return fields


def parse_key(text: str, mapper: Mapper[Any]) -> Ident:
    """A KEY argument: a primary-key value, or ``field=value[&field=value]`` pairs.

    Pairs only when the text before the first ``=`` is a column of the model: a primary-key
    value such as ``a=b`` stays a value. A value with ``&`` in it needs ``--field`` or ``--json``.
    """
    name, equals, _rest = text.partition("=")
    if not equals or name not in mapper.column_attrs:
        return text
    return _pairs(
        text.split("&"),
        "field=value pairs joined by & (a value holding & goes in --field NAME=VALUE or --json)",
    )


def parse_field(texts: list[str]) -> dict[str, str]:
    """The ``--field NAME=VALUE`` options: together, the fields of one key."""
    return _pairs(texts, "--field NAME=VALUE")


def parse_json(text: str) -> Ident:
    """A ``--json`` key: an object of fields, an array for a composite key, or one value."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise fail(f"--json {text!r} is not JSON: {error}") from None
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        value = tuple(value)
    items = value if isinstance(value, tuple) else (value,)
    if not items or any(item is None or isinstance(item, (dict, list)) for item in items):
        raise fail(
            f"--json {text!r}: expected an object of fields, an array of primary-key values "
            "or one primary-key value"
        )
    return value


def _checked(
    keys: KeyBuilder, mapper: Mapper[Any], text: str, ident: Ident
) -> tuple[Ident, dict[str, str]]:
    """``ident`` converted by its columns' types, and its values as the cache spells them.

    The model's :class:`KeyBuilder` decides, exactly as :meth:`CacheManager.invalidate` will;
    exits 2 when ``ident`` names no key of the model or a value does not fit its column.
    """
    name = mapper.class_.__name__
    try:
        ident = _typed_ident(mapper, keys.primary_key, ident)
        keys.of_ident(ident)
        fields, values = ident_parts(ident, keys.primary_key)
        shown = normalized(mapper, fields, values)
    except (ValueError, TypeError, ArithmeticError) as error:
        if isinstance(ident, Mapping) and set(ident) not in map(set, keys.key_sets):
            raise fail(
                f"{sorted(ident)} is not a key of {name}; keys are {keys_text(keys.key_sets)}"
            ) from None
        hint = ""
        if not isinstance(ident, Mapping) and len(keys.primary_key) > 1:
            spelled = " ".join(f"--field {field}=…" for field in keys.primary_key)
            hint = f" ({name} has a composite primary key: {spelled}, or --json '[…]')"
        raise fail(f"{text!r} is not a valid key of {name}: {error}{hint}") from None
    return ident, dict(zip(fields, shown, strict=True))


def _keys_given(
    mapper: Mapper[Any], texts: list[str], json_texts: list[str], field_texts: list[str]
) -> list[Key]:
    given: list[Key] = [(text, parse_key(text, mapper)) for text in texts]
    given += [(text, parse_json(text)) for text in json_texts]
    if field_texts:
        given.append(
            (" ".join(f"--field {text}" for text in field_texts), parse_field(field_texts))
        )
    return given


def _scope_text(scope: str | None, schema: str) -> str:
    parts = [f"schema {schema}"] if schema else []
    if scope is not None:
        parts.append(f"scope {scope!r}")
    return f" in {', '.join(parts)}" if parts else ""


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
            help="Primary-key values as written, or field=value[&field=value] when the text "
            "before the first = is a column. None (and no --json/--field): the whole model.",
        ),
    ] = None,
    *,
    json_keys: Annotated[
        list[str] | None,
        typer.Option(
            "--json",
            metavar="JSON",
            help='A key as JSON: {"org_id": 7, "slug": "c++"}, [7, "c++"] for a composite '
            'primary key, or "a=b" for one value. Repeat for more keys.',
        ),
    ] = None,
    fields: Annotated[
        list[str] | None,
        typer.Option(
            "--field",
            "-f",
            metavar="NAME=VALUE",
            help="One field of a key, split on the first =, the value as written. Repeat for "
            "each field of the key.",
        ),
    ] = None,
    scope: Annotated[
        str | None,
        typer.Option("--scope", metavar="NAME", help="The named scope (tenant) to drop."),
    ] = None,
    schema: Annotated[
        str | None,
        typer.Option(
            "--schema", metavar="NAME", help="The schema a schema_translate_map sends the table to."
        ),
    ] = None,
) -> None:
    """Drop cached entities of MODEL by key, or every cached entity and list of it.

    Each KEY is a primary-key value (``42``), or ``field=value`` pairs joined by ``&`` for a
    composite primary key or a ``key_fields`` set (``email=a@b.c``). ``--json`` and
    ``--field`` name any value exactly. Exits 1 when the backend did not take the
    invalidation.
    """
    config = config_from_env()
    model = find_model(load_models(app_module), model_name)
    manager = CacheManager(config)
    spec: ModelSpec | None = model_spec(manager, model)
    if spec is None or not spec.enabled or not manager.enabled:
        new_console().print(f"{model.__name__} is not cached: nothing to invalidate", markup=False)
        return
    mapper: Mapper[Any] = sa_inspect(model)
    builder = KeyBuilder(config.key_prefix, mapper, spec.key_fields)
    given = _keys_given(mapper, keys or [], json_keys or [], fields or [])
    named = [(ident, _checked(builder, mapper, text, ident)) for text, ident in given]
    where = _scope_text(scope, schema or "")
    if named:
        done = [
            manager.invalidate(
                model,
                _typed_ident(mapper, builder.primary_key, ident),
                scope=scope,
                schema=schema or "",
            )
            for ident, _shown in named
        ]
        what = f"{len(named)} key(s) of {model.__name__} and its cached lists{where}"
    else:
        done = [manager.invalidate_model(model, scope=scope, schema=schema or "")]
        what = f"every cached entity and list of {model.__name__}{where}"
    if not all(done):
        raise fail(
            f"{config.backend} did not take the invalidation ({describe_target(config)})",
            EXIT_UNREACHABLE,
        )
    console = new_console()
    console.print(f"invalidated {what} (prefix {config.key_prefix})", markup=False)
    for _ident, shown in named:
        console.print("  " + json.dumps(shown, ensure_ascii=False), markup=False)
