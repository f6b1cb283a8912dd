"""Re-encode a store in another stored form (int8, a compact grid) without running the encoder again.

A converted store is what ``samcache extract --dtype D`` would have written, row for row: the
same signature apart from ``dtype``, the same manifest hash, labels, splits, images and geometry,
and the same done flags. Its attributes add ``converted_from`` (the source path and dtype). A
killed conversion resumes: rows already done in the destination are skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .progress import progress as show_progress
from .store import EmbeddingStore, StoreError, contiguous_runs, pool_to_grid

__all__ = ["convert_store"]


def convert_store(src: str | Path, dst: str | Path, dtype: str | None = None, shard_size: int | None = None,
                  overwrite: bool = False, rows_per_read: int = 64, progress: bool = True,
                  grid: int | None = None) -> dict:
    """Write ``src``'s done rows into a new store ``dst`` with embeddings stored as ``dtype``.

    Arguments:
      src: an existing store.
      dst: the new store (``.zarr`` or ``.h5``; the format may differ from ``src``'s).
      dtype: ``float16``, ``bfloat16``, ``float32`` or ``int8`` (default: the source's).
      shard_size: samples per Zarr shard of ``dst`` (default: ``src``'s).
      overwrite: delete an existing ``dst`` first (default: resume it).
      rows_per_read: rows converted per step.
      progress: show progress (:mod:`sam_cache.progress`).
      grid: a compact grid (32, 16 or 8; average pooling of the source's), default the source's.

    Returns:
      ``{"rows": rows converted now, "done": done rows in dst, "src_bytes", "dst_bytes"}``;
      the byte counts are the embeddings' stored size per sample before and after.

    Raises:
      StoreError: ``src`` is missing or ``dst`` is ``src``; an existing ``dst`` that is not a
        conversion of ``src`` to ``dtype`` (nothing in it is touched).
    """
    src, dst = str(src), str(dst)
    if Path(src).resolve() == Path(dst).resolve():
        raise StoreError(f"convert writes a new store: {dst} is the source itself")
    with EmbeddingStore.open(src) as s:
        dtype, grid = dtype or s.dtype, grid or s.grid
        if grid > s.grid:
            raise StoreError(f"cannot convert a {s.grid}x{s.grid} store to a finer {grid}x{grid} grid")
        expected = {**s.signature, "dtype": dtype, "grid": grid}
        if overwrite:
            EmbeddingStore.remove(dst)
        if EmbeddingStore.exists(dst):
            d = EmbeddingStore.open(dst, "r+")
            try:
                d.check_signature(expected)
            except StoreError:
                d.close()
                raise
        else:
            d = _create_like(s, dst, dtype, shard_size, grid)
        try:
            todo = np.flatnonzero(s.done & ~d.done)
            _copy_rows(s, d, todo, rows_per_read, progress)
            return {"rows": int(len(todo)), "done": int(d.done.sum()),
                    "src_bytes": s.bytes_per_row, "dst_bytes": d.bytes_per_row}
        finally:
            d.close()


def _create_like(s: EmbeddingStore, dst: str, dtype: str, shard_size: int | None, grid: int) -> EmbeddingStore:
    # the rows' sources are not in the store: the new one keeps the source store's hash, which names them
    d = EmbeddingStore.create(dst, s.row_schema(), s.signature, dtype=dtype, image_size=s.image_size,
                              shard_size=shard_size or s.shard_size, grid=grid, high_res=s.high_res_shapes)
    d.update_meta(converted_from={"path": s.path, "dtype": s.dtype, "grid": s.grid})
    return d


def _copy_rows(s: EmbeddingStore, d: EmbeddingStore, rows: np.ndarray, step: int, progress: bool) -> None:
    with show_progress("convert", len(rows), enabled=progress, unit="row") as bar:
        for _, start, stop in contiguous_runs(rows):
            for a in range(start, stop, step):
                b = min(a + step, stop)
                images = s.read_images(a, b)
                high_res = s.read_high_res(np.arange(a, b)) if s.high_res_shapes else None
                d.write_rows(a, pool_to_grid(s.read_embeddings(a, b), d.grid), s.orig_size[a:b], s.valid[a:b],
                             s.window[a:b], images, high_res)
                d.mark_done(np.arange(a, b))
                bar.advance(b - a)
