"""The ``declcache`` command: check the backend, inspect models, read stats, invalidate.

Every command reads the cache settings the application would: ``CacheConfig.from_env()``
(``DECLCACHE_*`` variables and ``.env``). Exit codes: ``0`` success, ``1`` the backend could
not be reached or did not take the operation, ``2`` a usage or configuration error (an
unimportable module, an unknown model, an invalid CacheMeta or setting).

Install it with ``pip install 'declcache[cli]'``; ``python -m declcache`` runs the same.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import statistics
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qsl

try:
    import typer
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise SystemExit(
        f"the declcache command needs the 'cli' extra: pip install 'declcache[cli]' ({error})"
    ) from None

from dogpile.cache.exception import PluginNotFound
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Mapper, configure_mappers

from declcache import __version__, backends
from declcache._keys import normalized
from declcache._manager import CacheManager
from declcache._meta import OPTIONS
from declcache.exceptions import ConfigurationError
from declcache.settings import CacheConfig

if TYPE_CHECKING:
    from types import ModuleType

    from declcache._meta import ModelSpec

__all__ = ["app", "main"]

#: Exit code when the backend cannot be reached or refuses an operation.
EXIT_UNREACHABLE = 1
#: Exit code of a usage or configuration error.
EXIT_USAGE = 2
#: Where ``--run-example`` finds its workload (a checkout of the repository).
EXAMPLE_TARGET = "example_project.workload:demo_manager"
#: Attribute names a module may expose its manager under, tried in order.
MANAGER_ATTRIBUTES = ("cache_manager", "manager")

app = typer.Typer(
    name="declcache",
    help="Inspect and operate declcache: the backend, each model's settings, stats.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _console(*, stderr: bool = False) -> Console:
    """A console that does not fold tables when the output is a pipe or a file."""
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, width=200, no_color=True)
    return console


def _fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``message`` on stderr and return the exit to raise."""
    _console(stderr=True).print(f"[bold red]error:[/bold red] {escape(message)}", markup=True)
    return typer.Exit(code)


def _config() -> CacheConfig:
    try:
        return CacheConfig.from_env()
    except ConfigurationError as error:
        raise _fail(str(error)) from None


def _redacted(value: str) -> str:
    return re.sub(r"://[^@/]*@", "://***@", value)


def _describe_target(config: CacheConfig) -> str:
    """Where the backend is, without passwords."""
    shown = []
    for name in ("url", "host", "port", "db", "filename", "sentinels", "service_name"):
        if name in config.arguments:
            shown.append(f"{name}={_redacted(str(config.arguments[name]))}")
    return ", ".join(shown) or "in this process"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"declcache {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Inspect and operate declcache: the backend, each model's settings, stats."""


# -- check --------------------------------------------------------------------------------


def probe_backend(config: CacheConfig, rounds: int = 5) -> float:
    """Write, read back and delete a probe key under the prefix; the median round trip in s.

    Raises:
        RuntimeError: the probe read back something else than it wrote.
        Exception: whatever the backend's client raises when it cannot be reached.
    """
    backend = backends.open_backend(config.backend, config.arguments, config)
    store = backend.store(backend.make_region("check", 60))
    key = f"{config.key_prefix}check:{uuid.uuid4().hex}"
    value = uuid.uuid4().hex.encode("ascii")
    timings = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            store.write_many([(key, value, 60)])
            read = store.get_many([key])[0]
            timings.append(time.perf_counter() - started)
            if read != value and config.backend != "dogpile.cache.null":
                raise RuntimeError(f"wrote {value!r} under {key!r} and read back {read!r}")
    finally:
        with contextlib.suppress(Exception):  # the probe key expires on its own
            store.delete_many([key])
    return statistics.median(timings)


@app.command()
def check(
    rounds: Annotated[
        int, typer.Option(min=1, help="Round trips to time (the median is shown).")
    ] = 5,
) -> None:
    """Reach the configured backend: print its name and round-trip time.

    Writes, reads back and deletes one probe key under the key prefix. Exits 1 with the
    client's error when the backend cannot be reached.
    """
    config = _config()
    console = _console()
    source = config.sources.get("backend", "default")
    target = _describe_target(config)
    console.print(f"backend: {config.backend} ({target}; from {source})", markup=False)
    console.print(f"key prefix: {config.key_prefix}", markup=False)
    if not config.enabled:
        disabled_by = config.sources.get("enabled", "default")
        console.print(f"caching is disabled ({disabled_by})", markup=False)
        return
    try:
        elapsed = probe_backend(config, rounds)
    except ConfigurationError as error:
        raise _fail(str(error)) from None
    except PluginNotFound:
        raise _fail(
            f"{config.setting_name('backend')}: unknown dogpile backend {config.backend!r}"
        ) from None
    except ImportError as error:
        raise _fail(f"{config.backend} needs a client library: {error}") from None
    except Exception as error:  # any client error means "unreachable"
        raise _fail(
            f"{config.backend} is unreachable ({_describe_target(config)}): "
            f"{type(error).__name__}: {error}",
            EXIT_UNREACHABLE,
        ) from None
    console.print(f"ok: round trip {elapsed * 1000:.3f} ms (median of {rounds})", markup=False)
    if config.backend == "dogpile.cache.null":
        console.print("note: the null backend stores nothing: every read misses", markup=False)


# -- inspect ------------------------------------------------------------------------------


def _import(module_name: str) -> ModuleType:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the current project is importable
    try:
        return importlib.import_module(module_name)
    except ConfigurationError as error:
        raise _fail(str(error)) from None
    except ImportError as error:
        raise _fail(f"cannot import {module_name!r}: {error}") from None


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


def _load_models(module_name: str) -> list[Mapper[Any]]:
    module = _import(module_name)
    try:
        configure_mappers()
    except ConfigurationError as error:
        raise _fail(str(error)) from None
    mappers = mapped_models(module)
    if not mappers:
        raise _fail(f"{module_name!r} defines no mapped SQLAlchemy models")
    return mappers


def _spec(manager: CacheManager, model: type) -> ModelSpec | None:
    try:
        return manager.spec(model)
    except ConfigurationError as error:
        raise _fail(str(error)) from None


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
            raise _fail(
                f"{config.setting_name('models')}[{name}] names no model of {module}"
                f" (class or table names: {', '.join(sorted(known))})"
            )


def _keys_text(key_fields: Iterable[Iterable[str]]) -> str:
    return " | ".join(",".join(fields) for fields in key_fields)


def _text(name: str, value: Any) -> str:
    """An option's value as the table shows it."""
    return _keys_text(value) if name == "key_fields" else str(value)


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
    config = _config()
    mappers = _load_models(app_module)
    _check_override_names(config, mappers, app_module)
    manager = CacheManager(config)
    rows = [_row(_spec(manager, mapper.class_), manager, mapper.class_) for mapper in mappers]
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
    _console().print(table)


# -- invalidate ---------------------------------------------------------------------------


def _find_model(mappers: list[Mapper[Any]], name: str) -> type:
    for mapper in mappers:
        table = getattr(mapper.local_table, "name", None)
        if name in {mapper.class_.__name__, table}:
            model: type = mapper.class_
            return model
    known = ", ".join(mapper.class_.__name__ for mapper in mappers)
    raise _fail(f"no model named {name!r} (models: {known})")


def parse_key(text: str) -> Any:
    """A KEY argument: a primary-key value, or ``field=value[&field=value]`` for a key set."""
    if "=" not in text:
        return text
    pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False)
    if not pairs:
        raise _fail(f"cannot read the key {text!r}: expected VALUE or field=value[&field=value]")
    return dict(pairs)


def _check_key(model: type, spec: ModelSpec, text: str, ident: Any) -> None:
    """Exit 2 unless ``ident`` names a key of ``model`` with values its columns accept."""
    if isinstance(ident, Mapping):
        if set(ident) not in [set(fields) for fields in spec.key_fields]:
            raise _fail(
                f"{sorted(ident)} is not a key of {model.__name__}; keys are "
                f"{_keys_text(spec.key_fields)}"
            )
        fields, values = tuple(ident), tuple(ident.values())
    else:
        fields, values = spec.primary_key, (ident,)
        if len(fields) > 1:
            raise _fail(
                f"{model.__name__} has a composite primary key: write "
                + "&".join(f"{name}=…" for name in fields)
            )
    try:
        normalized(sa_inspect(model), fields, values)
    except (ValueError, TypeError) as error:
        raise _fail(f"{text!r} is not a valid key of {model.__name__}: {error}") from None


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
    config = _config()
    model = _find_model(_load_models(app_module), model_name)
    manager = CacheManager(config)
    spec = _spec(manager, model)
    if spec is None or not spec.enabled or not manager.enabled:
        _console().print(f"{model.__name__} is not cached: nothing to invalidate", markup=False)
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
        raise _fail(
            f"{config.backend} did not take the invalidation ({_describe_target(config)})",
            EXIT_UNREACHABLE,
        )
    _console().print(f"invalidated {what} (prefix {config.key_prefix})", markup=False)


# -- stats --------------------------------------------------------------------------------


def _manager_of(target: str) -> CacheManager:
    """``module`` or ``module:attribute``: a manager, or a callable returning one."""
    module_name, _, attribute = target.partition(":")
    module = _import(module_name)
    names = [attribute] if attribute else list(MANAGER_ATTRIBUTES)
    for name in names:
        value = getattr(module, name, None)
        if value is None:
            continue
        if callable(value) and not isinstance(value, CacheManager):
            try:
                value = value()
            except ConfigurationError as error:
                raise _fail(str(error)) from None
        if isinstance(value, CacheManager):
            return value
        raise _fail(f"{module_name}:{name} is {type(value).__name__}, not a CacheManager")
    raise _fail(
        f"{module_name!r} has no {' or '.join(names)}: pass MODULE:ATTRIBUTE naming a "
        "CacheManager or a function returning one"
    )


def _fetch_stats(url: str) -> dict[str, dict[str, int]]:
    """Counters a running application serves as JSON: ``{model: {counter: value}}``."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            data = json.load(response)
    except (OSError, ValueError) as error:
        raise _fail(f"cannot read stats from {url}: {error}", EXIT_UNREACHABLE) from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise _fail(f"{url} did not answer {{model: {{counter: value}}}} JSON")
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
        raise _fail("pass either MODULE[:ATTRIBUTE], URL or --run-example")
    if target is not None and target.startswith(("http://", "https://")):
        counters, origin = _fetch_stats(target), target
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
    _console().print(table)
    if not rows:
        _console().print("no cached model was used yet", markup=False)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    command: Callable[..., Any] = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="declcache", standalone_mode=True)  # type: ignore[attr-defined]
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
