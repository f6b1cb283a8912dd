"""``samcache export --pooled``: one pooled vector per sample, for scikit-learn or FAISS.

Writes an ``.npz`` that loads in one line::

    d = np.load("busi-pooled.npz"); X, y, split = d["features"], d["labels"], d["splits"]

``features`` is ``(N, 256)`` float32 (``mean``) or ``(N, 512)`` (``meanstd``): statistics of each
embedding over its image region (:func:`sam_cache.regions.pooled_features`, the ones the trainer's
``--fuse`` and the study's probes use). ``labels`` (int64; -1 unlabelled), ``ids``, ``splits``
and ``class_names`` come along. Only done rows are exported, in store order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .outputs import atomic_write, refuse_overlap
from .regions import pooled_features
from .store import EmbeddingStore

__all__ = ["export_pooled"]


def export_pooled(store_path: str | Path, out: str | Path, kind: str = "mean", rows_per_read: int = 64,
                  allow_partial: bool = False) -> dict:
    """Write the pooled features of every done sample of a store to ``out`` (``.npz``).

    Returns:
      ``{"rows", "dim", "out"}``; ``out`` ends with ``.npz`` (added when missing, as numpy does).

    Raises:
      StoreError: the store cannot be read, is incomplete (without ``allow_partial``: then only
        its done rows are written), or a row does not match its checksum.
      OutputError: ``out`` cannot be written (nothing half-written is left), or is inside the store.
      ConfigError: ``kind`` is not ``mean`` or ``meanstd``.
    """
    from .errors import ConfigError

    if kind not in ("mean", "meanstd"):
        raise ConfigError(f"--stats must be mean or meanstd; got {kind!r}")
    out = Path(out)
    if out.suffix.lower() != ".npz":  # numpy would add it anyway: say the name that is written
        out = out.with_name(out.name + ".npz")
    refuse_overlap(out, {"STORE": store_path})
    with EmbeddingStore.open(store_path) as s:
        s.require_complete(allow_partial)
        rows = np.flatnonzero(s.done)
        parts = [np.zeros((0, 256 if kind == "mean" else 512), np.float32)]
        for a in range(0, len(rows), rows_per_read):
            chunk = rows[a:a + rows_per_read]
            parts.append(pooled_features(s.read_rows(chunk), s.orig_size[chunk], kind))
        features = np.concatenate(parts)
        arrays = dict(features=features, labels=s.labels[rows], ids=s.ids[rows].astype(str),
                      splits=s.splits[rows].astype(str), class_names=np.array(s.class_names, dtype=str))
    atomic_write(out, lambda p: np.savez(p, **arrays))
    return {"rows": int(len(rows)), "dim": int(features.shape[1]), "out": str(out)}
