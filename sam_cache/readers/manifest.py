"""What a reader produces: a :class:`DatasetManifest` of :class:`Record` rows, and the options.

A record's source is a :class:`Source` (a file, a DICOM frame, a NIfTI slice, an npz row),
spelled as text in the record because the manifest hash is computed from that text.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import SamcacheError
from ..preprocess import read_image
from ..store.schema import RowSchema

__all__ = ["DatasetError", "DatasetOptions", "Source", "parse_source", "Record", "DatasetManifest", "canonical_volume"]


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


class Source(NamedTuple):
    """Where one sample's pixels are: :func:`parse_source` of a record's source text.

    ``kind`` is ``file`` (``path``), ``dicom`` (frame ``index`` of ``path``), ``nifti`` (slice
    ``index`` across ``axis`` of the volume ``path``) or ``npz`` (row ``index`` of the ``split``
    arrays; ``path`` None: the dataset's own file).
    """

    kind: str
    path: str | None
    index: int = 0
    axis: int = 0
    split: str = ""

    def text(self) -> str:
        """The source as a record (and the manifest hash) spells it."""
        if self.kind == "npz":
            return f"npz:{self.split}:{self.index}"
        if self.kind == "dicom":
            return f"dicom:{self.index}:{self.path}"
        if self.kind == "nifti":
            return f"nifti:{self.axis}:{self.index}:{self.path}"
        return str(self.path)


def parse_source(text: str) -> Source:
    """A record's source text as a :class:`Source`: the one place its spelling is read."""
    if text.startswith("npz:"):
        _, split, row = text.split(":")
        return Source("npz", None, int(row), split=split)
    if text.startswith("dicom:"):
        _, frame, path = text.split(":", 2)
        return Source("dicom", path, int(frame))
    if text.startswith("nifti:"):
        _, axis, k, path = text.split(":", 3)
        return Source("nifti", path, int(k), int(axis))
    return Source("file", text)


@dataclass(frozen=True)
class Record:
    """One image. ``source`` is the text of a :class:`Source` (a file path; or
    ``npz:<split>:<row>``, ``dicom:<frame>:<path>``, ``nifti:<axis>:<slice>:<path>`` for one array
    of a larger file): the manifest hash is computed from it."""

    id: str
    label: int
    split: str
    source: str

    @property
    def parsed(self) -> Source:
        """The source as a :class:`Source`."""
        return parse_source(self.source)

    @property
    def file(self) -> str | None:
        """The file this record is read from (None for an npz row)."""
        return self.parsed.path


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
        src = self.records[index].parsed
        if src.kind == "npz":
            if self._arrays is None:
                from .npz import load_npz_arrays

                self._arrays = load_npz_arrays(Path(self.root))
            return self._arrays[src.split][src.index], None
        if src.kind == "dicom":
            return read_image(src.path, window, src.index)
        if src.kind == "nifti":
            return np.take(self._nifti(src.path), src.index, axis=src.axis).astype(np.float32), None
        return read_image(src.path, window)

    def _nifti(self, path: str) -> np.ndarray:
        """The volume of ``path`` (the last one read is kept: slices of one volume come in a row)."""
        if self._volume is None or self._volume[0] != path:
            from ..preprocess import ImageDecodeError

            try:
                import nibabel
            except ImportError:  # pragma: no cover - depends on the optional extra
                raise ImageDecodeError("reading NIfTI needs nibabel: pip install 'samcache[nifti]'") from None
            try:
                self._volume = (path, np.asarray(canonical_volume(nibabel, path).dataobj))
            except Exception as exc:  # nibabel raises many kinds for bad files
                raise ImageDecodeError(f"not a readable NIfTI volume: {exc}") from exc
        return self._volume[1]


def canonical_volume(nibabel, path: str):
    """A NIfTI image reoriented to the closest canonical orientation (RAS+: axis 0 runs to the
    right, 1 to the front, 2 up), as ``nibabel.as_closest_canonical`` does; the same slicing
    axis then means the same anatomy in every volume (2: axial)."""
    return nibabel.as_closest_canonical(nibabel.load(path))
