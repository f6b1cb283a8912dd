"""What a store's rows are: the layout constants, the row schema, the signature and its digest.

This module is the bottom of the store package: it imports nothing of samcache but the error
base. The readers (:mod:`sam_cache.readers`) build a :class:`RowSchema`; the store keeps it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..errors import SamcacheError

__all__ = ["SCHEMA_VERSION", "EMBED_SHAPE", "SIGNATURE_KEYS", "GRIDS", "DTYPES", "SPLITS", "RowSchema",
           "StoreError", "StoreMismatchError", "signature_of", "signature_digest", "flatten", "contiguous_runs",
           "check_dtype"]

SCHEMA_VERSION = 2
EMBED_SHAPE = (256, 64, 64)
SIGNATURE_KEYS = ("encoder", "checkpoint_sha256", "random_weights", "preprocessing", "dtype",
                  "manifest_sha256", "image_size", "grid")
GRIDS = (64, 32, 16, 8)
DTYPES = ("float16", "float32", "bfloat16", "int8")
#: the ``splits`` array stores an index into this tuple (and the names in ``split_names``)
SPLITS = ("train", "val", "test")


class StoreError(SamcacheError):
    """A store cannot be created, opened or written as asked."""


class StoreMismatchError(StoreError):
    """A store exists but was made with another encoder, checkpoint, preprocessing or dataset."""


@dataclass(frozen=True)
class RowSchema:
    """The rows a new store will hold, in order: what :meth:`EmbeddingStore.create` takes.

    Arguments:
      ids: one sample id per row (unique).
      labels: ``labels[k]`` indexes ``class_names`` (-1 for an unlabelled row).
      splits: one of :data:`SPLITS` per row.
      class_names: the names of the labels.
      manifest_sha256: the hash that names the dataset the rows come from.
      split_info: how the splits were made (recorded as is).
      dataset: ``{"root", "kind"}`` of the dataset (recorded as is).

    Raises:
      StoreError: the lists differ in length, or a split is not one of :data:`SPLITS`.
    """

    ids: list[str]
    labels: np.ndarray
    splits: list[str]
    class_names: list[str]
    manifest_sha256: str
    split_info: dict = field(default_factory=dict)
    dataset: dict = field(default_factory=dict)

    def __post_init__(self):
        if not len(self.ids) == len(self.labels) == len(self.splits):
            raise StoreError(f"row schema: {len(self.ids)} ids, {len(self.labels)} labels and {len(self.splits)} "
                             "splits; they must be one per row")
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown:
            raise StoreError(f"row schema: splits {unknown} are not among {SPLITS}")

    def __len__(self) -> int:
        return len(self.ids)

    def split_codes(self) -> np.ndarray:
        """``(N,)`` uint8: each row's split as an index into :data:`SPLITS`, as stored."""
        return np.array([SPLITS.index(s) for s in self.splits], dtype=np.uint8)


def check_dtype(dtype: str) -> str:
    """``dtype`` when a store can keep its embeddings in it; raises :class:`StoreError` otherwise."""
    if dtype not in DTYPES:
        raise StoreError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return dtype


def signature_of(meta: dict) -> dict:
    """The signature fields of a store's attributes ``meta`` (a store made before the ``grid``
    attribute existed has the full 64x64 grid)."""
    return {k: meta.get(k, 64 if k == "grid" else None) for k in SIGNATURE_KEYS}


def signature_digest(signature: dict) -> str:
    """sha256 of a store's signature fields: recorded at creation, checked on open."""
    return hashlib.sha256(json.dumps({k: signature.get(k) for k in SIGNATURE_KEYS}, sort_keys=True).encode()).hexdigest()


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``), for diffs."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def contiguous_runs(indices: np.ndarray):
    """Split sorted indices into ``(position, start, stop)`` runs of consecutive values."""
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    pos = 0
    for run in np.split(indices, breaks):
        if len(run):
            yield pos, int(run[0]), int(run[-1]) + 1
            pos += len(run)
