"""The text forms every driver of many runs shares: seed lists and ``NAME=VALUE`` recipe options.

``slca-train study``, ``bench/defaults.py`` and ``bench/stored_form.py`` parse them here, once.
"""

from __future__ import annotations

import yaml

from .errors import ConfigError

__all__ = ["parse_seeds", "parse_sets", "parse_extra_seeds"]


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0-4"``, ``"0,2,5-7"`` -> the seeds in order, each once.

    Raises:
      ConfigError: a part that is not an integer or an ascending ``A-B`` range, or no seed at all.
    """
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        a, sep, b = part.partition("-")
        try:
            seeds = range(int(a), int(b) + 1) if sep else [int(a)]
        except ValueError:
            raise ConfigError(f"seeds: {part!r} is not an integer or a range A-B (e.g. 0-4 or 0,2,5)") from None
        if sep and int(b) < int(a):
            raise ConfigError(f"seeds: the range {part!r} runs backwards")
        out += [s for s in seeds if s not in out]
    if not out:
        raise ConfigError(f"seeds: {text!r} names no seed (e.g. 0-4)")
    return tuple(out)


def parse_extra_seeds(text: str) -> dict[float, tuple[int, ...]]:
    """``"0.1:5-9;1.0:5-9"`` -> ``{0.1: (5, ..., 9), 1.0: (5, ..., 9)}`` (more seeds at some fractions).

    Raises:
      ConfigError: a part without ``FRACTION:SEEDS``, or a fraction that is not a number.
    """
    out = {}
    for part in filter(None, (p.strip() for p in str(text).split(";"))):
        fraction, sep, seeds = part.partition(":")
        try:
            key = float(fraction)
        except ValueError:
            key = None
        if not sep or key is None:
            raise ConfigError(f"extra seeds: {part!r} is not FRACTION:SEEDS (e.g. 0.1:5-9)")
        out[key] = parse_seeds(seeds)
    return out


def parse_sets(items) -> dict:
    """``["lr=1e-3", "backbone=resnet50"]`` -> ``{"lr": 0.001, "backbone": "resnet50"}``.

    Names are slca-train's option names (dashes or underscores); values are read as YAML (a
    ``1e-3`` that YAML keeps as text becomes a number when the config checks its float fields).

    Raises:
      ConfigError: an item without ``=`` or without a name.
    """
    out = {}
    for item in items or ():
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set {item!r}: expected NAME=VALUE (e.g. lr=1e-3)")
        out[name.strip().replace("-", "_")] = yaml.safe_load(value)
    return out
