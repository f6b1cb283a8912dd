"""The statistics of a paired study: mean and spread over seeds, the paired difference with its
t-interval, and the words a table prints for it."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["mean_std", "paired_difference", "verdict"]


def mean_std(values: list) -> tuple[float, float]:
    """Mean and sample std (ddof 1; 0 for one value) of the values that are set; NaNs when none are."""
    v = np.array([x for x in values if x is not None and x != ""], dtype=float)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def paired_difference(a: list[float], b: list[float], level: float = 0.95) -> dict:
    """Per-seed differences ``a - b``: their mean, std and a ``level`` t-interval of the mean.

    Returns:
      ``{"n", "mean", "std", "low", "high"}``; the interval is NaN for fewer than 2 pairs.
    """
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "low": float("nan"), "high": float("nan")}
    mean = float(d.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": 0.0, "low": float("nan"), "high": float("nan")}
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "std": sd, "low": mean - half, "high": mean + half}


def verdict(diff: dict, margin: float = 0.05) -> str:
    """Words for a paired difference: an effect, no effect within ``margin``, or not resolved."""
    if diff["n"] < 2 or not np.isfinite(diff["low"]):
        return "n/a"
    if diff["low"] > 0:
        return "better"
    if diff["high"] < 0:
        return "worse"
    if diff["low"] > -margin and diff["high"] < margin:
        return f"no effect (within ±{margin:g})"
    return "not resolved"
