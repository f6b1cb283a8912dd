"""Which store rows a run uses: the splits (checked), and stratified, seeded subsets of train.

``--train-fraction f`` and ``--shots k`` draw a class-stratified subset of the train split;
validation and test stay whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sam_cache.store import EmbeddingStore, StoreError

from .errors import TrainError

__all__ = ["stratified_subset", "split_rows", "RunRows"]


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

    Asking for more shots than a class has keeps the whole class; :func:`split_rows` says so.
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


@dataclass
class RunRows:
    """Store rows of a run: the (subset of the) train split, and the whole val and test splits."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def all(self) -> np.ndarray:
        return np.concatenate([self.train, self.val, self.test])


def split_rows(store: EmbeddingStore, train_fraction: float | None = None, shots: int | None = None,
               subset_seed: int = 0, allow_partial: bool = False, log=print) -> RunRows:
    """Check a store's labels and splits, and draw the run's train subset.

    Arguments:
      store: an open store.
      train_fraction, shots, subset_seed: the train subset (see :func:`stratified_subset`).
      allow_partial: accept a store whose extraction has not finished (its done rows only).
      log: where warnings and the sample count go.

    Returns:
      A :class:`RunRows`.

    Raises:
      TrainError: fewer than 2 classes; labels outside the classes; an incomplete store without
        ``allow_partial``; a split without done samples; a class absent from the train subset.
    """
    names = store.class_names
    k = len(names)
    if k < 2:
        raise TrainError(f"store {store.path} has {k} class; classification needs at least 2")
    bad = np.flatnonzero((store.labels < 0) | (store.labels >= k))
    if len(bad):
        raise TrainError(f"store {store.path}: labels of samples {bad[:5].tolist()} are outside 0..{k - 1}")
    n = len(store)
    try:
        done = store.require_complete(allow_partial)
    except StoreError as exc:
        raise TrainError(str(exc)) from None
    rows = {}
    for split in ("train", "val", "test"):
        r = store.split_indices(split)
        if not len(r):
            have = "no such split" if not (store.splits == split).any() else "no done samples"
            raise TrainError(f"store {store.path} has {have} in split {split!r}; training needs train, val and test")
        rows[split] = r
    labels = store.labels
    keep = stratified_subset(labels[rows["train"]], train_fraction, shots, subset_seed)
    rows["train"] = rows["train"][keep]
    if shots is not None:
        short = [f"{names[c]} ({int((labels[rows['train']] == c).sum())})" for c in range(k)
                 if (labels[rows["train"]] == c).sum() < shots]
        if short:
            log(f"warning: fewer than {shots} train samples in {', '.join(short)}; all of them are used")
    absent = [names[c] for c in range(k) if not (labels[rows["train"]] == c).any()]
    if absent:
        raise TrainError(f"store {store.path}: no train sample of class {', '.join(absent)}; a classifier cannot learn "
                         "a class it never sees")
    for split in ("val", "test"):
        missing = [names[c] for c in range(k) if not (labels[rows[split]] == c).any()]
        if missing:
            log(f"warning: no {split} sample of class {', '.join(missing)}: {split} metrics cover the other classes "
                "only, and AUC is undefined")
    if done < n:
        log(f"warning: training on {done} of {n} samples (--allow-partial)")
    return RunRows(rows["train"], rows["val"], rows["test"])
