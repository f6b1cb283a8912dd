"""Dataset readers: an image folder, a CSV manifest, or a MedMNIST-style ``.npz``, behind one door.

One module per reader (:mod:`.folder`, :mod:`.csv_table`, :mod:`.npz`), each registered with
:func:`register_reader`; :func:`create_reader` finds the reader of a path and :func:`open_dataset`
reads it. A new reader is one module with ``@register_reader(...)`` plus its import below.

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

from pathlib import Path

from ..store.schema import SPLITS
from .entries import NIFTI_SUFFIXES
from .manifest import DatasetError, DatasetManifest, DatasetOptions, Record, Source, canonical_volume, parse_source
from .registry import READERS, Reader, create_reader, reader_kinds, register_reader, sample_sources
from .splits import draw_val_from_train, stratified_splits

__all__ = ["Record", "Source", "parse_source", "DatasetManifest", "DatasetError", "DatasetOptions", "open_dataset",
           "create_reader", "register_reader", "reader_kinds", "sample_sources", "Reader", "READERS", "SPLITS",
           "NIFTI_SUFFIXES", "canonical_volume", "stratified_splits", "draw_val_from_train"]


def open_dataset(path: str | Path, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 options: DatasetOptions | None = None) -> DatasetManifest:
    """Read a dataset's layout (not its pixels) into a :class:`DatasetManifest`.

    Arguments:
      path: an image folder, a CSV file, a folder holding ``manifest.csv``/``labels.csv``, or an
        ``.npz`` file (or what another registered reader claims).
      seed, val_fraction, test_fraction: used only when the data has no splits of its own (or
        no val split), to draw a stratified split.
      options: column names, unlabelled data, NIfTI slicing (:class:`DatasetOptions`).

    Raises:
      DatasetError: the path does not exist, holds no images, or is inconsistent (see the module
        docstring); the message names the file and, for a CSV, the line.
    """
    return create_reader(path).manifest(seed, val_fraction, test_fraction, options)


# the readers, in the order they are asked (the folder reader is the fallback, asked last)
from . import npz, csv_table, folder  # noqa: E402,F401
