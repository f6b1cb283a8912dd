"""Dataset readers: an image folder, a CSV manifest, or a MedMNIST-style ``.npz``.

Each reader produces a :class:`DatasetManifest`: one :class:`Record` per image, with its id,
integer label, split and source, plus the class names. The manifest is what extraction iterates
over and what the store's ``manifest_sha256`` is computed from.

Layouts accepted by :func:`open_dataset`:

- ``ROOT/<split>/<class>/*.png``: split folders named train, val (or valid, validation) and test;
- ``ROOT/<class>/*.png``: no split folders; a stratified split is drawn with a seed and recorded;
- ``manifest.csv`` (or a folder holding ``labels.csv``/``manifest.csv``): columns ``path,label``
  and optionally ``split``; paths are relative to the CSV's folder;
- ``file.npz``: ``train_images``, ``train_labels`` and likewise ``val_``/``test_`` (MedMNIST);
  labels may be flat or ``(N, 1)``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SamcacheError
from .preprocess import IMAGE_SUFFIXES, read_image

__all__ = ["Record", "DatasetManifest", "DatasetError", "open_dataset", "SPLITS"]

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}
_CSV_NAMES = ("manifest.csv", "labels.csv")


class DatasetError(SamcacheError):
    """A dataset path cannot be read as any supported layout, or its content is inconsistent."""


@dataclass(frozen=True)
class Record:
    """One image. ``source`` is a file path, or ``npz:<split>:<row>`` for arrays."""

    id: str
    label: int
    split: str
    source: str


@dataclass
class DatasetManifest:
    """The images of a dataset, in a fixed order, with labels, splits and class names.

    Arguments:
      root: the path that was opened.
      kind: ``"folder"``, ``"csv"`` or ``"npz"``.
      records: one per image; the store keeps this order.
      class_names: ``class_names[label]`` names each label.
      split_info: how the splits were made (given by the data, or drawn: seed and fractions).
    """

    root: str
    kind: str
    records: list[Record]
    class_names: list[str]
    split_info: dict = field(default_factory=dict)
    _arrays: dict | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    @property
    def splits(self) -> list[str]:
        return [r.split for r in self.records]

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def sha256(self) -> str:
        """Hash of what decides the store's rows: ids, labels, splits, sources, class names."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.class_names).encode())
        for r in self.records:
            digest.update(f"{r.id}\t{r.label}\t{r.split}\t{r.source}\n".encode())
        return digest.hexdigest()

    def read(self, index: int) -> tuple[np.ndarray, tuple[float, float] | None]:
        """Decode image ``index``; returns ``(array, dicom_window)`` as :func:`read_image` does.

        Raises:
          ImageDecodeError: the file is corrupt, truncated or unsupported.
        """
        source = self.records[index].source
        if source.startswith("npz:"):
            if self._arrays is None:
                self._arrays = _load_npz_arrays(Path(self.root))
            _, split, row = source.split(":")
            return self._arrays[split][int(row)], None
        return read_image(source)


def open_dataset(
    path: str | Path, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> DatasetManifest:
    """Read a dataset's layout (not its pixels) into a :class:`DatasetManifest`.

    Arguments:
      path: an image folder, a CSV file, a folder holding ``manifest.csv``/``labels.csv``, or an
        ``.npz`` file.
      seed, val_fraction, test_fraction: used only when the data has no splits of its own, to
        draw a stratified split.

    Raises:
      DatasetError: the path does not exist, holds no images, or is inconsistent (a class with
        too few images to split, a CSV without ``path``/``label`` columns, a missing file).
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    if path.is_file() and path.suffix.lower() == ".npz":
        return _open_npz(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _open_csv(path, seed, val_fraction, test_fraction)
    if path.is_dir():
        for name in _CSV_NAMES:
            if (path / name).is_file():
                return _open_csv(path / name, seed, val_fraction, test_fraction)
        return _open_folder(path, seed, val_fraction, test_fraction)
    raise DatasetError(f"dataset {path}: expected a folder, a .csv or a .npz file")


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _class_index(names: list[str]) -> tuple[list[str], dict[str, int]]:
    """Sort class names (numerically when all are integers) and index them."""
    unique = sorted(set(names), key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))
    return unique, {n: i for i, n in enumerate(unique)}


def stratified_splits(labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    """Assign train/val/test to each label, stratified by class and reproducible from ``seed``.

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


def draw_val_from_train(labels: np.ndarray, splits: list[str], seed: int, val_fraction: float) -> list[str]:
    """Move a stratified, seeded ``val_fraction`` of the whole dataset from train to val.

    For data that comes with train and test splits but no validation split (``Training/`` and
    ``Testing/`` folders are common in public medical sets).
    """
    splits = list(splits)
    train = np.flatnonzero(np.array(splits) == "train")
    if val_fraction <= 0 or len(train) < 2:
        return splits
    share = min(0.5, val_fraction * len(labels) / len(train))
    drawn = stratified_splits(labels[train], seed, 0.0, share)  # its "test" part becomes val
    for i, s in zip(train, drawn):
        if s == "test":
            splits[i] = "val"
    return splits


def _finish(root, kind, entries, seed, val_fraction, test_fraction) -> DatasetManifest:
    """Build a manifest from ``(id, class_name, split_or_None, source)`` entries."""
    if not entries:
        raise DatasetError(f"dataset {root}: no images found")
    class_names, index = _class_index([e[1] for e in entries])
    labels = np.array([index[e[1]] for e in entries])
    given = [e[2] for e in entries]
    if all(s is not None for s in given):
        splits, info = given, {"source": "given"}
        if "val" not in splits and val_fraction > 0:
            splits = draw_val_from_train(labels, splits, seed, val_fraction)
            info = {"source": "given", "val": "drawn from train", "seed": seed, "val_fraction": val_fraction}
    elif any(s is not None for s in given):
        raise DatasetError(f"dataset {root}: some rows have a split and some do not")
    else:
        try:
            splits = stratified_splits(labels, seed, val_fraction, test_fraction)
        except DatasetError as exc:
            raise DatasetError(f"dataset {root}: {exc}") from None
        info = {"source": "stratified", "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    ids = [e[0] for e in entries]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"dataset {root}: image ids are not unique")
    records = [Record(i, int(lab), s, src) for i, lab, s, src in zip(ids, labels, splits, [e[3] for e in entries])]
    return DatasetManifest(str(root), kind, records, class_names, info)


def _open_folder(root: Path, seed, val_fraction, test_fraction) -> DatasetManifest:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in subdirs if p.name.lower() in _SPLIT_ALIASES]
    entries = []
    if split_dirs:
        if len(split_dirs) != len(subdirs):
            others = [p.name for p in subdirs if p not in split_dirs]
            raise DatasetError(f"dataset {root}: mixes split folders with other folders {others}")
        for split_dir in split_dirs:
            split = _SPLIT_ALIASES[split_dir.name.lower()]
            for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                for f in sorted(filter(_is_image, class_dir.iterdir())):
                    entries.append((f.relative_to(root).as_posix(), class_dir.name, split, str(f)))
    else:
        for class_dir in subdirs:
            for f in sorted(filter(_is_image, class_dir.iterdir())):
                entries.append((f.relative_to(root).as_posix(), class_dir.name, None, str(f)))
    return _finish(root, "folder", entries, seed, val_fraction, test_fraction)


def _open_csv(csv_path: Path, seed, val_fraction, test_fraction) -> DatasetManifest:
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "path" not in columns or "label" not in columns:
            raise DatasetError(f"{csv_path}: needs columns 'path' and 'label', found {columns}")
        rows = list(reader)
    entries = []
    for line, row in enumerate(rows, start=2):
        rel = row["path"]
        source = (csv_path.parent / rel).resolve() if not Path(rel).is_absolute() else Path(rel)
        if not source.is_file():
            raise DatasetError(f"{csv_path}, line {line}: image {source} does not exist")
        split = row.get("split") or None
        if split is not None:
            if split.lower() not in _SPLIT_ALIASES:
                raise DatasetError(f"{csv_path}, line {line}: unknown split {split!r}")
            split = _SPLIT_ALIASES[split.lower()]
        entries.append((rel, row["label"].strip(), split, str(source)))
    return _finish(csv_path, "csv", entries, seed, val_fraction, test_fraction)


def _load_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {s: z[f"{s}_images"] for s in SPLITS if f"{s}_images" in z}


def _open_npz(path: Path) -> DatasetManifest:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable .npz file: {exc}") from exc
    with z:
        present = [s for s in SPLITS if f"{s}_images" in z]
        if not present:
            raise DatasetError(f"{path}: expected arrays train_images/train_labels (and val_, test_), found {z.files}")
        entries = []
        for s in present:
            if f"{s}_labels" not in z:
                raise DatasetError(f"{path}: has {s}_images but no {s}_labels")
            images, labels = z[f"{s}_images"], np.asarray(z[f"{s}_labels"])
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1 or len(labels) != len(images):
                raise DatasetError(f"{path}: {s}_labels has shape {labels.shape} for {len(images)} images")
            entries += [(f"{s}/{i:06d}", str(int(lab)), s, f"npz:{s}:{i}") for i, lab in enumerate(labels)]
    return _finish(path, "npz", entries, 0, 0.1, 0.2)
