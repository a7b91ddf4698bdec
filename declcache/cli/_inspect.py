"""``declcache inspect``: every model's resolved cache settings and where each value came from."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy import inspect as sa_inspect

from declcache._manager import CacheManager
from declcache._meta import OPTIONS
from declcache.cli._app import app, config_from_env, fail, new_console
from declcache.cli._models import keys_text, load_models, model_spec

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper

    from declcache._meta import ModelSpec
    from declcache.settings import CacheConfig

__all__ = ["inspect_models"]


#: The CacheMeta options ``inspect`` shows beside "cached" (which ``enabled`` decides).
_SHOWN_OPTIONS = tuple(option for option in OPTIONS if option.name != "enabled")


def _shown(name: str, value: Any) -> Any:
    """An option's value as JSON shows it: key sets as lists."""
    return [list(fields) for fields in value] if name == "key_fields" else value


def _row(spec: ModelSpec | None, manager: CacheManager, model: type) -> dict[str, Any]:
    table = getattr(sa_inspect(model).local_table, "name", None)
    if spec is None:
        return {"model": model.__name__, "table": table, "cached": False, "why": "no CacheMeta"}
    cached = spec.enabled and manager.enabled
    if not manager.enabled:
        why = f"caching is off ({manager.config.sources.get('enabled', 'default')})"
    else:
        why = spec.sources.get("enabled", "default")
    options = {
        option.name: _shown(option.name, getattr(spec, option.name)) for option in _SHOWN_OPTIONS
    }
    return {
        "model": model.__name__,
        "table": table,
        "cached": cached,
        "why": why,
        **options,
        "fingerprint": spec.fingerprint,
        "sources": dict(spec.sources),
    }


def _check_override_names(config: CacheConfig, mappers: list[Mapper[Any]], module: str) -> None:
    """Fail on a per-model override that names neither a class nor a table of ``mappers``."""
    known = {mapper.class_.__name__ for mapper in mappers}
    known |= {name for mapper in mappers if (name := getattr(mapper.local_table, "name", None))}
    for name in config.models:
        if name not in known:
            raise fail(
                f"{config.setting_name('models')}[{name}] names no model of {module}"
                f" (class or table names: {', '.join(sorted(known))})"
            )


def _text(name: str, value: Any) -> str:
    """An option's value as the table shows it."""
    return keys_text(value) if name == "key_fields" else str(value)


@app.command(name="inspect")
def inspect_models(
    app_module: Annotated[
        str,
        typer.Argument(
            metavar="APP_MODULE", help="Module defining the models, e.g. example_project.models."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print every mapped model's resolved cache settings and where each value came from.

    Imports APP_MODULE, configures the mappers (which validates every CacheMeta) and resolves
    each model against the DECLCACHE_* settings. An invalid CacheMeta or override exits 2,
    and so does an override naming no model of the module (a typo would be silently ignored).
    """
    config = config_from_env()
    mappers = load_models(app_module)
    _check_override_names(config, mappers, app_module)
    manager = CacheManager(config)
    rows = [_row(model_spec(manager, mapper.class_), manager, mapper.class_) for mapper in mappers]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=escape(f"declcache models in {app_module} (backend {config.backend})"))
    table.add_column("model", no_wrap=True)
    table.add_column("cached")
    for option in _SHOWN_OPTIONS:
        table.add_column(option.name)
    table.add_column("fingerprint", no_wrap=True)
    for row in rows:
        why = f"[dim]{escape(row['why'])}[/dim]"
        if "fingerprint" not in row:
            table.add_row(escape(row["model"]), f"no\n{why}", *[""] * (len(_SHOWN_OPTIONS) + 1))
            continue
        sources = row["sources"]
        cells = [
            f"{escape(_text(option.name, row[option.name]))}\n"
            f"[dim]{escape(sources.get(option.name, 'default'))}[/dim]"
            for option in _SHOWN_OPTIONS
        ]
        cached = "yes" if row["cached"] else "no"
        table.add_row(escape(row["model"]), f"{cached}\n{why}", *cells, row["fingerprint"])
    new_console().print(table)
