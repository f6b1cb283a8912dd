"""Drawing train/val/test splits: stratified by class, seeded, groups (patients, files) kept whole."""

from __future__ import annotations

import numpy as np

from .manifest import DatasetError

__all__ = ["stratified_splits", "draw_val_from_train", "refuse_group_leaks"]


def stratified_splits(labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float,
                      groups: np.ndarray | None = None) -> list[str]:
    """Assign train/val/test to each label, stratified by class and reproducible from ``seed``.

    With ``groups`` (one key per image), every group lands whole in one split: scikit-learn's
    ``StratifiedGroupKFold`` draws the test part, then the val part of what remains (the fractions
    are then approximate: one fold of ``round(1 / fraction)``). See :func:`_grouped_draw`.

    scikit-learn's stratified draw, as long as every class is large enough for it. When a class
    is too small (a few images), each class is split on its own instead: one image of each class
    with at least 3 goes to test, one to val (more when the fractions ask for more), the rest to
    train, so that every class is seen in every split.

    Raises:
      DatasetError: fractions out of range, or a class with fewer than 3 images (naming it and
        what to do).
    """
    from sklearn.model_selection import train_test_split

    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError(f"bad split fractions val={val_fraction} test={test_fraction}")
    idx = np.arange(len(labels))
    out = np.empty(len(labels), dtype=object)
    if groups is not None:
        out[:] = "train"
        test = _grouped_draw(labels, groups, seed, test_fraction, "test")
        out[test] = "test"
        if val_fraction > 0:
            rest = np.flatnonzero(~test)
            val = _grouped_draw(labels[rest], groups[rest], seed, val_fraction / (1 - test_fraction), "val")
            out[rest[val]] = "val"
        return out.tolist()
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
        val = np.array([], dtype=int)
        if val_fraction > 0:
            rel = val_fraction / (1 - test_fraction)
            rest, val = train_test_split(rest, test_size=rel, stratify=labels[rest], random_state=seed)
    except ValueError:
        return _small_class_splits(labels, seed, val_fraction, test_fraction)
    out[rest], out[val], out[test] = "train", "val", "test"
    return out.tolist()


def _small_class_splits(labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    """Per-class split for datasets too small for a global stratified draw (see :func:`stratified_splits`)."""
    need = 2 + (val_fraction > 0)
    counts = {int(c): int((labels == c).sum()) for c in np.unique(labels)}
    small = [c for c, n in counts.items() if n < need]
    if small:
        raise DatasetError(
            f"cannot draw a stratified split: class index(es) {small} have fewer than {need} images, so they cannot "
            "appear in train, val and test. Add images, give the splits yourself (split folders, or a split column "
            "in the CSV), or pass --val-fraction 0 to draw no validation split")
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=object)
    for c, n in counts.items():
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, int(round(test_fraction * n)))
        n_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
        while n - n_test - n_val < 1:  # keep one for training
            if n_val > 1 and n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        out[members[:n_test]] = "test"
        out[members[n_test:n_test + n_val]] = "val"
        out[members[n_test + n_val:]] = "train"
    return out.tolist()


def _grouped_draw(labels: np.ndarray, groups: np.ndarray, seed: int, fraction: float, name: str) -> np.ndarray:
    """A boolean mask of about ``fraction`` of the images, whole groups only, stratified by class.

    One fold of ``StratifiedGroupKFold(round(1 / fraction))``, shuffled with ``seed``.

    Raises:
      DatasetError: fewer groups than folds (the split could not hold whole groups).
    """
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, int(round(1 / fraction)))
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise DatasetError(f"cannot draw a {name} split of {fraction:.2f} from {n_groups} group(s): it needs at least "
                           f"{n_splits} groups; give the splits yourself (a split column) or use smaller fractions")
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": expected, harmless
        warnings.simplefilter("ignore", UserWarning)
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        try:
            _, drawn = next(folds.split(np.zeros(len(labels)), labels, groups))
        except ValueError as exc:  # every class smaller than the fold count
            raise DatasetError(f"cannot draw a {name} split of {fraction:.2f} in whole groups: {exc}; give the "
                               "splits yourself (a split column or split folders) or use smaller fractions") from None
    mask = np.zeros(len(labels), dtype=bool)
    mask[drawn] = True
    return mask


def draw_val_from_train(labels: np.ndarray, splits: list[str], seed: int, val_fraction: float,
                        groups: np.ndarray | None = None) -> list[str]:
    """Move a stratified, seeded ``val_fraction`` of the whole dataset from train to val.

    For data that comes with train and test splits but no validation split (``Training/`` and
    ``Testing/`` folders are common in public medical sets). With ``groups``, whole groups move.
    """
    splits = list(splits)
    train = np.flatnonzero(np.array(splits) == "train")
    if val_fraction <= 0 or len(train) < 2:
        return splits
    share = min(0.5, val_fraction * len(labels) / len(train))
    if groups is not None:
        for i in train[_grouped_draw(labels[train], groups[train], seed, share, "val")]:
            splits[i] = "val"
        return splits
    drawn = stratified_splits(labels[train], seed, 0.0, share)  # its "test" part becomes val
    for i, s in zip(train, drawn):
        if s == "test":
            splits[i] = "val"
    return splits


def refuse_group_leaks(root, groups: np.ndarray, splits: list[str], ids: list[str], column: str) -> None:
    """A group (a patient) whose images sit in two splits would leak between them."""
    seen: dict = {}
    for g, s, i in zip(groups.tolist(), splits, ids):
        first = seen.setdefault(g, (s, i))
        if first[0] != s:
            raise DatasetError(f"dataset {root}: {column} {g!r} is in two splits ({first[1]!r} in {first[0]}, {i!r} in "
                               f"{s}); the images of one {column} must share a split, or the test split leaks")
