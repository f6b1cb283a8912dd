"""What both command-line apps share: the console, and turning our errors into clean exits.

Only :class:`~sam_cache.errors.SamcacheError` (a mistake in what the user asked for, or data
that cannot be used) becomes one red line and exit status 1. Anything else is a bug and keeps its
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
    """Print a :class:`SamcacheError` as one red line and exit 1 (with ``--debug``: re-raise)."""
    from sam_cache.errors import SamcacheError

    try:
        yield
    except SamcacheError as exc:
        if DEBUG:
            raise
        err_console.print("[bold red]error:[/] ", end="")
        err_console.print(str(exc), markup=False, emoji=False)
        raise typer.Exit(1) from None


def run(app: typer.Typer) -> None:
    global DEBUG
    if "--debug" in sys.argv[1:]:
        DEBUG = True
        sys.argv.remove("--debug")
    app(prog_name=sys.argv[0].rsplit("/", 1)[-1])
