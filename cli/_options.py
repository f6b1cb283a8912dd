"""Typer commands and options generated from the config dataclasses (``TrainConfig``, ``ExtractConfig``,
and the option dataclasses of every other command: ``sam_cache/commands.py``, ``trainer/commands.py``).

The config dataclasses are the one definition of every option (type, default, choices, help).
This module turns their option tables into typer parameters (a function signature typer reads)
and turns the parsed values back into flat config values; it holds no option of its own.
"""

from __future__ import annotations

import inspect
import json
import typing
from typing import Optional

import typer

from sam_cache.options import Option, options

__all__ = ["parameters", "train_parameters", "flat_values", "given", "command"]


def _dash(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(o: Option) -> str:
    text = o.help
    if o.choices:
        text += f" One of: {', '.join(map(str, o.choices))}."
    return text


def _kind(o: Option):
    args = typing.get_args(o.type)
    inner = next((a for a in args if a is not type(None)), o.type) if args and type(None) in args else o.type
    return inner, bool(args and type(None) in args)


def train_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per training option."""
    from trainer.config import options

    return parameters(options())


def parameters(opts: list[Option], enforce_required: bool = False) -> list[inspect.Parameter]:
    """One keyword parameter per option, with its typer declaration.

    ``enforce_required``: typer refuses a command line without a required option (otherwise it
    defaults to None, for ``slca-train``, whose ``--config`` may supply it).
    """
    params = []
    for o in opts:
        inner, optional = _kind(o)
        if o.positional:
            annotation = Optional[inner] if optional else inner
            default = typer.Argument(... if o.required else o.default, help=_help(o))
        elif typing.get_origin(inner) is list and typing.get_args(inner) == (str,):  # given once per value
            annotation, default = list[str], typer.Option(list(o.default or []), o.flag or _dash(o.name),
                                                           help=_help(o))
        elif inner is bool:
            decl = o.flag or f"{_dash(o.name)}/--no-{o.name.replace('_', '-')}"
            annotation, default = bool, typer.Option(o.default, *decl.split(" "), help=_help(o))
        elif inner is dict:
            annotation, default = str, typer.Option(json.dumps(o.default), _dash(o.name), help=_help(o) + " (JSON)")
        elif typing.get_origin(inner) is list:
            annotation = Optional[str]
            default = typer.Option(None, _dash(o.name), help=_help(o))
        else:
            annotation = Optional[inner] if (optional or o.required) else inner
            decl = o.flag or _dash(o.name)
            first = (... if enforce_required else None) if o.required else o.default
            default = typer.Option(first, decl, help=_help(o))
        params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def flat_values(values: dict, opts: list[Option] | None = None) -> dict:
    """Parsed typer values -> flat config values (JSON and comma lists decoded).

    Raises:
      ConfigError: text that is not the JSON or the list of integers its option needs.
    """
    from sam_cache.errors import ConfigError

    if opts is None:
        from trainer.config import options

        opts = options()
    out = {}
    for o in opts:
        if o.name not in values:
            continue
        v = values[o.name]
        inner, _ = _kind(o)
        if inner is dict and isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{_dash(o.name)} must be JSON, e.g. '{{\"drop_rate\": 0.1}}': {exc}") from None
        elif typing.get_origin(inner) is list and isinstance(v, str):
            try:
                v = [int(s) for s in v.split(",") if s.strip()]
            except ValueError:
                raise ConfigError(f"{_dash(o.name)} must be integers separated by commas, e.g. 1,2,3; got {v!r}") from None
        out[o.name] = v
    return out


def given(ctx: typer.Context, name: str) -> bool:
    """Whether an option was typed on the command line (so it overrides --config)."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE


def command(app: typer.Typer, name: str, handler, *configs) -> None:
    """Register ``handler(*instances)`` as command ``name`` of ``app``, with one typer parameter
    per option of each config dataclass in ``configs`` (:func:`sam_cache.options.options`; a
    ``(dataclass, options)`` pair gives its options in another order, as :func:`extract_options`
    does).

    The parsed values are decoded (:func:`flat_values`) and each config is built from its own
    options, so a value that its config refuses is a user error (one red line, exit 1). The
    command's help is ``handler``'s docstring.
    """
    from ._common import user_errors

    configs, tables = zip(*[(c[0], c[1]) if isinstance(c, tuple) else (c, options(c)) for c in configs])

    def fn(**values) -> None:
        with user_errors():
            made = []
            for c, opts in zip(configs, tables):
                flat = flat_values(values, opts)  # keyed by flat name; the dataclass takes field names
                made.append(c(**{o.path[0]: flat[o.name] for o in opts if o.name in flat}))
        handler(*made)

    fn.__doc__ = handler.__doc__
    fn.__signature__ = inspect.Signature([p for opts in tables for p in parameters(opts, enforce_required=True)])
    fn.__annotations__ = {p.name: p.annotation for p in fn.__signature__.parameters.values()}
    app.command(name)(fn)
