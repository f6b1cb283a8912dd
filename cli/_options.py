"""``slca-train``'s training options, generated from :func:`trainer.config.options`.

The config dataclasses are the one definition of every option (type, default, choices, help).
This module turns them into typer parameters (a function signature typer reads) and turns the
parsed values back into flat config values; it holds no option of its own.
"""

from __future__ import annotations

import inspect
import json
import typing
from typing import Optional

import typer

from trainer.config import Option, options

__all__ = ["train_parameters", "flat_values", "given"]


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
    """One keyword parameter per training option, with its typer declaration."""
    params = []
    for o in options():
        inner, optional = _kind(o)
        if inner is bool:
            decl = o.flag or f"{_dash(o.name)}/--no-{o.name.replace('_', '-')}"
            annotation, default = bool, typer.Option(o.default, *decl.split(" "), help=_help(o))
        elif inner is dict:
            annotation, default = str, typer.Option(json.dumps(o.default), _dash(o.name), help=_help(o) + " (JSON)")
        elif typing.get_origin(inner) is list:
            annotation = Optional[str]
            default = typer.Option(None, _dash(o.name), help=_help(o))
        else:
            annotation = Optional[inner] if (optional or o.required) else inner
            default = typer.Option(None if o.required else o.default, _dash(o.name), help=_help(o))
        params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def flat_values(values: dict) -> dict:
    """Parsed typer values -> flat config values (JSON and comma lists decoded).

    Raises:
      ConfigError: text that is not the JSON or the list of integers its option needs.
    """
    from sam_cache.errors import ConfigError

    out = {}
    for o in options():
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
