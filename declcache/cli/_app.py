"""What every ``declcache`` command shares: the Typer app, the console, failing, the settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

try:
    import typer
    from rich.console import Console
    from rich.markup import escape
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise SystemExit(
        f"the declcache command needs the 'cli' extra: pip install 'declcache[cli]' ({error})"
    ) from None

from declcache import __version__, _secrets
from declcache._secrets import redact
from declcache.exceptions import ConfigurationError
from declcache.settings import CacheConfig

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = [
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "app",
    "config_from_env",
    "describe_target",
    "fail",
    "main",
    "new_console",
]

#: Exit code when the backend cannot be reached or refuses an operation.
EXIT_UNREACHABLE = 1
#: Exit code of a usage or configuration error.
EXIT_USAGE = 2

app = typer.Typer(
    name="declcache",
    help="Inspect and operate declcache: the backend, each model's settings, stats.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def new_console(*, stderr: bool = False) -> Console:
    """A console that does not fold tables when the output is a pipe or a file."""
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, width=200, no_color=True)
    return console


def fail(message: str, code: int = EXIT_USAGE, secrets: Iterable[str] = ()) -> typer.Exit:
    """Print ``message`` on stderr and return the exit to raise.

    The message is redacted first: every one of ``secrets`` (see :attr:`CacheConfig.secrets`) and
    every URL's password masked, since it may quote a client's error or a value the user gave.
    """
    shown = escape(redact(message, secrets))
    new_console(stderr=True).print(f"[bold red]error:[/bold red] {shown}", markup=True)
    return typer.Exit(code)


def config_from_env() -> CacheConfig:
    """The settings the application would read: ``CacheConfig.from_env()``; exit 2 if bad."""
    try:
        return CacheConfig.from_env()
    except ConfigurationError as error:
        raise fail(str(error)) from None


def describe_target(config: CacheConfig) -> str:
    """Where the backend is and as whom, passwords masked."""
    return _secrets.describe_target(config.arguments)


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


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    command: Callable[..., Any] = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="declcache", standalone_mode=True)  # type: ignore[attr-defined]
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
