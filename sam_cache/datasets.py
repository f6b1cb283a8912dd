"""Dataset readers: an image folder, a CSV manifest, or a MedMNIST-style ``.npz``.

Each reader produces a :class:`DatasetManifest`: one :class:`Record` per image, with its id,
integer label, split and source, plus the class names. The manifest is what extraction iterates
over and what the store's ``manifest_sha256`` is computed from.

Layouts accepted by :func:`open_dataset`:

- ``ROOT/<split>/<class>/*.png``: split folders named train, val (valid, validation) and test
  (training, testing); a dataset with train and test folders but no val gets a stratified,
  seeded val drawn from train, recorded in the store;
- ``ROOT/<class>/*.png``: no split folders; a stratified split is drawn with a seed and recorded;
- ``ROOT/*.png`` with ``require_labels=False`` (prediction): unlabelled images, label -1;
- a CSV (or a folder holding ``labels.csv``/``manifest.csv``) with a path and a label column
  (``path``/``label`` by default; :class:`DatasetOptions` renames them) and optionally a split
  column; paths are relative to the CSV's folder;
- ``file.npz``: ``train_images``, ``train_labels`` and likewise ``val_``/``test_`` (MedMNIST);
  labels flat or ``(N, 1)``; an optional ``class_names`` array names them. Multi-label arrays
  (ChestMNIST's ``(N, 14)``) are refused: samcache trains single-label classifiers.

Files: PNG, JPEG, BMP, TIFF, DICOM (one sample per frame of a multi-frame file, ids
``path#f0003``) and NIfTI (``.nii``/``.nii.gz``, ``pip install 'samcache[nifti]'``: one sample per
2-D slice along ``nifti_axis`` of the volume reoriented to RAS (``nibabel.as_closest_canonical``),
ids ``path#z0042``; ``nifti_slices`` keeps ``all`` slices, the ``middle`` one, or ``every:N``th;
each slice is windowed like any deep image, by ``--window``). The samples of one file (slices,
frames) always share a split: a drawn split keeps each file whole, and given splits are checked.

Labels must name one class each. Numeric labels are read as numbers (``1`` and ``1.0`` are one
class); a column that mixes numbers and words, an empty cell, a short row, the same image twice
(paths are resolved before comparing), float or text labels in an npz: each is refused with the
file, the line and the problem.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SamcacheError
from .preprocess import IMAGE_SUFFIXES, dicom_frames, read_image
from .store.schema import SPLITS, RowSchema

__all__ = ["Record", "DatasetManifest", "DatasetError", "DatasetOptions", "open_dataset", "SPLITS"]

_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}
_CSV_NAMES = ("manifest.csv", "labels.csv")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class DatasetError(SamcacheError):
    """A dataset path cannot be read as any supported layout, or its content is inconsistent."""


@dataclass(frozen=True)
class DatasetOptions:
    """How to read a dataset beyond its layout.

    Arguments:
      path_column, label_column, split_column: the CSV's column names.
      require_labels: False accepts unlabelled images (a plain folder, or a CSV without the label
        column), with label -1 and no classes: what ``slca-train predict`` reads.
      nifti_axis: the axis of a NIfTI volume that slices are taken across (2: axial for RAS data).
      nifti_slices: ``all``, ``middle`` or ``every:N``.
      single_split: put every image in this split and draw none (prediction reads ``test``).
      group_column: a CSV column naming each image's group (a patient, a study): the images of
        one group always share a split. Drawn splits keep groups whole; a split column that puts
        one group in two splits is refused as a leak. None: every image is its own group.
    """

    path_column: str = "path"
    label_column: str = "label"
    split_column: str = "split"
    group_column: str | None = None
    require_labels: bool = True
    nifti_axis: int = 2
    nifti_slices: str = "all"
    single_split: str | None = None

    def __post_init__(self) -> None:
        ok = self.nifti_slices in ("all", "middle") or (
            self.nifti_slices.startswith("every:") and self.nifti_slices[6:].isdigit() and int(self.nifti_slices[6:]) > 0)
        if not ok:
            raise DatasetError(f"nifti_slices must be all, middle or every:N; got {self.nifti_slices!r}")


@dataclass(frozen=True)
class Record:
    """One image. ``source`` is a file path; or ``npz:<split>:<row>``, ``dicom:<frame>:<path>`` or
    ``nifti:<axis>:<slice>:<path>`` for one array of a larger file."""

    id: str
    label: int
    split: str
    source: str

    @property
    def file(self) -> str | None:
        """The file this record is read from (None for an npz row)."""
        if self.source.startswith("npz:"):
            return None
        if self.source.startswith(("dicom:", "nifti:")):
            return self.source.split(":", 3 if self.source.startswith("nifti:") else 2)[-1]
        return self.source


@dataclass
class DatasetManifest:
    """The images of a dataset, in a fixed order, with labels, splits and class names.

    Arguments:
      root: the path that was opened.
      kind: ``"folder"``, ``"csv"`` or ``"npz"``.
      records: one per image; the store keeps this order.
      class_names: ``class_names[label]`` names each label (empty for unlabelled data).
      split_info: how the splits were made (given by the data, or drawn: seed and fractions).
    """

    root: str
    kind: str
    records: list[Record]
    class_names: list[str]
    split_info: dict = field(default_factory=dict)
    _arrays: dict | None = field(default=None, repr=False)
    _volume: tuple | None = field(default=None, repr=False)

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

    def row_schema(self) -> RowSchema:
        """The rows a store of this dataset holds, in order (what :meth:`EmbeddingStore.create` takes)."""
        return RowSchema(ids=self.ids, labels=self.labels, splits=self.splits, class_names=list(self.class_names),
                         manifest_sha256=self.sha256(), split_info=self.split_info,
                         dataset={"root": self.root, "kind": self.kind})

    def sha256(self) -> str:
        """Hash of what decides the store's rows: ids, labels, splits, sources, class names.

        Sources enter as resolved paths relative to the dataset's folder, so the same dataset
        named ``/abs/data``, ``data`` or ``./data`` (or from another working directory) hashes
        the same, and a resumed extraction is not refused for the spelling.
        """
        base = os.path.realpath(self.root if os.path.isdir(self.root) else os.path.dirname(os.path.abspath(self.root)))

        def key(r: Record) -> str:
            f = r.file
            if f is None:
                return r.source
            rel = os.path.relpath(os.path.realpath(f), base)
            return r.source[: len(r.source) - len(f)] + rel

        return self._digest(key)

    def legacy_sha256(self) -> str:
        """The hash as samcache 0.2.0 made it (sources as spelled): stores made by it still resume."""
        return self._digest(lambda r: r.source)

    def _digest(self, source) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps(self.class_names).encode())
        for r in self.records:
            # NIfTI slices are cut from the canonical (RAS) volume since 0.3: a store of the old cut is not resumed
            how = "\tcanonical" if r.source.startswith("nifti:") else ""
            digest.update(f"{r.id}\t{r.label}\t{r.split}\t{source(r)}{how}\n".encode())
        return digest.hexdigest()

    def read(self, index: int, window: str = "auto") -> tuple[np.ndarray, tuple[float, float] | None]:
        """Decode image ``index``; returns ``(array, dicom_window)`` as :func:`read_image` does.

        Raises:
          ImageDecodeError: the file is corrupt, truncated, too large or unsupported.
        """
        source = self.records[index].source
        if source.startswith("npz:"):
            if self._arrays is None:
                self._arrays = _load_npz_arrays(Path(self.root))
            _, split, row = source.split(":")
            return self._arrays[split][int(row)], None
        if source.startswith("dicom:"):
            _, frame, path = source.split(":", 2)
            return read_image(path, window, int(frame))
        if source.startswith("nifti:"):
            _, axis, k, path = source.split(":", 3)
            return np.take(self._nifti(path), int(k), axis=int(axis)).astype(np.float32), None
        return read_image(source, window)

    def _nifti(self, path: str) -> np.ndarray:
        """The volume of ``path`` (the last one read is kept: slices of one volume come in a row)."""
        if self._volume is None or self._volume[0] != path:
            from .preprocess import ImageDecodeError

            try:
                import nibabel
            except ImportError:  # pragma: no cover - depends on the optional extra
                raise ImageDecodeError("reading NIfTI needs nibabel: pip install 'samcache[nifti]'") from None
            try:
                self._volume = (path, np.asarray(canonical_volume(nibabel, path).dataobj))
            except Exception as exc:  # nibabel raises many kinds for bad files
                raise ImageDecodeError(f"not a readable NIfTI volume: {exc}") from exc
        return self._volume[1]


def open_dataset(path: str | Path, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 options: DatasetOptions | None = None) -> DatasetManifest:
    """Read a dataset's layout (not its pixels) into a :class:`DatasetManifest`.

    Arguments:
      path: an image folder, a CSV file, a folder holding ``manifest.csv``/``labels.csv``, or an
        ``.npz`` file.
      seed, val_fraction, test_fraction: used only when the data has no splits of its own (or
        no val split), to draw a stratified split.
      options: column names, unlabelled data, NIfTI slicing (:class:`DatasetOptions`).

    Raises:
      DatasetError: the path does not exist, holds no images, or is inconsistent (see the module
        docstring); the message names the file and, for a CSV, the line.
    """
    options = options or DatasetOptions()
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    if path.is_file() and path.suffix.lower() == ".npz":
        if options.group_column:
            raise DatasetError(f"{path}: --group-column needs a CSV dataset; an npz has no group column")
        return _open_npz(path, options)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _open_csv(path, seed, val_fraction, test_fraction, options)
    if path.is_dir():
        for name in _CSV_NAMES:
            if (path / name).is_file():
                return _open_csv(path / name, seed, val_fraction, test_fraction, options)
        if options.group_column:
            raise DatasetError(f"dataset {path}: --group-column needs a CSV dataset (a folder has no group column)")
        return _open_folder(path, seed, val_fraction, test_fraction, options)
    raise DatasetError(f"dataset {path}: expected a folder, a .csv or a .npz file")


def _is_image(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and not p.name.startswith(".") and (
        p.suffix.lower() in IMAGE_SUFFIXES or name.endswith(NIFTI_SUFFIXES))


def _expand(rel: str, source: Path, options: DatasetOptions) -> list[tuple[str, str]]:
    """``(id, source)`` of every sample in one file: one for an image, one per DICOM frame or NIfTI slice."""
    name = source.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        try:
            import nibabel

            shape = canonical_volume(nibabel, str(source)).shape
        except ImportError:
            raise DatasetError(f"{source}: reading NIfTI needs nibabel: pip install 'samcache[nifti]'") from None
        except Exception as exc:  # nibabel raises many kinds for bad files
            raise DatasetError(f"{source}: not a readable NIfTI volume: {exc}") from None
        if len(shape) != 3:
            raise DatasetError(f"{source}: a NIfTI volume of shape {shape}; samcache slices 3-D volumes")
        axis = options.nifti_axis
        if not 0 <= axis < 3:
            raise DatasetError(f"nifti_axis must be 0, 1 or 2; got {axis}")
        n = shape[axis]
        if options.nifti_slices == "middle":
            ks = [n // 2]
        elif options.nifti_slices.startswith("every:"):
            ks = list(range(0, n, int(options.nifti_slices[6:])))
        else:
            ks = list(range(n))
        return [(f"{rel}#z{k:04d}", f"nifti:{axis}:{k}:{source}") for k in ks]
    if name.endswith(".dcm"):
        frames = dicom_frames(source)
        if frames > 1:
            return [(f"{rel}#f{k:04d}", f"dicom:{k}:{source}") for k in range(frames)]
    return [(rel, str(source))]


def canonical_volume(nibabel, path: str):
    """A NIfTI image reoriented to the closest canonical orientation (RAS+: axis 0 runs to the
    right, 1 to the front, 2 up), as ``nibabel.as_closest_canonical`` does; the same slicing
    axis then means the same anatomy in every volume (2: axial)."""
    return nibabel.as_closest_canonical(nibabel.load(path))


def _file_groups(entries) -> list[str] | None:
    """One group per file when some file gives many samples (NIfTI slices, DICOM frames): its
    samples must share a split. None when every file is one sample (or an npz's row)."""
    files = [Record(e[0], 0, "", e[3]).file if e[3].startswith(("nifti:", "dicom:")) else e[0] for e in entries]
    if len(set(files)) == len(files):
        return None
    return files


def _class_index(names: list[str]) -> tuple[list[str], dict[str, int]]:
    """Sort class names (numerically when all are integers) and index them."""
    unique = sorted(set(names), key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))
    return unique, {n: i for i, n in enumerate(unique)}


def _canonical_labels(labels: list[str], where: str) -> list[str]:
    """Numbers as one spelling each (``1``, ``1.0`` -> ``1``); refuse numbers mixed with words."""
    def number(text: str):
        try:
            return float(text)
        except ValueError:
            return None

    values = [number(t) for t in labels]
    if all(v is not None for v in values):
        return [str(int(v)) if v.is_integer() else repr(v) for v in values]
    numeric = sorted({t for t, v in zip(labels, values) if v is not None})
    if numeric:
        words = sorted({t for t, v in zip(labels, values) if v is None})
        raise DatasetError(f"{where}: labels mix numbers ({', '.join(numeric[:3])}) and words ({', '.join(words[:3])}); "
                           "write each class the same way")
    return labels


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


def _refuse_group_leaks(root, groups: np.ndarray, splits: list[str], ids: list[str], column: str) -> None:
    """A group (a patient) whose images sit in two splits would leak between them."""
    seen: dict = {}
    for g, s, i in zip(groups.tolist(), splits, ids):
        first = seen.setdefault(g, (s, i))
        if first[0] != s:
            raise DatasetError(f"dataset {root}: {column} {g!r} is in two splits ({first[1]!r} in {first[0]}, {i!r} in "
                               f"{s}); the images of one {column} must share a split, or the test split leaks")


def _finish(root, kind, entries, seed, val_fraction, test_fraction, options: DatasetOptions,
            groups: list[str] | None = None) -> DatasetManifest:
    """Build a manifest from ``(id, class_name or None, split_or_None, source)`` entries.

    ``groups``, one key per entry, keeps each group in one split (:class:`DatasetOptions`)."""
    if not entries:
        raise DatasetError(f"dataset {root}: no images found")
    labelled = [e[1] is not None for e in entries]
    if not any(labelled):
        if options.require_labels:
            raise DatasetError(f"dataset {root}: its images have no labels (put them in class folders, or give a "
                               "label column)")
        records = [Record(e[0], -1, options.single_split or e[2] or "test", e[3]) for e in entries]
        _refuse_duplicates(root, records)
        return DatasetManifest(str(root), kind, records, [], {"source": "unlabelled"})
    if not all(labelled):
        raise DatasetError(f"dataset {root}: some images have a label and some do not")
    _refuse_duplicates(root, [Record(e[0], 0, "", e[3]) for e in entries])
    class_names, index = _class_index([e[1] for e in entries])
    labels = np.array([index[e[1]] for e in entries])
    given = [e[2] for e in entries]
    by_file = groups is None and _file_groups(entries) is not None
    if by_file:  # slices of one volume, frames of one file: one group, so never in two splits
        groups = _file_groups(entries)
    keys = np.array(groups) if groups is not None else None
    if options.single_split is not None:
        splits, info = [options.single_split] * len(entries), {"source": options.single_split}
    elif all(s is not None for s in given):
        if keys is not None:
            _refuse_group_leaks(root, keys, given, [e[0] for e in entries], options.group_column or "file")
        splits, info = given, {"source": "given"}
        if "val" not in splits and "test" in splits and val_fraction > 0:
            try:
                splits = draw_val_from_train(labels, splits, seed, val_fraction, keys)
            except DatasetError as exc:
                raise DatasetError(f"dataset {root}: {exc}") from None
            info = {"source": "given", "val": "drawn from train", "seed": seed, "val_fraction": val_fraction}
    elif any(s is not None for s in given):
        raise DatasetError(f"dataset {root}: some rows have a split and some do not")
    else:
        try:
            splits = stratified_splits(labels, seed, val_fraction, test_fraction, keys)
        except DatasetError as exc:
            raise DatasetError(f"dataset {root}: {exc}") from None
        info = {"source": "stratified", "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    if by_file:
        info["groups"] = "file (the slices or frames of one file share a split)"
    elif keys is not None:
        info["group_column"] = options.group_column
    if any(e[3].startswith("nifti:") for e in entries):
        info["nifti_orientation"] = "RAS (nibabel.as_closest_canonical)"
    records = [Record(e[0], int(lab), s, e[3]) for e, lab, s in zip(entries, labels, splits)]
    return DatasetManifest(str(root), kind, records, class_names, info)


def _refuse_duplicates(root, records: list[Record]) -> None:
    """The same image twice (ids, or resolved files of single-sample records) would leak across splits."""
    ids, files = {}, {}
    for r in records:
        if r.id in ids:
            raise DatasetError(f"dataset {root}: image id {r.id!r} appears twice")
        ids[r.id] = r
        if r.file is not None and r.source == r.file:
            real = os.path.realpath(r.file)
            if real in files:
                raise DatasetError(f"dataset {root}: {files[real].id!r} and {r.id!r} are the same file ({real}); "
                                   "an image listed twice can land in two splits")
            files[real] = r


def _open_folder(root: Path, seed, val_fraction, test_fraction, options: DatasetOptions) -> DatasetManifest:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(filter(_is_image, root.iterdir()))
    split_dirs = [p for p in subdirs if p.name.lower() in _SPLIT_ALIASES]
    entries = []
    if loose and subdirs:
        raise DatasetError(f"dataset {root}: holds both images and folders; put images in class folders")
    if loose:  # unlabelled images (allowed for prediction only)
        for f in loose:
            entries += [(i, None, None, src) for i, src in _expand(f.name, f, options)]
    elif split_dirs:
        if len(split_dirs) != len(subdirs):
            others = [p.name for p in subdirs if p not in split_dirs]
            raise DatasetError(f"dataset {root}: mixes split folders with other folders {others}")
        empty = []
        for split_dir in split_dirs:
            split = _SPLIT_ALIASES[split_dir.name.lower()]
            for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                found = _class_files(root, class_dir, options)
                entries += [(i, class_dir.name, split, src) for i, src in found]
                empty += [] if found else [class_dir]
        _refuse_empty_classes(root, empty, entries)
    else:
        empty = []
        for class_dir in subdirs:
            found = _class_files(root, class_dir, options)
            entries += [(i, class_dir.name, None, src) for i, src in found]
            empty += [] if found else [class_dir]
        _refuse_empty_classes(root, empty, entries)
    return _finish(root, "folder", entries, seed, val_fraction, test_fraction, options)


def _class_files(root: Path, class_dir: Path, options: DatasetOptions) -> list[tuple[str, str]]:
    """``(id, source)`` of every sample in a class folder."""
    found = []
    for f in sorted(filter(_is_image, class_dir.iterdir())):
        found += _expand(f.relative_to(root).as_posix(), f, options)
    return found


def _refuse_empty_classes(root: Path, empty: list[Path], entries: list) -> None:
    """A class folder with no readable image, beside ones with images, is refused: it would vanish
    from the classes, and the labels would change meaning without a word."""
    if not empty or not entries:
        return  # no images at all: "no images found" says it
    d = empty[0]
    others = sorted({p.suffix.lower() or p.name for p in d.iterdir() if not p.name.startswith(".")})
    what = f"only {', '.join(others[:5])} files" if others else "nothing"
    raise DatasetError(f"dataset {root}: class folder {d.relative_to(root).as_posix()} holds no image that samcache "
                       f"reads ({what}); add images, or remove the folder")


def _open_csv(csv_path: Path, seed, val_fraction, test_fraction, options: DatasetOptions) -> DatasetManifest:
    pc, lc, sc = options.path_column, options.label_column, options.split_column
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is not part of the first name
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DatasetError(f"{csv_path}: not a readable CSV: {exc}") from None
    gc = options.group_column
    need = [pc] + ([lc] if options.require_labels else []) + ([gc] if gc else [])
    missing = [c for c in need if c not in columns]
    if missing:
        raise DatasetError(f"{csv_path}: needs the column(s) {', '.join(repr(c) for c in missing)}, found {columns} "
                           "(rename them with --path-column / --label-column / --group-column)")
    has_labels = lc in columns
    entries, raw_labels, groups = [], [], []
    for line, row in enumerate(rows, start=2):
        if None in row.values() or None in row:
            raise DatasetError(f"{csv_path}, line {line}: the row has {len([v for v in row.values() if v is not None])} "
                               f"cells where the header has {len(columns)}")
        rel = (row[pc] or "").strip()
        if not rel:
            raise DatasetError(f"{csv_path}, line {line}: the {pc!r} cell is empty")
        label = (row[lc] or "").strip() if has_labels else None
        if has_labels and not label:
            raise DatasetError(f"{csv_path}, line {line}: the {lc!r} cell is empty")
        source = Path(rel) if Path(rel).is_absolute() else (csv_path.parent / rel).resolve()
        if not source.is_file():
            raise DatasetError(f"{csv_path}, line {line}: image {source} does not exist")
        split = (row.get(sc) or "").strip() or None
        if split is not None:
            if split.lower() not in _SPLIT_ALIASES:
                raise DatasetError(f"{csv_path}, line {line}: unknown split {split!r}")
            split = _SPLIT_ALIASES[split.lower()]
        group = (row[gc] or "").strip() if gc else None
        if gc and not group:
            raise DatasetError(f"{csv_path}, line {line}: the {gc!r} cell is empty")
        rel_id = Path(os.path.normpath(rel)).as_posix()
        for i, src in _expand(rel_id, source, options):
            entries.append([i, label, split, src])
            raw_labels.append(label)
            groups.append(group)
    if has_labels:
        for e, lab in zip(entries, _canonical_labels(raw_labels, str(csv_path))):
            e[1] = lab
    return _finish(csv_path, "csv", [tuple(e) for e in entries], seed, val_fraction, test_fraction, options,
                   groups if gc else None)


def _load_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        try:
            return {s: z[f"{s}_images"] for s in SPLITS if f"{s}_images" in z}
        except ValueError:
            raise DatasetError(f"{path}: its image arrays hold Python objects; save them as numeric arrays") from None


def _open_npz(path: Path, options: DatasetOptions) -> DatasetManifest:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable .npz file: {exc}") from exc
    with z:
        present = [s for s in SPLITS if f"{s}_images" in z]
        if not present:
            raise DatasetError(f"{path}: expected arrays train_images/train_labels (and val_, test_), found {z.files}")
        names = None
        if "class_names" in z.files:
            try:
                names = [str(n) for n in z["class_names"].tolist()]
            except ValueError:
                raise DatasetError(f"{path}: class_names must be an array of strings (saved without pickle)") from None
        entries = []
        for s in present:
            if f"{s}_labels" not in z:
                raise DatasetError(f"{path}: has {s}_images but no {s}_labels")
            try:
                labels = np.asarray(z[f"{s}_labels"])
            except ValueError:
                raise DatasetError(f"{path}: {s}_labels holds Python objects; labels must be an integer array") from None
            try:
                images = z[f"{s}_images"]
            except ValueError:
                raise DatasetError(f"{path}: {s}_images holds Python objects; images must be a numeric array") from None
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim == 2:
                raise DatasetError(f"{path}: {s}_labels has shape {labels.shape}: multi-label data (several labels per "
                                   "image, as in ChestMNIST) is not supported; samcache trains single-label classifiers")
            if labels.ndim != 1 or len(labels) != len(images):
                raise DatasetError(f"{path}: {s}_labels has shape {labels.shape} for {len(images)} images")
            if labels.dtype.kind in "USO":
                raise DatasetError(f"{path}: {s}_labels holds text ({labels.dtype}); store integer class indices, and "
                                   "their names in a class_names array")
            if labels.dtype.kind == "f":
                if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
                    bad = labels[~(np.isfinite(labels) & (labels == np.round(labels)))][:3]
                    raise DatasetError(f"{path}: {s}_labels holds non-integer values ({', '.join(map(str, bad))}); "
                                       "class labels must be integers")
            if labels.dtype.kind not in "iuf" and labels.dtype.kind != "b":
                raise DatasetError(f"{path}: {s}_labels has dtype {labels.dtype}; class labels must be integers")
            if (labels < 0).any():
                raise DatasetError(f"{path}: {s}_labels holds negative values; class labels start at 0")
            entries += [(f"{s}/{i:06d}", int(lab), s, f"npz:{s}:{i}") for i, lab in enumerate(labels)]
    if names is not None:
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise DatasetError(f"{path}: class_names names {', '.join(repr(n) for n in twice)} more than once; two "
                               "labels would become one class")
        top = max(e[1] for e in entries)
        if top >= len(names):
            raise DatasetError(f"{path}: labels reach {top} but class_names has {len(names)} names")
        entries = [(i, names[lab], s, src) for i, lab, s, src in entries]
        manifest = _finish(path, "npz", entries, 0, 0.1, 0.2, options)
        order = {n: k for k, n in enumerate(names)}  # keep the file's class order, not the sorted one
        manifest.records = [Record(r.id, order[manifest.class_names[r.label]], r.split, r.source)
                            for r in manifest.records]
        manifest.class_names = list(names)
        return manifest
    entries = [(i, str(lab), s, src) for i, lab, s, src in entries]
    return _finish(path, "npz", entries, 0, 0.1, 0.2, options)
