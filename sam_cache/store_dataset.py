"""A store as a ``torch.utils.data.Dataset``, for code that is not samcache's own trainer.

::

    from sam_cache import StoreDataset
    ds = StoreDataset("runs/busi.zarr", split="train")
    sample = ds[0]   # {"embedding": float32 256x64x64, "image": uint8 3xRxR, "label": int, "id": str, "split": str}
    loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=4, shuffle=True)

Each worker process opens the store itself (a Zarr or HDF5 handle is not shared across a fork),
and every row read is checked against its stored checksum. Without a store library in the way,
a store is also plain Zarr v3 or HDF5: see the README ("Reading a store elsewhere").
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .store import EmbeddingStore

__all__ = ["StoreDataset"]


class StoreDataset(Dataset):
    """The done samples of a store (or of one split), one dict per sample.

    Arguments:
      path: the store.
      split: ``train``, ``val``, ``test``, or None for all.
      images: also return the stored image (when the store keeps images).

    Raises:
      StoreError: the store cannot be opened.
    """

    def __init__(self, path: str, split: str | None = None, images: bool = True):
        self.path = str(path)
        with EmbeddingStore.open(self.path) as s:
            self.rows = s.split_indices(split) if split else np.flatnonzero(s.done)
            self.labels = s.labels[self.rows]
            self.ids = s.ids[self.rows]
            self.splits = s.splits[self.rows]
            self.class_names = s.class_names
            self.images = images and s.has_images
        self._store: EmbeddingStore | None = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self) -> EmbeddingStore:
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = EmbeddingStore.open(self.path), os.getpid()
        return self._store

    def __getitem__(self, k: int) -> dict:
        s = self._open()
        row = np.array([self.rows[k]])
        item = {"embedding": torch.from_numpy(s.read_rows(row)[0].astype(np.float32)), "label": int(self.labels[k]),
                "id": str(self.ids[k]), "split": str(self.splits[k])}
        if self.images:
            item["image"] = torch.from_numpy(s.read_rows(row, "images")[0])
        return item
