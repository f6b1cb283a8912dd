"""The MedMNIST-style ``.npz`` reader: arrays per split, integer labels, optional class names."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..store.schema import SPLITS
from .entries import finish
from .manifest import DatasetError, DatasetManifest, DatasetOptions, Record
from .registry import register_reader

__all__ = ["open_npz", "load_npz_arrays"]


def load_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        try:
            return {s: z[f"{s}_images"] for s in SPLITS if f"{s}_images" in z}
        except ValueError:
            raise DatasetError(f"{path}: its image arrays hold Python objects; save them as numeric arrays") from None


def _claims(path: Path) -> Path | None:
    return path if path.is_file() and path.suffix.lower() == ".npz" else None


def _sample_source(root: str, sample_id: str) -> str:
    return f"{root}#{sample_id}"


@register_reader("npz", _claims, _sample_source)
def open_npz(path: Path, seed, val_fraction, test_fraction, options: DatasetOptions) -> DatasetManifest:
    """Read a MedMNIST-style ``.npz`` (``train_images``/``train_labels``, ``val_``, ``test_``,
    optional ``class_names``); its splits are its own (the fractions are not used)."""
    if options.group_column:
        raise DatasetError(f"{path}: --group-column needs a CSV dataset; an npz has no group column")
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
        manifest = finish(path, "npz", entries, 0, 0.1, 0.2, options)
        order = {n: k for k, n in enumerate(names)}  # keep the file's class order, not the sorted one
        manifest.records = [Record(r.id, order[manifest.class_names[r.label]], r.split, r.source)
                            for r in manifest.records]
        manifest.class_names = list(names)
        return manifest
    entries = [(i, str(lab), s, src) for i, lab, s, src in entries]
    return finish(path, "npz", entries, 0, 0.1, 0.2, options)
