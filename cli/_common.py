"""What both command-line apps share: the console and turning known errors into clean exits."""

from __future__ import annotations

import contextlib
import sys
import warnings

import typer
from rich.console import Console

console = Console(soft_wrap=True)  # log lines stay whole in files and pipes
err_console = Console(stderr=True, soft_wrap=True)

# timm still imports its own deprecated aliases; users should not see that on every run.
warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]):
    """Print an expected error as one red message and exit 1, instead of a traceback."""
    try:
        yield
    except kinds as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None


def run(app: typer.Typer) -> None:
    app(prog_name=sys.argv[0].rsplit("/", 1)[-1])
