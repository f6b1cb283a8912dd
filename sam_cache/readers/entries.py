"""What every reader shares: which files are images, one file's samples, labels, and
:func:`finish`, which turns a reader's entries into a :class:`DatasetManifest`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..preprocess import IMAGE_SUFFIXES, dicom_frames
from .manifest import DatasetError, DatasetManifest, DatasetOptions, Record, Source, canonical_volume, parse_source
from .splits import draw_val_from_train, refuse_group_leaks, stratified_splits

__all__ = ["NIFTI_SUFFIXES", "SPLIT_ALIASES", "is_image", "expand", "file_groups", "class_index", "canonical_labels",
           "finish"]

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_image(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and not p.name.startswith(".") and (
        p.suffix.lower() in IMAGE_SUFFIXES or name.endswith(NIFTI_SUFFIXES))


def expand(rel: str, source: Path, options: DatasetOptions) -> list[tuple[str, str]]:
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
        return [(f"{rel}#z{k:04d}", Source("nifti", str(source), k, axis).text()) for k in ks]
    if name.endswith(".dcm"):
        frames = dicom_frames(source)
        if frames > 1:
            return [(f"{rel}#f{k:04d}", Source("dicom", str(source), k).text()) for k in range(frames)]
    return [(rel, str(source))]


def file_groups(entries) -> list[str] | None:
    """One group per file when some file gives many samples (NIfTI slices, DICOM frames): its
    samples must share a split. None when every file is one sample (or an npz's row)."""
    files = [parse_source(e[3]).path if e[3].startswith(("nifti:", "dicom:")) else e[0] for e in entries]
    if len(set(files)) == len(files):
        return None
    return files


def class_index(names: list[str]) -> tuple[list[str], dict[str, int]]:
    """Sort class names (numerically when all are integers) and index them."""
    unique = sorted(set(names), key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))
    return unique, {n: i for i, n in enumerate(unique)}


def canonical_labels(labels: list[str], where: str) -> list[str]:
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


def finish(root, kind, entries, seed, val_fraction, test_fraction, options: DatasetOptions,
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
    class_names, index = class_index([e[1] for e in entries])
    labels = np.array([index[e[1]] for e in entries])
    given = [e[2] for e in entries]
    by_file = groups is None and file_groups(entries) is not None
    if by_file:  # slices of one volume, frames of one file: one group, so never in two splits
        groups = file_groups(entries)
    keys = np.array(groups) if groups is not None else None
    if options.single_split is not None:
        splits, info = [options.single_split] * len(entries), {"source": options.single_split}
    elif all(s is not None for s in given):
        if keys is not None:
            refuse_group_leaks(root, keys, given, [e[0] for e in entries], options.group_column or "file")
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
