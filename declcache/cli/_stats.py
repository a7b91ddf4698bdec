"""``declcache stats``: each model's counters, from a module's manager or a running app's URL."""

from __future__ import annotations

import json
import urllib.request
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from declcache._manager import CacheManager
from declcache._secrets import mask_url
from declcache.cli._app import EXIT_UNREACHABLE, app, fail, new_console
from declcache.cli._models import import_app_module
from declcache.exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["stats"]

#: Where ``--run-example`` finds its workload (a checkout of the repository).
EXAMPLE_TARGET = "example_project.workload:demo_manager"
#: Attribute names a module may expose its manager under, tried in order.
MANAGER_ATTRIBUTES = ("cache_manager", "manager")


def _manager_of(target: str) -> CacheManager:
    """``module`` or ``module:attribute``: a manager, or a callable returning one."""
    module_name, _, attribute = target.partition(":")
    module = import_app_module(module_name)
    names = [attribute] if attribute else list(MANAGER_ATTRIBUTES)
    for name in names:
        value = getattr(module, name, None)
        if value is None:
            continue
        if callable(value) and not isinstance(value, CacheManager):
            try:
                value = value()
            except ConfigurationError as error:
                raise fail(str(error)) from None
        if isinstance(value, CacheManager):
            return value
        raise fail(f"{module_name}:{name} is {type(value).__name__}, not a CacheManager")
    raise fail(
        f"{module_name!r} has no {' or '.join(names)}: pass MODULE:ATTRIBUTE naming a "
        "CacheManager or a function returning one"
    )


def _fetch_stats(url: str) -> dict[str, dict[str, int]]:
    """Counters a running application serves as JSON: ``{model: {counter: value}}``.

    An error shows ``url`` masked (:func:`~declcache.cli._app.fail` redacts every message).
    """
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            data = json.load(response)
    except (OSError, ValueError) as error:
        raise fail(f"cannot read stats from {url}: {error}", EXIT_UNREACHABLE) from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise fail(f"{url} did not answer {{model: {{counter: value}}}} JSON")
    return data


def _stats_rows(stats: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for name, counters in sorted(stats.items()):
        row: dict[str, Any] = dict(counters)
        hits, misses = row.get("hits", 0), row.get("misses", 0)
        row["hit_ratio"] = round(hits / (hits + misses), 4) if hits + misses else None
        rows[name] = row
    return rows


@app.command()
def stats(
    target: Annotated[
        str | None,
        typer.Argument(
            metavar="[MODULE[:ATTRIBUTE] | URL]",
            help="A module exposing a CacheManager (cache_manager or manager), a "
            "function returning one after running a workload, or the http(s) URL where a "
            "running application serves manager.stats() as JSON.",
        ),
    ] = None,
    run_example: Annotated[
        bool,
        typer.Option(
            "--run-example", help=f"Run the example project's workload ({EXAMPLE_TARGET})."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print each model's cache counters: hits, misses, hit ratio, fills, invalidations, errors.

    Counters live in the process that caches. Point TARGET at a module exposing its manager, at
    a function that runs a workload and returns the manager, or at the URL where a running
    application serves them (the example API's /stats); --run-example runs the example
    project's read-heavy workload (from a checkout of the repository).
    """
    if run_example == (target is not None):
        raise fail("pass either MODULE[:ATTRIBUTE], URL or --run-example")
    if target is not None and target.startswith(("http://", "https://")):
        counters, origin = _fetch_stats(target), mask_url(target)
    else:
        manager = _manager_of(EXAMPLE_TARGET if run_example else str(target))
        counters = {name: stats.as_dict() for name, stats in manager.stats().items()}
        origin = manager.config.backend
    rows = _stats_rows(counters)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=escape(f"declcache stats ({origin})"))
    columns = ["model", "hits", "misses", "hit ratio", "fills", "invalidations", "errors"]
    columns += ["fills refused", "queued"]
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, row in rows.items():
        ratio = "-" if row["hit_ratio"] is None else f"{row['hit_ratio']:.1%}"
        table.add_row(
            escape(name),
            *(str(row.get(key, "-")) for key in ("hits", "misses")),
            ratio,
            *(
                str(row.get(key, "-"))
                for key in ("fills", "invalidations", "errors", "fills_refused")
            ),
            str(row.get("invalidations_queued", "-")),
        )
    new_console().print(table)
    if not rows:
        new_console().print("no cached model was used yet", markup=False)
