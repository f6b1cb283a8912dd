"""A store's life on disk: made exclusively, known as a store, checked when opened, found abandoned, removed.

:class:`~sam_cache.store.EmbeddingStore` exposes these as ``create``, ``exists``, ``is_store``,
``abandoned_creation`` and ``remove``, and runs ``check_attributes`` on every store it opens; they
live here so that the store class keeps to reading and writing rows.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import socket
from pathlib import Path

import numpy as np

from .backends import H5_META_COPY, H5Backend, ZarrBackend, open_backend, store_format, zarr_exists_error
from .codec import NUMPY_DTYPES, high_res_dtype
from .schema import (DTYPES, EMBED_SHAPE, GRIDS, SCHEMA_VERSION, SIGNATURE_KEYS, SPLITS, RowSchema, StoreError, check_dtype,
                     signature_digest, signature_of)

__all__ = ["create", "check_attributes", "exists", "is_store", "abandoned_creation", "remove"]


def _creator() -> dict:
    """Who is creating a store: the "creating" marker, so that a later run can tell a dead creator."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(pid) -> bool:
    """Whether a process with this id exists on this host (one we may not signal counts as alive)."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create(
    cls,
    path: str | Path,
    rows: RowSchema,
    signature: dict,
    dtype: str = "float16",
    image_size: int | None = None,
    shard_size: int = 16,
    block_size: int | None = None,
    grid: int = 64,
    high_res: tuple[tuple[int, int, int], ...] | None = None,
):
    """Create an empty store for ``rows``; nothing is marked done. Returns the store, writable.

    Arguments:
      cls: the store class (its ``exists`` is asked, and it opens the new store).
      path: a ``.zarr`` folder (or any fsspec URL zarr accepts) or an ``.h5`` file.
      rows: the rows, in the store's order (a reader's ``DatasetManifest.row_schema()``, or
        a store's own :meth:`~EmbeddingStore.row_schema` to make one like it).
      signature: the encoder's :meth:`Encoder.signature`.
      dtype: ``float16`` (default), ``bfloat16`` or ``float32`` for the embeddings.
      image_size: R, to keep each image at RxR in the embedding's frame; None keeps none.
      shard_size: samples per Zarr shard file (ignored for HDF5).
      block_size: rows per chunk of the small per-sample arrays and per unit of work dealt
        to a distributed rank; a multiple of ``shard_size`` (default: about 1024 rows).
      grid: the side of the stored embedding grid: 64, or a compact 32, 16 or 8 (average pooled).
      high_res: the shapes of the extra feature levels to keep beside each embedding (the
        encoder's :attr:`~sam_cache.encoders.Encoder.high_res`), or None.

    Raises:
      StoreError: the path exists already, or an argument is out of range.
    """
    path = str(path)
    if cls.exists(path):
        raise StoreError(f"{path} exists already; open it to resume, or remove it first")
    check_dtype(dtype)
    if shard_size < 1:
        raise StoreError("shard_size must be at least 1")
    if grid not in GRIDS:
        raise StoreError(f"grid must be one of {GRIDS}, got {grid}")
    n = len(rows)
    block = block_size or shard_size * max(1, 1024 // shard_size)
    if block % shard_size:
        raise StoreError(f"block_size {block} must be a multiple of shard_size {shard_size}")
    fmt = store_format(path)
    # marked from its first byte: a store killed while being made, or read while being made, is known as ours
    try:  # exclusive: two runs that start together never both create (nor delete each other's)
        if fmt == "hdf5":
            b = H5Backend(path, "w-")
            b.set_meta({"creating": _creator()})
            b.flush()
        else:
            b = ZarrBackend(path, "w-", attributes={"samcache": {"creating": _creator()}})
    except (FileExistsError, zarr_exists_error()) as exc:
        raise StoreError(f"{path} was created by another process just now (two extractions into one new store?); "
                         "let that one finish, then rerun to resume") from exc
    shape = (EMBED_SHAPE[0], grid, grid)
    shards = (min(shard_size, n),) + shape if fmt == "zarr" else None
    b.create_array("embeddings", (n,) + shape, NUMPY_DTYPES[dtype], (1,) + shape, shards)
    if image_size:
        img_shape = (3, image_size, image_size)
        b.create_array("images", (n,) + img_shape, "uint8", (1,) + img_shape,
                       (min(shard_size, n),) + img_shape if fmt == "zarr" else None)
    b.create_array("labels", (n,), "int64", (n,))
    b.create_array("ids", (n,), str, (n,))
    b.create_array("splits", (n,), "uint8", (n,))
    # per-sample arrays written during extraction: chunked by block, so that ranks never share a chunk
    b.create_array("orig_size", (n, 2), "int32", (min(n, block), 2))
    b.create_array("valid", (n, 2), "int32", (min(n, block), 2))
    b.create_array("window", (n, 2), "float32", (min(n, block), 2))
    b.create_array("done", (n,), "bool", (min(n, block),))
    b.create_array("checksums", (n, 2), "uint32", (min(n, block), 2))
    if dtype == "int8":  # symmetric per-sample, per-channel scales: x = q * scale
        b.create_array("scales", (n, EMBED_SHAPE[0]), "float32", (min(n, block), EMBED_SHAPE[0]))
    for k, level in enumerate(high_res or ()):
        level = tuple(int(v) for v in level)
        b.create_array(f"high_res_{k}", (n,) + level, high_res_dtype(dtype), (1,) + level,
                       (min(shard_size, n),) + level if fmt == "zarr" else None)
    if high_res:
        b.create_array("high_res_crc", (n,), "uint32", (min(n, block),))
    b["labels"][:] = np.asarray(rows.labels, dtype=np.int64)
    b["ids"][:] = np.array(rows.ids, dtype=object if fmt == "hdf5" else str)
    b["splits"][:] = rows.split_codes()
    b["window"][:] = np.full((n, 2), np.nan, dtype=np.float32)
    from .. import __version__

    meta: dict = {"schema_version": SCHEMA_VERSION}
    meta.update({k: signature.get(k) for k in ("encoder", "checkpoint_sha256", "random_weights", "preprocessing")})
    meta.update(
        dtype=dtype, grid=grid, manifest_sha256=rows.manifest_sha256, image_size=image_size,
        class_names=list(rows.class_names), split_names=list(SPLITS), split_info=rows.split_info,
        dataset=dict(rows.dataset), shard_size=shard_size, block_size=block,
        package_version=__version__, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        skipped=[],
    )
    if high_res:
        meta["high_res"] = [[int(v) for v in level] for level in high_res]
    meta["signature_sha256"] = signature_digest(signature_of(meta))
    if fmt == "hdf5":
        b.record_creation(meta)
    b.set_meta(meta)
    b.flush()
    return cls(path, b)


def check_attributes(path: str, meta: dict, backend) -> None:
    """Refuse an opened store's attributes ``meta`` that were edited by hand, or that do not
    describe the arrays of ``backend``.

    Raises:
      StoreError: the signature does not match its recorded ``signature_sha256``; or the
        ``dtype`` attribute is not one that the ``embeddings`` array (and ``scales``) can hold.
    """
    recorded = meta.get("signature_sha256")
    if recorded is not None and recorded != signature_digest(signature_of(meta)):
        raise StoreError(f"store {path}: its signature attributes ({', '.join(SIGNATURE_KEYS)}) were changed "
                         "after it was made (they no longer match signature_sha256); its embeddings cannot be "
                         "trusted to be what it says. Extract it again")
    dtype = meta.get("dtype")
    if dtype not in DTYPES:
        raise StoreError(f"store {path}: dtype attribute {dtype!r} is not one of {DTYPES}")
    stored = str(backend["embeddings"].dtype)
    if stored != NUMPY_DTYPES[dtype] or (dtype == "int8" and "scales" not in backend):
        raise StoreError(f"store {path}: its dtype attribute says {dtype!r}, but the embeddings array holds "
                         f"{stored}{' without scales' if dtype == 'int8' and stored == 'int8' else ''}; the "
                         "attributes were edited or damaged. Extract it again")


def exists(path: str | Path) -> bool:
    """Whether something is at ``path`` (a local path; URLs are probed through zarr)."""
    path = str(path)
    if "://" not in path:
        return Path(path).exists()
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(root)

def is_store(path: str | Path) -> bool:
    """Whether ``path`` holds a samcache store (finished, partial, or interrupted while being made).

    A Zarr folder counts when its group attributes carry ``samcache``; an HDF5 file when it opens
    and its attributes name ``samcache`` (or it holds the ``meta_created`` record). Only what is
    positively a store counts: an HDF5 file that cannot be opened (held by another process,
    truncated, damaged) is not, so ``--overwrite`` never deletes it. Anything else, a dataset
    or a user's folder, is not a store.
    """
    path = str(path)
    if not exists(path):
        return False
    if store_format(path) == "hdf5":
        p = Path(path)
        if not p.is_file():
            return False
        try:
            import h5py

            with h5py.File(p, "r") as f:
                return "samcache" in f.attrs or H5_META_COPY in f
        except OSError:
            return False
    try:
        return bool(ZarrBackend(path, "r").get_meta())
    except Exception:  # not a zarr group at all
        return False

def metadata_pending(path: str | Path) -> bool:
    """Whether ``path`` is a local Zarr folder that zarr has begun but not yet given its metadata.

    zarr makes the folder, then writes ``zarr.json`` through a temporary ``*.partial`` file that it
    renames: for that instant the folder is empty or holds only such files. A store that is being
    created looks like this before its first attribute lands; so does an empty folder. Anything
    else in it (a user's file, a finished store) is not pending.
    """
    p = Path(str(path))
    if "://" in str(path) or store_format(path) != "zarr" or not p.is_dir():
        return False
    return all(e.is_file() and e.name.endswith(".partial") for e in p.iterdir())


def abandoned_creation(path: str | Path) -> bool:
    """Whether ``path`` is a store whose creation was interrupted by a process that is gone.

    Such a store holds no row (creation ends before the first one is written), so starting it
    over loses nothing. Only a creator on this host whose process no longer exists counts; a
    live creator, one on another host, or a store from before creators were recorded is not
    abandoned as far as this can tell, and is refused on open as before.
    """
    path = str(path)
    if not is_store(path):
        return False
    try:
        b = open_backend(path, "r")
        try:
            by = b.get_meta().get("creating")
        finally:
            b.close()
    except Exception:  # damaged: not ours to judge here
        return False
    return isinstance(by, dict) and by.get("host") == socket.gethostname() and not _alive(by.get("pid"))

def remove(path: str | Path) -> None:
    """Delete a store (folder, file or URL); what ``--overwrite`` does.

    Raises:
      StoreError: ``path`` exists but is not a samcache store (see :meth:`is_store`):
        nothing is deleted.
    """
    if not exists(path):
        return
    if not is_store(path):
        unreadable = store_format(str(path)) == "hdf5" and Path(str(path)).is_file()
        why = (" (or cannot be opened to tell: another process may hold it, or it is truncated or damaged; if it "
               "is a store of yours, remove it yourself)") if unreadable else ""
        raise StoreError(f"{path} is not a samcache store{why}, so --overwrite will not delete it (nothing was "
                         "touched); choose another output path")
    if "://" in str(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(path))
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    p = Path(str(path))
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
