"""The one door for dataset readers: :func:`register_reader` adds one, :func:`create_reader` finds it.

A reader is three functions: ``claims(path)`` says whether it reads ``path`` (returning the file or
folder it would open, or None), ``open(target, seed, val_fraction, test_fraction, options)`` returns
a :class:`DatasetManifest`, and ``sample_source(root, sample_id)`` says where a stored sample came
from (what ``slca-train predict`` writes in its ``source`` column). Readers are asked in the order
they were registered; a ``fallback`` reader (the image folder) is asked after all others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .manifest import DatasetError, DatasetManifest, DatasetOptions

__all__ = ["Reader", "READERS", "register_reader", "create_reader", "reader_kinds", "sample_sources"]


def _relative_to_root(root: str, sample_id: str) -> str:
    return os.path.join(root, sample_id)


@dataclass(frozen=True)
class Reader:
    """A registered dataset reader (see the module docstring)."""

    kind: str
    claims: Callable[[Path], Path | None]
    open: Callable[..., DatasetManifest]
    sample_source: Callable[[str, str], str] = _relative_to_root
    fallback: bool = False


READERS: dict[str, Reader] = {}


def register_reader(kind: str, claims: Callable[[Path], Path | None],
                    sample_source: Callable[[str, str], str] = _relative_to_root, fallback: bool = False):
    """Decorator: register ``open`` as the reader of ``kind`` (recorded in stores as ``dataset.kind``).

    Raises:
      ValueError: ``kind`` is registered already.
    """
    def add(open_fn):
        if kind in READERS:
            raise ValueError(f"a dataset reader {kind!r} is registered already")
        READERS[kind] = Reader(kind, claims, open_fn, sample_source, fallback)
        return open_fn

    return add


def reader_kinds() -> list[str]:
    """The registered kinds, in the order they are asked."""
    return [r.kind for r in sorted(READERS.values(), key=lambda r: r.fallback)]


@dataclass(frozen=True)
class OpenReader:
    """A reader bound to the path it claimed: :meth:`manifest` reads the layout."""

    reader: Reader
    path: Path

    def manifest(self, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 options: DatasetOptions | None = None) -> DatasetManifest:
        return self.reader.open(self.path, seed, val_fraction, test_fraction, options or DatasetOptions())


def create_reader(path: str | Path) -> OpenReader:
    """The reader of ``path``: the first registered one that claims it.

    Raises:
      DatasetError: ``path`` does not exist, or no reader reads it (naming the kinds there are).
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    for kind in reader_kinds():
        target = READERS[kind].claims(path)
        if target is not None:
            return OpenReader(READERS[kind], target)
    raise DatasetError(f"dataset {path}: expected a folder, a .csv or a .npz file (readers: {', '.join(reader_kinds())})")


def sample_sources(dataset: dict, ids) -> list[str]:
    """Where each stored sample came from, asked of the reader that read it (``dataset`` is a
    store's ``dataset`` attribute: ``{"root", "kind"}``); an unknown kind joins the id to the root."""
    root, kind = dataset.get("root", ""), dataset.get("kind", "")
    source = READERS[kind].sample_source if kind in READERS else _relative_to_root
    return [source(root, str(i)) for i in ids]
