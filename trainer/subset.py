"""Stratified, seeded subsets of the training split: ``--train-fraction f`` and ``--shots k``."""

from __future__ import annotations

import numpy as np

__all__ = ["stratified_subset"]


def stratified_subset(labels: np.ndarray, fraction: float | None = None, shots: int | None = None,
                      seed: int = 0) -> np.ndarray:
    """Positions of a class-stratified subset of ``labels``, reproducible from ``seed``.

    Arguments:
      labels: class index of each training sample.
      fraction: keep ``round(fraction * n_c)`` of each class ``c`` (at least one).
      shots: keep ``k`` per class (all of a class that has fewer).
      seed: the subset depends only on this, the labels and the size asked for.

    Returns:
      Sorted positions into ``labels``. With neither argument, all positions.

    Raises:
      ValueError: both arguments, a fraction outside (0, 1], or shots < 1.
    """
    labels = np.asarray(labels)
    if fraction is not None and shots is not None:
        raise ValueError("pass either a train fraction or shots per class, not both")
    if fraction is None and shots is None:
        return np.arange(len(labels))
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"train fraction must be in (0, 1], got {fraction}")
    if shots is not None and shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = shots if shots is not None else max(1, int(round(fraction * len(members))))
        # a fixed permutation per class: a smaller subset is a prefix of a larger one (nested)
        keep.append(rng.permutation(members)[: min(k, len(members))])
    return np.sort(np.concatenate(keep))
