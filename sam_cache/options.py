"""Config dataclasses with one definition per option: type, default, choices, bounds, help.

The toolkit behind :class:`sam_cache.ExtractConfig` and :class:`trainer.TrainConfig`. A config
field made with :func:`opt` carries what validation, the command line and sweeps need; a nested
config dataclass is flattened, each leaf under one *flat name*. ``cli/_options.py`` turns
:func:`options` into typer options, so no option is declared twice.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field

from .errors import ConfigError

__all__ = ["opt", "Option", "options", "validate_fields", "Checked", "DEVICE_HELP", "THREADS_HELP"]

#: the help of every --device option (extract, masks, train, sweep, eval, predict, study)
DEVICE_HELP = "cuda, cpu, ...; default: cuda when available."
# --threads, every command's start; each adds what a fixed count repeats for it
THREADS_HELP = "CPU threads torch uses (0: its default, one per core); a fixed count repeats "


def opt(default=dataclasses.MISSING, *, help: str, choices: tuple | None = None, low=None, high=None,
        sweep: bool = False, flat: str | None = None, factory=None, flag: str | None = None,
        positional: bool = False):
    """A config field with what the CLI, sweeps and validation need to know about it.

    ``low``/``high`` bound numbers (inclusive); ``flat`` renames the leaf's flat name; ``flag`` is
    the typer declaration of the option (e.g. ``"--slca/--no-slca"``, or ``"--workers"`` for a
    field whose Python name differs from its flag); ``positional`` makes it a command's argument
    (``samcache info STORE``) instead of an option. A ``list[str]`` field is an option given
    once per value (``--set A=1 --set B=2``).
    """
    meta = {"help": help, "choices": choices, "low": low, "high": high, "sweep": sweep, "flat": flat, "flag": flag,
            "positional": positional}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Option:
    """One leaf option: its flat name, where it lives, and what it accepts."""

    name: str
    path: tuple[str, ...]
    type: object
    default: object
    help: str
    choices: tuple | None
    low: object
    high: object
    sweep: bool
    flag: str | None
    required: bool
    positional: bool = False

    def get(self, cfg):
        for p in self.path:
            cfg = getattr(cfg, p)
        return cfg


def options(cls, prefix: tuple[str, ...] = ()) -> list[Option]:
    """Every leaf option of ``cls`` (nested configs flattened), in declaration order.

    Fields without help (``embed_dim``, ``crop_ratio``) are fixed design constants, not options.
    """
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += options(tp, prefix + (f.name,))
            continue
        if "help" not in f.metadata:
            continue
        m = f.metadata
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            None if required else f.default_factory())
        out.append(Option(m["flat"] or f.name, prefix + (f.name,), tp, default, m["help"], m["choices"], m["low"],
                          m["high"], m["sweep"], m["flag"], required, m.get("positional", False)))
    return out


def validate_fields(obj) -> None:
    """Check and normalize every option field of a config dataclass in place."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if "help" not in f.metadata:
            continue
        m = f.metadata
        name = m["flat"] or f.name
        value = _coerce(name, getattr(obj, f.name), hints[f.name])
        if value is not None and m["choices"] is not None and value not in m["choices"]:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, m['choices']))}; got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if m["low"] is not None and value < m["low"]:
                raise ConfigError(f"{name} must be at least {m['low']}; got {value!r}")
            if m["high"] is not None and value > m["high"]:
                raise ConfigError(f"{name} must be at most {m['high']}; got {value!r}")
        setattr(obj, f.name, value)


_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class Checked:
    """A base for an options dataclass with nothing to check beyond its fields: built, it runs
    :func:`validate_fields` (raises ConfigError for a value that its field refuses)."""

    def __post_init__(self) -> None:
        validate_fields(self)


def _coerce(name: str, value, tp):
    """``value`` as type ``tp`` (only lossless conversions), or :class:`ConfigError`."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name} must be an integer; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as text; what was meant is a number
        raise ConfigError(f"{name} must be a number; got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be text; got {value!r}")
    if origin is list and typing.get_args(tp) == (str,):
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{name} must be a list of texts; got {value!r}")
    if origin is list:
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [int(v) for v in value]
        raise ConfigError(f"{name} must be a list of integers; got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{name} must be a mapping; got {value!r}")
    return value
