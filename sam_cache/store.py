"""The embedding store: the versioned contract between extraction and training.

One store holds one (dataset, encoder, preprocessing). Layout, identical in Zarr v3 (default) and
HDF5; ``N`` is the number of images in the dataset manifest, in manifest order:

==============  ======================  ========  ==========================================
array           shape                   dtype     meaning
==============  ======================  ========  ==========================================
embeddings      (N, 256, G, G)          float16   encoder output; one chunk per sample
                                                  (Zarr: ``shard_size`` samples per shard file);
                                                  or bfloat16, float32, or int8 with ``scales``.
                                                  G is 64, or a compact grid (32, 16, 8) made by
                                                  average pooling (``grid`` attribute)
images          (N, 3, R, R)            uint8     optional: the image in the embedding's frame
                                                  (longest side R, zero pad bottom/right)
labels          (N,)                    int64     class index into ``class_names``
ids             (N,)                    str       sample id (path relative to the dataset)
splits          (N,)                    uint8     index into ``SPLITS`` (train, val, test); the names
                                                  are in the attributes too (``split_names``)
orig_size       (N, 2)                  int32     original image (height, width)
valid           (N, 2)                  int32     rows, cols of the 64x64 grid that see image
                                                  (in 64-grid units whatever G is)
window          (N, 2)                  float32   (lo, hi) that mapped a deep image to 8 bits;
                                                  NaN for 8-bit images
done            (N,)                    bool      set only after the sample's rows are written
checksums       (N, 2)                  uint32    CRC-32 of the row's stored embedding bytes
                                                  (with its int8 scales) and of its image bytes
                                                  (0 without images); schema 2 and later
scales          (N, 256)                float32   int8 stores only: per-sample channel scales
masks           (N, 1, R, R)            uint8     optional (``samcache masks``): a SAM mask, 0/1,
                                                  in the images' frame
mask_iou        (N,)                    float32   the decoder's predicted IoU of that mask
mask_box        (N, 4)                  float32   its box prompt, encoder-frame pixels
mask_done       (N,)                    bool      set only after the sample's mask is written
mask_checksums  (N,)                    uint32    CRC-32 of each stored mask's bytes (mask sets
                                                  made before it have none and are not checked)
masks.NAME ...  as the five above       as above  another mask set ``NAME`` (:class:`MaskSet`):
                                                  ``masks.NAME``, ``mask_iou.NAME``, ...
high_res_0, _1  (N, C, H, W) each       float16   SAM 2 stores only: the two projected FPN levels
                                                  its mask decoder needs (``high_res`` attribute:
                                                  their shapes); float32 in a float32 store
high_res_crc    (N,)                    uint32    CRC-32 of each row's high-resolution bytes
meta_created    (bytes,)                uint8     HDF5 only: the attributes as created (JSON),
                                                  written once; read when the attribute is damaged
==============  ======================  ========  ==========================================

Attributes (``attrs["samcache"]``, JSON): ``schema_version``, the signature (``encoder``,
``checkpoint_sha256``, ``random_weights``, ``preprocessing``, ``dtype``, ``manifest_sha256``,
``image_size``), ``class_names``, ``split_info``, ``dataset``, ``package_version``, ``created``,
``skipped``: the images the last run could not decode, each with its id, source and error;
``suspect``: stored images that hold no picture (one colour, stripes), each with its index, id,
source and problem; and,
once masks exist, ``masks``: the ``default`` mask set's own signature (:mod:`sam_cache.masks`), and
``mask_sets``: ``{NAME: signature}`` of the other sets; SAM 2 stores: ``high_res``, the shapes of their
high-resolution levels (:attr:`EmbeddingStore.high_res_shapes`).

Encoding belongs to the store: :meth:`EmbeddingStore.write_rows` takes float embeddings (numpy or
torch, any float dtype) and stores them as the store's ``dtype`` (bfloat16 as raw bits, int8 with
scales); :meth:`EmbeddingStore.read_embeddings` decodes them. Nobody else touches the arrays' bytes.

Integrity: zarr's shards here are uncompressed, so no codec checks their bytes. Each row's
``checksums`` are computed from the exact bytes written, and ``samcache verify`` recomputes them:
a flipped byte in a shard, a deleted shard (zeros) or a truncated one is named by shard and sample.
Schema 1 stores (no checksums) are still read; ``verify`` says that it cannot check their bytes.

Crash safety: Zarr's local store writes every shard file atomically (temporary file + rename),
and ``done`` is written after the data it vouches for, so a process killed at any point leaves a
store that resumes correctly. HDF5 has no such guarantee against a kill; the writer flushes the
rows (which raises on a full disk) *before* it sets their ``done`` flags, so a failed write is
never marked done, and a file damaged by a hard kill is refused with a clear message. HDF5 rewrites
an attribute in place, so a rewrite cut short by a full disk would leave it unreadable: the
attributes are rewritten only when the disk has room for them (refused otherwise, touching
nothing), extraction writes no report after a failed write, and a store whose attribute is
damaged all the same is read from ``meta_created`` (and repaired when opened for writing). While a store
is being made, before its first row, its attributes are only ``{"creating": {"host", "pid"}}``: it
is refused on open, and a later extraction on the same host makes it again when that process is
gone (it holds no row, so nothing is lost); a live or foreign creator is refused.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import zlib
from pathlib import Path

import numpy as np

from .errors import SamcacheError, differences
from .datasets import SPLITS, DatasetManifest

__all__ = ["EmbeddingStore", "MaskSet", "DEFAULT_MASK_SET", "mask_array", "check_mask_set_name", "StoreError", "StoreMismatchError", "SCHEMA_VERSION", "SIGNATURE_KEYS", "store_format",
           "bytes_per_row", "encode_embeddings", "pool_to_grid", "EMBED_SHAPE", "GRIDS"]

SCHEMA_VERSION = 2
EMBED_SHAPE = (256, 64, 64)
SIGNATURE_KEYS = ("encoder", "checkpoint_sha256", "random_weights", "preprocessing", "dtype",
                  "manifest_sha256", "image_size", "grid")
GRIDS = (64, 32, 16, 8)
_DTYPES = ("float16", "float32", "bfloat16", "int8")
_NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int8": "int8",
                 "bfloat16": "uint16"}  # numpy has no bfloat16: the store keeps its raw bits


class StoreError(SamcacheError):
    """A store cannot be created, opened or written as asked."""


class StoreMismatchError(StoreError):
    """A store exists but was made with another encoder, checkpoint, preprocessing or dataset."""


def store_format(path: str | Path) -> str:
    """``"hdf5"`` for ``.h5``/``.hdf5``/``.hdf`` paths, else ``"zarr"``."""
    return "hdf5" if str(path).lower().endswith((".h5", ".hdf5", ".hdf")) else "zarr"


def signature_digest(signature: dict) -> str:
    """sha256 of a store's signature fields: recorded at creation, checked on open."""
    import hashlib

    return hashlib.sha256(json.dumps({k: signature.get(k) for k in SIGNATURE_KEYS}, sort_keys=True).encode()).hexdigest()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
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


def _storage_options(path: str) -> dict | None:
    """fsspec options for a URL store: local ``file://`` folders are created as needed."""
    if "://" not in path:
        return None
    return {"auto_mkdir": True} if path.split("://", 1)[0] in ("file", "local") else {}


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample, per-channel symmetric int8: ``(q, scale)`` with ``x ~ q * scale[..., None, None]``.

    The stored form is 1 MiB a sample instead of float16's 2 MiB; the rounding error of each value
    is at most half its channel's scale (max |x| / 254).
    """
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=(2, 3)) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[:, :, None, None]), -127, 127).astype(np.int8)
    return q, scale


def bytes_per_row(dtype: str, grid: int = 64) -> int:
    """Stored bytes of one embedding in ``dtype`` on a ``grid x grid`` grid (int8 counts its scales)."""
    if dtype not in _DTYPES:
        raise StoreError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    itemsize = np.dtype(_NUMPY_DTYPES[dtype]).itemsize
    return EMBED_SHAPE[0] * grid * grid * itemsize + (EMBED_SHAPE[0] * 4 if dtype == "int8" else 0)


def pool_to_grid(x, grid: int):
    """Average-pool ``(n, 256, 64, 64)`` embeddings (numpy or torch) to ``grid x grid`` (torch out)."""
    import torch
    import torch.nn.functional as F

    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.shape[-1] == grid:
        return t
    if t.shape[-1] % grid:
        raise StoreError(f"cannot pool a {t.shape[-1]}x{t.shape[-1]} grid to {grid}x{grid}")
    return F.avg_pool2d(t.float(), t.shape[-1] // grid)


def encode_embeddings(x, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Float embeddings (numpy or torch) as the store keeps them in ``dtype``: ``(raw, scales)``.

    ``raw`` is float16/float32, the raw bits of bfloat16 as uint16, or int8 with ``scales``
    (otherwise None). Refuses integer input: the store would silently keep nonsense.
    """
    import torch

    if dtype not in _DTYPES:
        raise StoreError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if not t.is_floating_point():
        raise StoreError(f"embeddings must be floating point, got {t.dtype}")
    t = t.detach().cpu()
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).contiguous().view(torch.uint16).numpy(), None
    if dtype == "int8":
        return quantize_int8(t.float().numpy())
    return t.to(getattr(torch, dtype)).contiguous().numpy(), None


def _embedding_crc(raw: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """CRC-32 of each stored embedding row (with its int8 scales)."""
    out = np.zeros(len(raw), dtype=np.uint32)
    for k in range(len(raw)):
        crc = zlib.crc32(np.ascontiguousarray(raw[k]).tobytes())
        if scales is not None:
            crc = zlib.crc32(np.ascontiguousarray(scales[k], dtype=np.float32).tobytes(), crc)
        out[k] = crc
    return out


def _image_crc(images: np.ndarray) -> np.ndarray:
    """CRC-32 of each stored image row."""
    return np.array([zlib.crc32(np.ascontiguousarray(im).tobytes()) for im in images], dtype=np.uint32)


def _high_res_dtype(dtype: str) -> str:
    return "float32" if dtype == "float32" else "float16"


def _high_res_crc(levels: list[np.ndarray]) -> np.ndarray:
    """CRC-32 of each row's high-resolution levels, in order."""
    out = np.zeros(len(levels[0]), dtype=np.uint32)
    for k in range(len(out)):
        crc = 0
        for level in levels:
            crc = zlib.crc32(np.ascontiguousarray(level[k]).tobytes(), crc)
        out[k] = crc
    return out


def _row_checksums(raw: np.ndarray, scales: np.ndarray | None, images: np.ndarray | None) -> np.ndarray:
    """``(n, 2)``: the embedding's and the image's CRC-32 (0 without images)."""
    out = np.zeros((len(raw), 2), dtype=np.uint32)
    out[:, 0] = _embedding_crc(raw, scales)
    if images is not None:
        out[:, 1] = _image_crc(images)
    return out


DEFAULT_MASK_SET = "default"
_MASK_ARRAYS = ("masks", "mask_iou", "mask_box", "mask_done", "mask_checksums", "mask_head")  # mask_head: learned sets


def mask_array(base: str, mask_set: str = DEFAULT_MASK_SET) -> str:
    """The array name of ``base`` (``masks``, ``mask_iou``, ...) in the mask set ``mask_set``:
    ``base`` itself in the ``default`` set (the layout of stores made before sets existed),
    ``base.NAME`` in another."""
    return base if mask_set == DEFAULT_MASK_SET else f"{base}.{mask_set}"


def _mask_set_of(name: str) -> str | None:
    """The mask set whose masks array ``name`` is (``masks`` -> default, ``masks.gt`` -> gt), else None."""
    if name == "masks":
        return DEFAULT_MASK_SET
    if name.startswith("masks."):
        return name[len("masks."):]
    return None


def check_mask_set_name(name: str) -> str:
    """``name`` when it is a valid mask-set name (1-40 letters, digits, ``_`` or ``-``).

    Raises:
      StoreError: any other name (it becomes part of array names in both formats).
    """
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name):
        raise StoreError(f"mask set name {name!r} must be 1-40 letters, digits, '_' or '-'")
    return name


class MaskSet:
    """One named set of masks in a store: its arrays and its signature.

    A store holds any number of sets (ground truth, decoded, learned...), each made by one
    ``samcache masks`` command and named by its ``--mask-set`` (default ``default``). Training,
    measurement and the overlays name the set they read. The ``default`` set keeps the array names
    of the layout table (``masks``, ``mask_iou``, ``mask_box``, ``mask_done``, ``mask_checksums``)
    and its signature in the ``masks`` attribute; a set ``NAME`` has the same arrays suffixed
    ``.NAME`` and its signature in ``mask_sets[NAME]``.

    Arguments:
      store: an open :class:`EmbeddingStore`.
      name: the set's name (see :func:`check_mask_set_name`).
    """

    def __init__(self, store: "EmbeddingStore", name: str = DEFAULT_MASK_SET):
        self.store = store
        self.name = check_mask_set_name(name)

    def key(self, base: str) -> str:
        """The array name of ``base`` in this set."""
        return mask_array(base, self.name)

    @property
    def signature(self) -> dict | None:
        """The set's signature as recorded (None when the set was never made)."""
        meta = self.store.meta
        if self.name == DEFAULT_MASK_SET:
            return meta.get("masks")
        return (meta.get("mask_sets") or {}).get(self.name)

    def set_signature(self, signature: dict | None) -> None:
        """Record (or, with None, forget) the set's signature in the store's attributes."""
        if self.name == DEFAULT_MASK_SET:
            if signature is None:
                self.store.meta.pop("masks", None)
                self.store._b.set_meta(self.store.meta)
                self.store._b.flush()
            else:
                self.store.update_meta(masks=signature)
            return
        sets = dict(self.store.meta.get("mask_sets") or {})
        if signature is None:
            sets.pop(self.name, None)
        else:
            sets[self.name] = signature
        self.store.update_meta(mask_sets=sets)

    @property
    def exists(self) -> bool:
        """Whether the set's arrays and signature are in the store."""
        return self.signature is not None and self.key("masks") in self.store._b

    @property
    def done(self) -> np.ndarray:
        """``(N,)`` bool: rows whose mask in this set is stored (all False when the set does not exist)."""
        if not self.exists:
            return np.zeros(len(self.store), dtype=bool)
        return np.asarray(self.store._b[self.key("mask_done")][:], dtype=bool)

    @property
    def iou(self) -> np.ndarray:
        """``(N,)`` the decoder's predicted IoU of each mask (0 where none or not decoded)."""
        if not self.exists:
            return np.zeros(len(self.store), np.float32)
        return np.asarray(self.store._b[self.key("mask_iou")][:])

    @property
    def boxes(self) -> np.ndarray:
        """``(N, 4)`` each mask's box prompt in encoder-frame pixels (0 where none)."""
        if not self.exists:
            return np.zeros((len(self.store), 4), np.float32)
        return np.asarray(self.store._b[self.key("mask_box")][:])

    @property
    def has_checksums(self) -> bool:
        """Whether the set's masks carry checksums (sets made since checksums were added)."""
        return self.exists and self.key("mask_checksums") in self.store._b

    def read(self, rows: np.ndarray, verify: bool = True) -> np.ndarray:
        """``(n, 1, R, R)`` uint8 masks of sorted, unique ``rows`` (see :meth:`EmbeddingStore.read_rows`).

        Raises:
          StoreError: the set does not exist, or a mask's bytes do not match its checksum.
        """
        if not self.exists:
            raise StoreError(f"store {self.store.path} has no mask set {self.name!r}"
                             + (f" (it has: {', '.join(self.store.mask_sets)})" if self.store.mask_sets else ""))
        return self.store.read_rows(rows, self.key("masks"), verify=verify)

    def write(self, rows: np.ndarray, masks: np.ndarray, iou: np.ndarray, boxes: np.ndarray) -> None:
        """Write masks of sorted ``rows`` (``(n, 1, R, R)`` 0/1), then set their done flags."""
        b = self.store._b
        rows = np.asarray(rows, dtype=np.int64)
        for pos, start, stop in contiguous_runs(rows):
            sl = slice(pos, pos + stop - start)
            block = np.ascontiguousarray(masks[sl], dtype=np.uint8)
            b[self.key("masks")][start:stop] = block
            b[self.key("mask_iou")][start:stop] = iou[sl]
            b[self.key("mask_box")][start:stop] = boxes[sl]
            if self.key("mask_checksums") in b:
                b[self.key("mask_checksums")][start:stop] = _image_crc(block)
        b.flush()
        for _, start, stop in contiguous_runs(rows):
            b[self.key("mask_done")][start:stop] = np.ones(stop - start, dtype=bool)
        b.flush()

    @property
    def kept_head(self) -> bytes | None:
        """The lesion head a learned set keeps (``torch.save`` bytes), or None."""
        key = self.key("mask_head")
        return np.asarray(self.store._b[key][:]).tobytes() if key in self.store._b else None

    def keep_head(self, data: bytes) -> None:
        """Keep a learned set's lesion head in the set (once; dropped with the set)."""
        raw = np.frombuffer(data, dtype=np.uint8)
        key = self.key("mask_head")
        self.store._b.create_array(key, raw.shape, "uint8", raw.shape)
        self.store._b[key][:] = raw
        self.store._b.flush()

    def drop(self) -> None:
        """Delete the set's arrays and signature; the embeddings and other sets are kept."""
        for base in _MASK_ARRAYS:
            if self.key(base) in self.store._b:
                self.store._b.delete(self.key(base))
        self.set_signature(None)


class _Backend:
    """What both formats share: arrays by name under ``self.root`` (a zarr group or an h5py file)."""

    root = None

    def __getitem__(self, name):
        return self.root[name]

    def __contains__(self, name):
        return name in self.root

    def delete(self, name):
        del self.root[name]


class _ZarrBackend(_Backend):
    def __init__(self, path: str, mode: str, attributes: dict | None = None):
        import zarr

        kwargs = {"attributes": attributes} if attributes is not None else {}
        self.root = zarr.open_group(path, mode=mode, zarr_format=3, storage_options=_storage_options(path), **kwargs)

    def create_array(self, name, shape, dtype, chunks, shards=None):
        kwargs = {"shards": shards} if shards else {}
        fill = "" if dtype is str else 0
        self.root.create_array(name, shape=shape, dtype=dtype, chunks=chunks, compressors=None, fill_value=fill, **kwargs)

    def get_meta(self) -> dict:
        return dict(self.root.attrs.get("samcache", {}))

    def set_meta(self, meta: dict) -> None:
        self.root.attrs["samcache"] = meta

    def read_str(self, name) -> np.ndarray:
        return np.array(self.root[name][:].tolist(), dtype=str)

    def flush(self):
        pass

    def close(self):
        pass


_H5_META_COPY = "meta_created"  # HDF5 only: the attributes as created, the fallback of a damaged attribute


class _H5Backend(_Backend):
    def __init__(self, path: str, mode: str):
        import h5py

        self.path = path
        # No chunk cache when writing: with one, HDF5 writes chunks out only when a dataset handle is
        # closed, and a full disk then surfaces as an ignored error in h5py's __dealloc__ after the
        # rows were marked done. Without it, every write reaches the file at once and raises.
        cache = {} if mode == "r" else {"rdcc_nbytes": 0}
        try:
            self.file = h5py.File(path, {"r": "r", "r+": "r+", "w": "w", "w-": "w-"}[mode], **cache)
        except FileExistsError:
            raise
        except OSError as exc:
            raise StoreError(_h5_open_problem(path, mode, exc)) from exc
        self.root = self.file

    def create_array(self, name, shape, dtype, chunks, shards=None):
        import h5py

        if dtype is str:
            dtype = h5py.string_dtype()
        self.file.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks if len(shape) > 1 or shape[0] else None)

    def get_meta(self) -> dict:
        """The ``samcache`` attribute; if it cannot be read (a rewrite that a full disk cut short),
        the creation record ``meta_created`` instead, with ``self.repaired`` set."""
        self.repaired = False
        try:
            raw = self.file.attrs.get("samcache")
        except (OSError, RuntimeError, KeyError) as exc:
            if _H5_META_COPY not in self.file:
                raise StoreError(f"HDF5 store {self.path}: its samcache attribute cannot be read ({exc}) and the "
                                 "store has no creation record to repair it from (made before samcache 0.2.1)") from None
            self.repaired = True
            return json.loads(bytes(np.asarray(self.file[_H5_META_COPY][:], dtype=np.uint8)).decode())
        return json.loads(raw) if raw is not None else {}

    def set_meta(self, meta: dict) -> None:
        """Write the attributes, refusing up front when the disk cannot hold them: HDF5 rewrites an
        attribute in place, and a rewrite cut short by a full disk leaves it unreadable."""
        text = json.dumps(meta)
        if self.path and "://" not in self.path:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free
            if free < 4 * len(text) + (1 << 20):
                raise StoreError(f"HDF5 store {self.path}: no space left on device to update its attributes "
                                 f"({free} bytes free); nothing was changed. Free some space and rerun")
        self.file.attrs["samcache"] = text

    def record_creation(self, meta: dict) -> None:
        """Keep a copy of the creation-time attributes as a uint8 array, written once: what
        :meth:`get_meta` falls back to when the attribute is damaged."""
        self.file.create_dataset(_H5_META_COPY, data=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))

    def read_str(self, name) -> np.ndarray:
        return np.asarray(self.file[name].asstr()[:], dtype=str)

    def flush(self):
        try:
            self.file.flush()
        except (OSError, RuntimeError) as exc:
            raise StoreError(f"writing HDF5 store {self.path} failed: {exc}") from exc

    def close(self):
        try:
            self.file.close()
        except (OSError, RuntimeError) as exc:
            raise StoreError(f"closing HDF5 store {self.path} failed: {exc}") from exc


def _h5_open_problem(path: str, mode: str, exc: OSError) -> str:
    """The real reason an HDF5 file did not open, and what to do about it."""
    import errno as _errno

    text = str(exc)
    if "lock" in text.lower():
        return (f"HDF5 store {path} is locked by another process (is an extraction or a training run still "
                "using it?). Wait for it to finish; HDF5 allows one writer at a time")
    if getattr(exc, "errno", None) in (_errno.EACCES, _errno.EPERM, _errno.EROFS) or "ermission" in text \
            or "read-only" in text.lower():
        return f"HDF5 store {path} cannot be opened for {'writing' if mode != 'r' else 'reading'}: permission denied ({text})"
    return (f"HDF5 store {path} cannot be opened ({text}). A process killed while writing HDF5 can damage the "
            "file; if so, remove it yourself (--overwrite deletes only a file it can read as a store) and extract again, or use a Zarr store, which survives a kill")


def zarr_exists_error() -> type:
    """The exception zarr raises when ``mode="w-"`` finds something at the path."""
    from zarr.errors import ContainsGroupError

    return ContainsGroupError


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


class EmbeddingStore:
    """A store of SAM embeddings; make one with :meth:`create`, reopen it with :meth:`open`."""

    def __init__(self, path: str, backend, writable: bool):
        self.path = path
        self.format = "hdf5" if isinstance(backend, _H5Backend) else "zarr"
        self._b = backend
        self.writable = writable
        self.meta = backend.get_meta()
        #: True when an HDF5 store's attribute was damaged and its creation record was read instead:
        #: the signature is whole, the reports (skipped, suspect, masks) of later runs are lost
        self.repaired = bool(getattr(backend, "repaired", False))
        if self.repaired and writable:
            backend.set_meta(self.meta)
            backend.flush()
        if self.meta.get("creating"):
            by = self.meta["creating"]
            who = f" by process {by['pid']} on {by['host']}" if isinstance(by, dict) else ""
            raise StoreError(f"{path} is a samcache store that is being created{who}, or whose creation was "
                             "interrupted before any row was written; if no extraction is running, remove it or "
                             "extract with --overwrite to start it over")
        if self.meta.get("schema_version") is None:
            raise StoreError(f"{path} exists and is not a samcache store; choose another path")
        if self.meta["schema_version"] > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {self.meta['schema_version']}; this samcache reads up to "
                f"{SCHEMA_VERSION}. Upgrade samcache"
            )
        self._check_attributes()
        self.labels = np.asarray(backend["labels"][:], dtype=np.int64)
        self.ids = backend.read_str("ids")
        self.splits = np.array(SPLITS)[np.asarray(backend["splits"][:], dtype=np.int64)]
        self.orig_size = np.asarray(backend["orig_size"][:])
        self.valid = np.asarray(backend["valid"][:])
        self.window = np.asarray(backend["window"][:])
        self.done = np.asarray(backend["done"][:], dtype=bool)

    def _check_attributes(self) -> None:
        """Refuse attributes that were edited by hand, or that do not describe the arrays.

        Raises:
          StoreError: the signature does not match its recorded ``signature_sha256``; or the
            ``dtype`` attribute is not one that the ``embeddings`` array (and ``scales``) can hold.
        """
        recorded = self.meta.get("signature_sha256")
        if recorded is not None and recorded != signature_digest(self.signature):
            raise StoreError(f"store {self.path}: its signature attributes ({', '.join(SIGNATURE_KEYS)}) were changed "
                             "after it was made (they no longer match signature_sha256); its embeddings cannot be "
                             "trusted to be what it says. Extract it again")
        dtype = self.meta.get("dtype")
        if dtype not in _DTYPES:
            raise StoreError(f"store {self.path}: dtype attribute {dtype!r} is not one of {_DTYPES}")
        stored = str(self._b["embeddings"].dtype)
        if stored != _NUMPY_DTYPES[dtype] or (dtype == "int8" and "scales" not in self._b):
            raise StoreError(f"store {self.path}: its dtype attribute says {dtype!r}, but the embeddings array holds "
                             f"{stored}{' without scales' if dtype == 'int8' and stored == 'int8' else ''}; the "
                             "attributes were edited or damaged. Extract it again")

    # construction --------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        manifest: DatasetManifest,
        signature: dict,
        dtype: str = "float16",
        image_size: int | None = None,
        shard_size: int = 16,
        block_size: int | None = None,
        manifest_sha256: str | None = None,
        grid: int = 64,
        high_res: tuple[tuple[int, int, int], ...] | None = None,
    ) -> "EmbeddingStore":
        """Create an empty store for ``manifest``; nothing is marked done.

        Arguments:
          path: a ``.zarr`` folder (or any fsspec URL zarr accepts) or an ``.h5`` file.
          manifest: the dataset; its order is the store's row order.
          signature: the encoder's :meth:`Encoder.signature`.
          dtype: ``float16`` (default), ``bfloat16`` or ``float32`` for the embeddings.
          image_size: R, to keep each image at RxR in the embedding's frame; None keeps none.
          shard_size: samples per Zarr shard file (ignored for HDF5).
          block_size: rows per chunk of the small per-sample arrays and per unit of work dealt
            to a distributed rank; a multiple of ``shard_size`` (default: about 1024 rows).
          manifest_sha256: the dataset hash to record (default ``manifest.sha256()``); a store
            converted from another keeps its source's hash.
          grid: the side of the stored embedding grid: 64, or a compact 32, 16 or 8 (average pooled).
          high_res: the shapes of the extra feature levels to keep beside each embedding (the
            encoder's :attr:`~sam_cache.encoders.Encoder.high_res`), or None.

        Raises:
          StoreError: the path exists already, or an argument is out of range.
        """
        path = str(path)
        if cls.exists(path):
            raise StoreError(f"{path} exists already; open it to resume, or remove it first")
        if dtype not in _DTYPES:
            raise StoreError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if shard_size < 1:
            raise StoreError("shard_size must be at least 1")
        if grid not in GRIDS:
            raise StoreError(f"grid must be one of {GRIDS}, got {grid}")
        n = len(manifest)
        block = block_size or shard_size * max(1, 1024 // shard_size)
        if block % shard_size:
            raise StoreError(f"block_size {block} must be a multiple of shard_size {shard_size}")
        fmt = store_format(path)
        # marked from its first byte: a store killed while being made, or read while being made, is known as ours
        try:  # exclusive: two runs that start together never both create (nor delete each other's)
            if fmt == "hdf5":
                b = _H5Backend(path, "w-")
                b.set_meta({"creating": _creator()})
                b.flush()
            else:
                b = _ZarrBackend(path, "w-", attributes={"samcache": {"creating": _creator()}})
        except (FileExistsError, zarr_exists_error()) as exc:
            raise StoreError(f"{path} was created by another process just now (two extractions into one new store?); "
                             "let that one finish, then rerun to resume") from exc
        shape = (EMBED_SHAPE[0], grid, grid)
        shards = (min(shard_size, n),) + shape if fmt == "zarr" else None
        b.create_array("embeddings", (n,) + shape, _NUMPY_DTYPES[dtype], (1,) + shape, shards)
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
            b.create_array(f"high_res_{k}", (n,) + level, _high_res_dtype(dtype), (1,) + level,
                           (min(shard_size, n),) + level if fmt == "zarr" else None)
        if high_res:
            b.create_array("high_res_crc", (n,), "uint32", (min(n, block),))
        b["labels"][:] = manifest.labels
        b["ids"][:] = np.array(manifest.ids, dtype=object if fmt == "hdf5" else str)
        b["splits"][:] = np.array([SPLITS.index(s) for s in manifest.splits], dtype=np.uint8)
        b["window"][:] = np.full((n, 2), np.nan, dtype=np.float32)
        from . import __version__

        meta: dict = {"schema_version": SCHEMA_VERSION}
        meta.update({k: signature.get(k) for k in ("encoder", "checkpoint_sha256", "random_weights", "preprocessing")})
        meta.update(
            dtype=dtype, grid=grid, manifest_sha256=manifest_sha256 or manifest.sha256(), image_size=image_size,
            class_names=list(manifest.class_names), split_names=list(SPLITS), split_info=manifest.split_info,
            dataset={"root": manifest.root, "kind": manifest.kind}, shard_size=shard_size, block_size=block,
            package_version=__version__, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            skipped=[],
        )
        if high_res:
            meta["high_res"] = [[int(v) for v in level] for level in high_res]
        meta["signature_sha256"] = signature_digest({k: meta.get(k, 64 if k == "grid" else None) for k in SIGNATURE_KEYS})
        if fmt == "hdf5":
            b.record_creation(meta)
        b.set_meta(meta)
        b.flush()
        return cls(path, b, writable=True)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "EmbeddingStore":
        """Open an existing store, read-only (``"r"``) or for resuming (``"r+"``).

        Raises:
          StoreError: it does not exist, is not a samcache store, or is damaged.
        """
        path = str(path)
        if not cls.exists(path):
            raise StoreError(f"store {path} does not exist")
        try:
            b = _H5Backend(path, mode) if store_format(path) == "hdf5" else _ZarrBackend(path, mode)
            return cls(path, b, writable=mode != "r")
        except StoreError:
            raise
        except Exception as exc:  # zarr/h5py raise many kinds for a foreign or damaged path
            if not cls.is_store(path):
                raise StoreError(f"{path} exists and is not a samcache store; choose another path") from exc
            raise StoreError(f"{path} is a samcache store that cannot be read: {exc}") from exc

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether something is at ``path`` (a local path; URLs are probed through zarr)."""
        path = str(path)
        if "://" not in path:
            return Path(path).exists()
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        return fs.exists(root)

    @staticmethod
    def is_store(path: str | Path) -> bool:
        """Whether ``path`` holds a samcache store (finished, partial, or interrupted while being made).

        A Zarr folder counts when its group attributes carry ``samcache``; an HDF5 file when it opens
        and its attributes name ``samcache`` (or it holds the ``meta_created`` record). Only what is
        positively a store counts: an HDF5 file that cannot be opened (held by another process,
        truncated, damaged) is not, so ``--overwrite`` never deletes it. Anything else, a dataset
        or a user's folder, is not a store.
        """
        path = str(path)
        if not EmbeddingStore.exists(path):
            return False
        if store_format(path) == "hdf5":
            p = Path(path)
            if not p.is_file():
                return False
            try:
                import h5py

                with h5py.File(p, "r") as f:
                    return "samcache" in f.attrs or _H5_META_COPY in f
            except OSError:
                return False
        try:
            return bool(_ZarrBackend(path, "r").get_meta())
        except Exception:  # not a zarr group at all
            return False

    @staticmethod
    def abandoned_creation(path: str | Path) -> bool:
        """Whether ``path`` is a store whose creation was interrupted by a process that is gone.

        Such a store holds no row (creation ends before the first one is written), so starting it
        over loses nothing. Only a creator on this host whose process no longer exists counts; a
        live creator, one on another host, or a store from before creators were recorded is not
        abandoned as far as this can tell, and is refused on open as before.
        """
        path = str(path)
        if not EmbeddingStore.is_store(path):
            return False
        try:
            b = _H5Backend(path, "r") if store_format(path) == "hdf5" else _ZarrBackend(path, "r")
            try:
                by = b.get_meta().get("creating")
            finally:
                b.close()
        except Exception:  # damaged: not ours to judge here
            return False
        return isinstance(by, dict) and by.get("host") == socket.gethostname() and not _alive(by.get("pid"))

    @staticmethod
    def remove(path: str | Path) -> None:
        """Delete a store (folder, file or URL); what ``--overwrite`` does.

        Raises:
          StoreError: ``path`` exists but is not a samcache store (see :meth:`is_store`):
            nothing is deleted.
        """
        if not EmbeddingStore.exists(path):
            return
        if not EmbeddingStore.is_store(path):
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

    # signature -----------------------------------------------------------------------------
    @property
    def signature(self) -> dict:
        return {k: self.meta.get(k, 64 if k == "grid" else None) for k in SIGNATURE_KEYS}

    def check_signature(self, expected: dict) -> None:
        """Refuse to mix: raise :class:`StoreMismatchError` naming every field that differs."""
        have, want = _flatten(self.signature), _flatten({k: expected.get(k) for k in SIGNATURE_KEYS})
        diffs = differences(have, want)
        if diffs:
            raise StoreMismatchError(
                f"store {self.path} was made differently and will not be mixed:\n  " + "\n  ".join(diffs)
                + "\nWrite to a new --out, or pass --overwrite to start it over."
            )

    # contents ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def block_size(self) -> int:
        """Rows per unit of distributed work (older stores: the whole store)."""
        return int(self.meta.get("block_size") or len(self))

    @property
    def image_size(self) -> int | None:
        return self.meta.get("image_size")

    @property
    def dtype(self) -> str:
        """The stored form of the embeddings: ``float16``, ``bfloat16``, ``float32`` or ``int8``."""
        return self.meta["dtype"]

    @property
    def shard_size(self) -> int:
        """Samples per Zarr shard file (HDF5 stores report the value they were created with)."""
        return int(self.meta.get("shard_size") or 16)

    @property
    def grid(self) -> int:
        """The side of the stored embedding grid: 64, or a compact 32, 16 or 8."""
        return int(self.meta.get("grid", 64))

    @property
    def embed_shape(self) -> tuple[int, int, int]:
        """``(256, G, G)``."""
        return (EMBED_SHAPE[0], self.grid, self.grid)

    @property
    def bytes_per_row(self) -> int:
        """Stored bytes of one sample's embedding, int8 scales included."""
        return bytes_per_row(self.dtype, self.grid)

    @property
    def mask_sets(self) -> dict[str, dict]:
        """The store's mask sets: ``{name: signature}`` (``default`` first when it exists)."""
        out = {DEFAULT_MASK_SET: self.meta["masks"]} if "masks" in self.meta and "masks" in self._b else {}
        for name, sig in (self.meta.get("mask_sets") or {}).items():
            if mask_array("masks", name) in self._b:
                out[name] = sig
        return out

    def mask_set(self, name: str = DEFAULT_MASK_SET) -> "MaskSet":
        """The mask set ``name`` (it may not exist yet: see :attr:`MaskSet.exists`).

        Raises:
          StoreError: ``name`` is not a valid set name (letters, digits, ``_`` and ``-``).
        """
        return MaskSet(self, name)

    @property
    def has_masks(self) -> bool:
        """Whether the ``default`` mask set exists (see :mod:`sam_cache.masks`)."""
        return self.mask_set().exists

    @property
    def mask_done(self) -> np.ndarray:
        """``(N,)`` bool: rows whose ``default`` mask is stored (all False without masks)."""
        return self.mask_set().done

    @property
    def has_mask_checksums(self) -> bool:
        """Whether the ``default`` masks carry checksums (mask sets made since they were added)."""
        return self.mask_set().has_checksums

    @property
    def has_checksums(self) -> bool:
        """Whether rows carry checksums (schema 2 and later)."""
        return "checksums" in self._b

    def update_meta(self, **fields) -> None:
        """Merge ``fields`` into the store's attributes and write them (needs a writable store).

        Refuses to change the schema version or a signature field: those define what the rows are.
        """
        if not self.writable:
            raise StoreError(f"store {self.path} is open read-only")
        frozen = set(fields) & (set(SIGNATURE_KEYS) | {"schema_version"})
        if frozen:
            raise StoreError(f"{', '.join(sorted(frozen))} cannot be changed in an existing store")
        self.meta.update(fields)
        self._b.set_meta(self.meta)
        self._b.flush()

    @property
    def embeddings(self):
        """The ``(N, 256, 64, 64)`` array; index it like numpy (reads only what is asked)."""
        return self._b["embeddings"]

    @property
    def images(self):
        """The ``(N, 3, R, R)`` uint8 array, or None when the store keeps no images."""
        return self._b["images"] if "images" in self._b else None

    @property
    def high_res_shapes(self) -> list[tuple[int, int, int]] | None:
        """The shapes of the high-resolution levels kept beside each embedding (SAM 2), or None."""
        levels = self.meta.get("high_res")
        return [tuple(level) for level in levels] if levels else None

    def read_high_res(self, indices: np.ndarray, verify: bool = True) -> list[np.ndarray]:
        """Rows ``indices`` (sorted, unique) of each high-resolution level, as stored (float16).

        Raises:
          StoreError: the store keeps no such levels; or, with ``verify``, done rows whose bytes do
            not match ``high_res_crc`` (a damaged shard), named by sample.
        """
        shapes = self.high_res_shapes
        if not shapes:
            raise StoreError(f"store {self.path} keeps no high-resolution feature levels (only SAM 2 stores made "
                             "by `samcache extract` do)")
        indices = np.asarray(indices, dtype=np.int64)
        out: list[list[np.ndarray]] = [[] for _ in shapes]
        for _, start, stop in contiguous_runs(indices):
            levels = [np.asarray(self._b[f"high_res_{k}"][start:stop]) for k in range(len(shapes))]
            if verify:
                bad = np.flatnonzero((_high_res_crc(levels) != np.asarray(self._b["high_res_crc"][start:stop]))
                                     & self.done[start:stop])
                if len(bad):
                    raise StoreError(f"store {self.path}: the high-resolution levels of {len(bad)} sample(s) do not "
                                     "match their checksums (a damaged shard): samples "
                                     + ", ".join(f"{start + int(r)} ({self.ids[start + int(r)]})" for r in bad[:5]))
            for k, level in enumerate(levels):
                out[k].append(level)
        return [np.concatenate(parts) if parts else np.zeros((0,) + shape, dtype=np.float16)
                for parts, shape in zip(out, shapes)]

    def read_embeddings(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as float16/float32 numpy (bfloat16 and int8 are widened to float32)."""
        return self._decode(np.asarray(self.embeddings[start:stop]), start, stop)

    def stored_checksums(self, start: int, stop: int) -> np.ndarray:
        """``(stop - start, 2)`` CRC-32 of rows as they are on disk now (embedding, image).

        Compare with :meth:`recorded_checksums` to find corrupted rows; see the module docstring.
        """
        emb = np.asarray(self.embeddings[start:stop])
        scales = np.asarray(self._b["scales"][start:stop]) if self.dtype == "int8" else None
        images = np.asarray(self.images[start:stop]) if self.images is not None else None
        return _row_checksums(emb, scales, images)

    def recorded_checksums(self, start: int, stop: int) -> np.ndarray | None:
        """The checksums written with rows ``start:stop``, or None for a schema 1 store."""
        return np.asarray(self._b["checksums"][start:stop]) if self.has_checksums else None

    def read_rows(self, indices: np.ndarray, name: str = "embeddings", verify: bool = True) -> np.ndarray:
        """Rows ``indices`` (sorted, unique) of ``embeddings``, ``images`` or a mask set's masks
        (``masks``, or ``masks.NAME`` for the set ``NAME``: :meth:`MaskSet.read`), read run by run.

        Embeddings come back as :meth:`read_embeddings` gives them (bfloat16 and int8 widened).
        With ``verify`` (default), each row's stored bytes are checked against the checksum
        recorded when it was written (schema 2 stores; masks since ``mask_checksums``).

        Raises:
          StoreError: rows whose bytes do not match their checksum (a corrupted, truncated or
            deleted shard), named with the shard and the samples. Masks are checked against
            ``mask_checksums`` where their set has them.
        """
        indices = np.asarray(indices, dtype=np.int64)
        column = {"embeddings": 0, "images": 1}.get(name)
        masks = _mask_set_of(name)
        check = verify and ((column is not None and self.has_checksums)
                            or (masks is not None and self.mask_set(masks).has_checksums))
        parts = []
        for _, start, stop in contiguous_runs(indices):
            try:
                raw = np.asarray(self._b[name][start:stop])
            except Exception as exc:  # zarr and h5py raise many kinds for a truncated or damaged file
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise StoreError(f"store {self.path}: {name} of rows {start}-{stop - 1} cannot be read ({first}); a shard "
                                 f"file may be truncated or damaged: run `samcache verify {self.path}`") from None
            if check:
                self._verify(name, column, start, stop, raw)
            if name == "embeddings":
                parts.append(self._decode(raw, start, stop))
            else:
                parts.append(raw)
        if parts:
            return np.concatenate(parts)
        return np.zeros((0,) + tuple(self._b[name].shape[1:]), dtype=self._b[name].dtype)

    def _decode(self, raw: np.ndarray, start: int, stop: int) -> np.ndarray:
        if self.dtype == "int8":
            return raw.astype(np.float32) * np.asarray(self._b["scales"][start:stop])[:, :, None, None]
        if self.dtype == "bfloat16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw

    def _verify(self, name: str, column: int, start: int, stop: int, raw: np.ndarray) -> None:
        scales = np.asarray(self._b["scales"][start:stop]) if name == "embeddings" and self.dtype == "int8" else None
        have = _embedding_crc(raw, scales) if name == "embeddings" else _image_crc(raw)
        masks = _mask_set_of(name)
        if masks is not None:
            ms = self.mask_set(masks)
            want, vouched = np.asarray(self._b[ms.key("mask_checksums")][start:stop]), ms.done[start:stop]
        else:
            want, vouched = np.asarray(self._b["checksums"][start:stop])[:, column], self.done[start:stop]
        bad = np.flatnonzero((have != want) & vouched)
        if len(bad):
            rows = start + bad
            shard = self.shard_size if self.format == "zarr" else 1
            shards = sorted({int(r) // shard for r in rows})
            raise StoreError(
                f"store {self.path}: {name} of {len(rows)} sample(s) do not match their checksums (corrupted, "
                f"truncated or deleted shard file(s) {', '.join(f'{name}/c/{s}/0/0/0' for s in shards[:5])}): "
                f"samples {', '.join(f'{int(r)} ({self.ids[int(r)]})' for r in rows[:5])}. Run `samcache verify "
                f"{self.path}` for the full list, and extract those samples again")

    def require_complete(self, allow_partial: bool = False) -> int:
        """The number of done rows; an incomplete store is refused unless ``allow_partial``.

        Raises:
          StoreError: some rows are not done (an extraction still running, stopped early, or
            images that were skipped), saying how many and how to go on.
        """
        done, n = int(self.done.sum()), len(self)
        if done < n and not allow_partial:
            skipped = len(self.meta.get("skipped") or [])
            why = f" ({skipped} image(s) could not be read and were skipped)" if skipped else ""
            raise StoreError(f"store {self.path} is incomplete: {done} of {n} samples are done{why} (its extraction is "
                             "still running, or stopped early). Finish it with the same `samcache extract` command "
                             "(it resumes), or pass --allow-partial to use the done samples only")
        return done

    def split_indices(self, split: str, done_only: bool = True) -> np.ndarray:
        """Row indices in ``split`` (``train``/``val``/``test``), by default only done rows."""
        mask = self.splits == split
        if done_only:
            mask &= self.done
        return np.flatnonzero(mask)

    # writing -------------------------------------------------------------------------------
    def write_rows(self, start: int, embeddings, orig_size: np.ndarray, valid: np.ndarray,
                   window: np.ndarray, images: np.ndarray | None = None, high_res=None) -> None:
        """Write rows ``start:start+len(embeddings)`` of every per-sample array; ``done`` is untouched.

        Arguments:
          start: the first row.
          embeddings: ``(n, 256, G, G)`` floats, numpy or torch, in any float dtype; the store
            encodes them as its own ``dtype`` (see the module docstring). ``(n, 256, 64, 64)``
            rows are average-pooled to a compact store's grid.
          orig_size, valid, window: ``(n, 2)`` per-sample geometry, as in the layout table.
          images: ``(n, 3, R, R)`` uint8 when the store keeps images.
          high_res: the rows' high-resolution levels (a list of ``(n, C, H, W)`` floats, numpy or
            torch), required by a store that keeps them and refused by one that does not.

        The rows are flushed to disk before this returns, so that a full disk raises here, before
        :meth:`mark_done` can vouch for them.

        Raises:
          StoreError: the store is read-only, or the rows have the wrong shape or a non-float dtype.
        """
        if not self.writable:
            raise StoreError(f"store {self.path} is open read-only")
        if self.grid != 64 and tuple(embeddings.shape[-2:]) == (64, 64):
            embeddings = pool_to_grid(embeddings, self.grid)
        raw, scales = encode_embeddings(embeddings, self.dtype)
        if tuple(raw.shape[1:]) != self.embed_shape:
            raise StoreError(f"rows of shape {tuple(raw.shape[1:])} do not fit the store's {self.embed_shape}")
        stop = start + len(raw)
        shapes = self.high_res_shapes
        if (high_res is not None) != bool(shapes):
            raise StoreError(f"store {self.path} {'keeps' if shapes else 'keeps no'} high-resolution levels; rows "
                             f"{'without' if shapes else 'with'} them do not fit")
        if shapes:
            hr_dtype = _high_res_dtype(self.dtype)
            levels = [np.ascontiguousarray(level.float().numpy() if hasattr(level, "numpy") else level, dtype=hr_dtype)
                      for level in high_res]
            if [tuple(level.shape) for level in levels] != [(len(raw),) + s for s in shapes]:
                raise StoreError(f"high-resolution rows of shapes {[tuple(v.shape[1:]) for v in levels]} do not fit "
                                 f"the store's {shapes}")
            for k, level in enumerate(levels):
                self._b[f"high_res_{k}"][start:stop] = level
            self._b["high_res_crc"][start:stop] = _high_res_crc(levels)
        if scales is not None:
            self._b["scales"][start:stop] = scales
        self._b["embeddings"][start:stop] = raw
        keep_images = images is not None and "images" in self._b
        if keep_images:
            images = np.ascontiguousarray(images, dtype=np.uint8)
            self._b["images"][start:stop] = images
        self._b["orig_size"][start:stop] = orig_size
        self._b["valid"][start:stop] = valid
        self._b["window"][start:stop] = window
        if self.has_checksums:
            self._b["checksums"][start:stop] = _row_checksums(raw, scales, images if keep_images else None)
        self._b.flush()

    def mark_done(self, indices: np.ndarray) -> None:
        """Set the done flag of ``indices``; call only after their rows are written."""
        indices = np.sort(np.asarray(indices, dtype=np.int64))
        for _, start, stop in contiguous_runs(indices):  # only these rows: other ranks own the rest
            self._b["done"][start:stop] = np.ones(stop - start, dtype=bool)
        self._b.flush()
        self.done[indices] = True  # in memory only once the flags are on disk

    def prepare_masks(self, signature: dict, overwrite: bool = False, mask_set: str = DEFAULT_MASK_SET) -> "MaskSet":
        """Make the arrays of the mask set ``mask_set`` for ``signature``, or check that the existing ones have it.

        Other mask sets are not touched. Returns the set.

        Raises:
          StoreError: the store keeps no images or is read-only; or the set exists with another
            signature and not ``overwrite`` (which deletes only that set's arrays and starts them over).
        """
        if not self.writable:
            raise StoreError(f"store {self.path} is open read-only")
        if self.image_size is None:
            raise StoreError(f"store {self.path} keeps no images, so masks have no frame")
        ms = self.mask_set(mask_set)
        have = ms.signature
        if have is not None and have != signature:
            if not overwrite:
                named = "" if mask_set == DEFAULT_MASK_SET else f" in its mask set {mask_set!r}"
                raise StoreError(f"store {self.path} has masks made differently{named}:\n  "
                                 + "\n  ".join(differences(_flatten(have), _flatten(signature)))
                                 + "\nPass --overwrite to replace these masks (the embeddings and other mask sets are "
                                 "kept), or --mask-set NAME to keep both")
            ms.drop()
            have = None
        if have is None or ms.key("masks") not in self._b:
            n, r = len(self), self.image_size
            block = min(n, self.block_size)
            shape = (1, r, r)
            self._b.create_array(ms.key("masks"), (n,) + shape, "uint8", (1,) + shape,
                                 (min(self.shard_size, n),) + shape if self.format == "zarr" else None)
            self._b.create_array(ms.key("mask_iou"), (n,), "float32", (block,))
            self._b.create_array(ms.key("mask_box"), (n, 4), "float32", (block, 4))
            self._b.create_array(ms.key("mask_done"), (n,), "bool", (block,))
            self._b.create_array(ms.key("mask_checksums"), (n,), "uint32", (block,))
            ms.set_signature(signature)
        return ms

    def write_masks(self, rows: np.ndarray, masks: np.ndarray, iou: np.ndarray, boxes: np.ndarray,
                    mask_set: str = DEFAULT_MASK_SET) -> None:
        """Write masks of sorted ``rows`` (``(n, 1, R, R)`` 0/1) into ``mask_set``, then set their done flags."""
        self.mask_set(mask_set).write(rows, masks, iou, boxes)

    @property
    def mask_iou(self) -> np.ndarray:
        """``(N,)`` predicted IoU of each ``default`` mask (0 where none)."""
        return self.mask_set().iou

    def set_skipped(self, skipped: list[dict]) -> None:
        """Record the images that could not be read in the last run (replaces the old report)."""
        self.update_meta(skipped=skipped)

    def add_suspect(self, suspect: list[dict], redone: np.ndarray) -> None:
        """Record the suspect images of a run that extracted the rows ``redone``: the report of
        earlier runs is kept for the rows this run did not touch (a resumed run adds to it)."""
        touched = set(np.asarray(redone).tolist())
        kept = [s for s in self.meta.get("suspect", []) if s["index"] not in touched]
        self.update_meta(suspect=sorted(kept + list(suspect), key=lambda s: s["index"]))

    def close(self) -> None:
        self._b.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
