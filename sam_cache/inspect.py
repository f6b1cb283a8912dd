"""Reading a store back for people and scripts: :func:`summarize_store` and :func:`verify_store`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .datasets import SPLITS
from .store import EMBED_SHAPE, EmbeddingStore

__all__ = ["summarize_store", "verify_store"]


def _disk_bytes(path: str) -> int | None:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return None


def summarize_store(path: str | Path) -> dict:
    """A JSON-ready summary of a store.

    Returns:
      ``{"path", "format", "samples", "done", "embedding_shape", "dtype", "encoder",
      "checkpoint_sha256", "random_weights", "class_names", "labels", "label_counts"
      (per split, per class), "skipped", "image_size", "preprocessing", "manifest_sha256",
      "schema_version", "package_version", "created", "disk_bytes"}``.

    Raises:
      StoreError: the path is not a readable store.
    """
    with EmbeddingStore.open(path) as store:
        meta = store.meta
        names = store.class_names
        counts = {
            split: {names[c]: int(np.sum((store.splits == split) & (store.labels == c))) for c in range(len(names))}
            for split in SPLITS
        }
        return {
            "path": str(path),
            "format": store.format,
            "samples": len(store),
            "done": int(store.done.sum()),
            "embedding_shape": list(EMBED_SHAPE),
            "dtype": meta["dtype"],
            "encoder": meta["encoder"],
            "checkpoint_sha256": meta["checkpoint_sha256"],
            "random_weights": meta["random_weights"],
            "class_names": names,
            "labels": store.labels.tolist(),
            "label_counts": counts,
            "skipped": meta.get("skipped", []),
            "image_size": meta.get("image_size"),
            "preprocessing": meta["preprocessing"],
            "split_info": meta.get("split_info"),
            "manifest_sha256": meta["manifest_sha256"],
            "schema_version": meta["schema_version"],
            "package_version": meta["package_version"],
            "created": meta["created"],
            "disk_bytes": _disk_bytes(str(path)),
        }


def verify_store(path: str | Path, progress=None) -> list[str]:
    """Check every done sample: present, of shape 256x64x64, finite, with a sane valid region.

    Arguments:
      path: the store.
      progress: optional callable ``progress(n_checked)`` called as rows are read.

    Returns:
      A list of problems, one line each, naming the sample; empty when the store is sound.
    """
    problems = []
    with EmbeddingStore.open(path) as store:
        emb = store.embeddings
        if tuple(emb.shape[1:]) != EMBED_SHAPE:
            return [f"embeddings have shape {tuple(emb.shape)}, expected (N, {', '.join(map(str, EMBED_SHAPE))})"]
        done = np.flatnonzero(store.done)
        for k, i in enumerate(done):
            row = store.read_embeddings(int(i), int(i) + 1)[0]
            name = f"sample {i} ({store.ids[i]})"
            if not np.isfinite(row).all():
                problems.append(f"{name}: {int((~np.isfinite(row)).sum())} non-finite values")
            elif not row.any():
                problems.append(f"{name}: marked done but all zeros (never written)")
            rows, cols = store.valid[i]
            if not (0 < rows <= 64 and 0 < cols <= 64):
                problems.append(f"{name}: valid region {rows}x{cols} is outside the 64x64 grid")
            if progress is not None:
                progress(k + 1)
        if store.meta["class_names"] and len(store) and store.labels.max() >= len(store.class_names):
            problems.append(f"labels reach {store.labels.max()} but there are {len(store.class_names)} classes")
    return problems
