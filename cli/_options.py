"""Typer options generated from the config dataclasses (``TrainConfig``, ``ExtractConfig``).

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

from sam_cache.options import Option

__all__ = ["parameters", "train_parameters", "flat_values", "given", "signature_with"]


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


def parameters(opts: list[Option]) -> list[inspect.Parameter]:
    """One keyword parameter per option, with its typer declaration."""
    params = []
    for o in opts:
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
            decl = o.flag or _dash(o.name)
            default = typer.Option(None if o.required else o.default, decl, help=_help(o))
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


def signature_with(fn, extra: list[inspect.Parameter], opts: list[Option]):
    """Give ``fn(**kwargs)`` a signature typer reads: ``extra`` parameters, then one per option."""
    fn.__signature__ = inspect.Signature(extra + parameters(opts))
    fn.__annotations__ = {p.name: p.annotation for p in fn.__signature__.parameters.values()}
    return fn
