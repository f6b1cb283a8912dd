"""Reading a store back for people and scripts: :func:`summarize_store` and :func:`verify_store`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .store import SPLITS, EmbeddingStore

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
      (per split, per class), "skipped", "suspect", "image_size", "preprocessing", "manifest_sha256",
      "schema_version", "package_version", "created", "disk_bytes", "checksums", "content_digest", "high_res", "masks",
      "mask_sets"}`` (``content_digest``: :meth:`EmbeddingStore.content_digest`)
      (``high_res``: the shapes of a SAM 2 store's high-resolution levels, else empty);
      ``masks`` is None, or the default mask set's signature with ``done`` and ``mean_iou``;
      ``mask_sets``: the same for every set, by name.

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
            "embedding_shape": list(store.embed_shape),
            "dtype": meta["dtype"],
            "encoder": meta["encoder"],
            "checkpoint_sha256": meta["checkpoint_sha256"],
            "random_weights": meta["random_weights"],
            "class_names": names,
            "labels": store.labels.tolist(),
            "label_counts": counts,
            "skipped": meta.get("skipped", []),
            "suspect": meta.get("suspect", []),
            "image_size": meta.get("image_size"),
            "preprocessing": meta["preprocessing"],
            "split_info": meta.get("split_info"),
            "manifest_sha256": meta["manifest_sha256"],
            "schema_version": meta["schema_version"],
            "package_version": meta["package_version"],
            "created": meta["created"],
            "disk_bytes": _disk_bytes(str(path)),
            "checksums": store.has_checksums,
            "content_digest": store.content_digest(),
            "high_res": [list(level) for level in store.high_res_shapes or []],
            "masks": _masks(store),
            "mask_sets": {name: _masks(store, name) for name in store.mask_sets},
        }


def _masks(store: EmbeddingStore, name: str = "default") -> dict | None:
    ms = store.mask_set(name)
    if not ms.exists:
        return None
    done = ms.done
    iou = ms.iou[done]
    return {**ms.signature, "done": int(done.sum()), "mean_iou": float(iou.mean()) if len(iou) else float("nan")}


def verify_store(path: str | Path, progress=None) -> list[str]:
    """Check everything that training reads, for every done sample.

    Checks: the embedding array's shape; each row finite and not all zeros; its stored bytes
    against the CRC-32 recorded when it was written (schema 2 stores; this catches flipped bytes,
    which uncompressed zarr shards do not); the stored image not all zeros and matching its
    checksum; the valid region inside the grid; labels inside ``0..K-1``. Rows are read one
    shard at a time, and a shard that cannot be read at all is reported once, by name.

    Arguments:
      path: the store.
      progress: optional callable ``progress(n_checked)`` called as rows are read.

    Returns:
      A list of problems, one line each, naming the shard and the samples; empty when sound.
    """
    problems: list[str] = []
    with EmbeddingStore.open(path) as store:
        shape = store.embeddings_shape
        if shape[1:] != store.embed_shape:
            return [f"embeddings have shape {shape}, expected (N, {', '.join(map(str, store.embed_shape))})"]
        k = len(store.class_names)
        bad = np.flatnonzero((store.labels < 0) | (store.labels >= max(k, 1)))
        if len(bad):
            problems.append(f"labels of {len(bad)} sample(s) are outside 0..{k - 1}: "
                            + ", ".join(f"sample {i} ({store.ids[i]}) = {store.labels[i]}" for i in bad[:5]))
        if not store.has_checksums:
            problems.append(f"{path} has schema {store.meta['schema_version']} and no checksums: flipped bytes cannot be "
                            "detected (convert it with `samcache convert` to get them)")
        shard = store.shard_size if store.format == "zarr" else 1
        done = np.flatnonzero(store.done)
        checked = 0
        for s in np.unique(done // shard):
            rows = done[done // shard == s]
            where = _shard_name(store, int(s), shard)
            try:
                problems += _check_rows(store, rows, where)
            except Exception as exc:  # a truncated or missing file: zarr and h5py raise many kinds
                problems.append(f"{where}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                f"samples {_names(store, rows)}")
            checked += len(rows)
            if progress is not None:
                progress(checked)
        problems += _check_masks(store, shard)
        problems += _check_high_res(store, shard)
    return problems


def _check_high_res(store: EmbeddingStore, shard: int) -> list[str]:
    """A SAM 2 store's high-resolution levels of done rows against their checksums, shard by shard."""
    if not store.high_res_shapes:
        return []
    problems = []
    done = np.flatnonzero(store.done)
    for s in np.unique(done // shard):
        try:
            store.read_high_res(done[done // shard == s])
        except Exception as exc:  # a mismatch (StoreError), or a shard file that cannot be read at all
            problems.append(f"{_shard_name(store, int(s), shard)}, high_res: {str(exc).splitlines()[0]}")
    return problems


def _check_masks(store: EmbeddingStore, shard: int) -> list[str]:
    """Done masks of every set against their checksums, shard by shard (sets without checksums: none)."""
    problems = []
    for name in store.mask_sets:
        ms = store.mask_set(name)
        if not ms.has_checksums:
            continue
        done = np.flatnonzero(ms.done)
        for s in np.unique(done // shard):
            rows = done[done // shard == s]
            try:
                ms.read(rows)  # verifies each mask's bytes against its checksum
            except Exception as exc:  # a mismatch (StoreError), or a shard file that cannot be read at all
                problems.append(f"{_shard_name(store, int(s), shard)}, {ms.key('masks')}: "
                                f"{str(exc).splitlines()[0]}")
    return problems


def _shard_name(store: EmbeddingStore, s: int, shard: int) -> str:
    if store.format == "zarr":
        return f"shard {s} (rows {s * shard}-{(s + 1) * shard - 1})"
    return f"row {s}"


def _file(store: EmbeddingStore, array: str, where: str) -> str:
    """The shard file of ``array`` that ``where`` names (Zarr), for the message."""
    if store.format != "zarr" or not where.startswith("shard "):
        return array
    s = where.split()[1]
    return f"{array}/c/{s}/0/0/0" if array in ("embeddings", "images") else array


def _names(store: EmbeddingStore, rows, limit: int = 6) -> str:
    text = ", ".join(f"{int(i)} ({store.ids[int(i)]})" for i in list(rows)[:limit])
    return text + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _check_rows(store: EmbeddingStore, rows: np.ndarray, where: str) -> list[str]:
    problems = []
    start, stop = int(rows.min()), int(rows.max()) + 1
    values = store.read_embeddings(start, stop)
    images = store.read_images(start, stop)
    stored = store.stored_checksums(start, stop) if store.has_checksums else None
    recorded = store.recorded_checksums(start, stop)
    zeros, nonfinite, emb_sum, img_sum, img_zero, region = [], [], [], [], [], []
    for i in rows:
        j = int(i) - start
        row = values[j]
        finite = np.isfinite(row)
        if not finite.all():
            nonfinite.append(i)
        elif not row.any():
            zeros.append(i)
        if stored is not None and stored[j, 0] != recorded[j, 0]:
            emb_sum.append(i)
        if images is not None:
            if not images[j].any():
                img_zero.append(i)
            if stored is not None and stored[j, 1] != recorded[j, 1]:
                img_sum.append(i)
        rows_, cols_ = store.valid[int(i)]
        if not (0 < rows_ <= 64 and 0 < cols_ <= 64):
            region.append(i)
    for found, array, what in (
            (nonfinite, "embeddings", "non-finite values"),
            (zeros, "embeddings", "marked done but all zeros (never written, or the shard file was lost)"),
            (emb_sum, "embeddings", "bytes that do not match their checksum (corrupted)"),
            (img_zero, "images", "all zeros (never written, or the shard file was lost)"),
            (img_sum, "images", "bytes that do not match their checksum (corrupted)"),
            (region, "valid", "a valid region outside the 64x64 grid")):
        if found:
            problems.append(f"{where}, {_file(store, array, where)}: {what}: samples {_names(store, found)}")
    return problems
