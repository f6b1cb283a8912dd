"""What both command-line apps share: the console, and turning our errors into clean exits.

Only :class:`~sam_cache.errors.SamcacheError` (a mistake in what the user asked for, or data
that cannot be used) and ``OSError`` (the file system refused: read-only, full) become one red line
and exit status 1. Anything else is a bug and keeps its
traceback. ``--debug`` anywhere on the command line shows the traceback of ours too.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import typer
from rich.console import Console

console = Console(soft_wrap=True, highlight=False)  # log lines stay whole in files and pipes
err_console = Console(stderr=True, soft_wrap=True, highlight=False)
DEBUG = False

# timm still imports its own deprecated aliases; users should not see that on every run.
warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)


def say(text: str) -> None:
    """Print user-controlled text (paths, ids, labels) literally: no rich markup, no :emoji: codes."""
    console.print(text, markup=False, emoji=False)


def warn(text: str) -> None:
    """:func:`say`, on stderr."""
    err_console.print(text, markup=False, emoji=False)


@contextlib.contextmanager
def user_errors():
    """Print a :class:`SamcacheError`, or an ``OSError`` from the file system (read-only, full), as
    one red line and exit 1 (with ``--debug``: re-raise)."""
    from sam_cache.errors import SamcacheError

    from sam_cache.outputs import describe_os_error

    try:
        yield
    except SamcacheError as exc:
        if DEBUG:
            raise
        _error(str(exc))
    except OSError as exc:  # the machine said no (a read-only folder, a full disk): one line naming the file
        if DEBUG:
            raise
        where = exc.filename or ""
        _error(f"{where}: {describe_os_error(exc)}" if where else describe_os_error(exc))


def _error(text: str) -> None:
    err_console.print("[bold red]error:[/] ", end="")
    err_console.print(text, markup=False, emoji=False)
    raise typer.Exit(1) from None


def run(app: typer.Typer) -> None:
    """Run a command-line app; ``--debug`` anywhere shows tracebacks, ``--version`` prints the version."""
    global DEBUG
    prog = sys.argv[0].rsplit("/", 1)[-1]
    if sys.argv[1:] == ["--version"]:
        from sam_cache import __version__

        say(f"{'slca-train' if 'slca' in prog else 'samcache'} {__version__}")
        return
    if "--debug" in sys.argv[1:]:
        DEBUG = True
        sys.argv.remove("--debug")
    app(prog_name=prog)
