"""The embedding store: :class:`EmbeddingStore` reads and writes rows under the store contract.

See :mod:`sam_cache.store` for the layout; the bytes are :mod:`~sam_cache.store.codec`'s, the
formats :mod:`~sam_cache.store.backends`', creation and removal
:mod:`~sam_cache.store.lifecycle`'s and the masks :mod:`~sam_cache.store.mask_sets`'.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import differences
from . import lifecycle
from .backends import H5Backend, open_backend, writer_lock
from .codec import (bytes_per_row, decode_embeddings, embedding_crc, encode_embeddings, high_res_crc,
                    high_res_dtype, image_crc, pool_to_grid, row_checksums)
from .mask_sets import DEFAULT_MASK_SET, MaskSet, mask_array, mask_set_of
from .schema import (EMBED_SHAPE, SCHEMA_VERSION, SIGNATURE_KEYS, SPLITS, RowSchema, StoreError,
                     StoreMismatchError, contiguous_runs, flatten, signature_of)

__all__ = ["EmbeddingStore"]


class EmbeddingStore:
    """A store of SAM embeddings; make one with :meth:`create`, reopen it with :meth:`open`."""

    def __init__(self, path: str, backend):
        self.path = path
        self.format = "hdf5" if isinstance(backend, H5Backend) else "zarr"
        self._b = backend
        self.meta = backend.get_meta()
        #: True when an HDF5 store's attribute was damaged and its creation record was read instead:
        #: the signature is whole, the reports (skipped, suspect, masks) of later runs are lost
        self.repaired = bool(getattr(backend, "repaired", False))
        if self.repaired and self.writable:
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
        lifecycle.check_attributes(path, self.meta, backend)
        self.labels = np.asarray(backend["labels"][:], dtype=np.int64)
        self.ids = backend.read_str("ids")
        self.splits = np.array(SPLITS)[np.asarray(backend["splits"][:], dtype=np.int64)]
        self.orig_size = np.asarray(backend["orig_size"][:])
        self.valid = np.asarray(backend["valid"][:])
        self.window = np.asarray(backend["window"][:])
        self.done = np.asarray(backend["done"][:], dtype=bool)

    # life on disk (sam_cache.store.lifecycle) ---------------------------------------------------
    create = classmethod(lifecycle.create)
    exists = staticmethod(lifecycle.exists)
    is_store = staticmethod(lifecycle.is_store)
    abandoned_creation = staticmethod(lifecycle.abandoned_creation)
    remove = staticmethod(lifecycle.remove)
    writer_lock = staticmethod(writer_lock)

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
            b = open_backend(path, mode)
            return cls(path, b)
        except StoreError:
            raise
        except Exception as exc:  # zarr/h5py raise many kinds for a foreign or damaged path
            if lifecycle.metadata_pending(path):
                raise StoreError(f"{path} is empty, or is a store that is being created (zarr has not written its "
                                 "metadata yet); if no extraction is running, remove it or choose another path") from exc
            if not cls.is_store(path):
                raise StoreError(f"{path} exists and is not a samcache store; choose another path") from exc
            raise StoreError(f"{path} is a samcache store that cannot be read: {exc}") from exc

    # signature -----------------------------------------------------------------------------
    @property
    def signature(self) -> dict:
        return signature_of(self.meta)

    def check_signature(self, expected: dict) -> None:
        """Refuse to mix: raise :class:`StoreMismatchError` naming every field that differs."""
        have, want = flatten(self.signature), flatten({k: expected.get(k) for k in SIGNATURE_KEYS})
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
    def writable(self) -> bool:
        """Whether the store was opened for writing (``create``, or ``open`` with ``"r+"``)."""
        return self._b.writable

    @property
    def has_checksums(self) -> bool:
        """Whether rows carry checksums (schema 2 and later)."""
        return "checksums" in self._b

    def update_meta(self, **fields) -> None:
        """Merge ``fields`` into the store's attributes and write them; a read-only store refuses.

        Refuses to change the schema version or a signature field: those define what the rows are.
        The merge is into the attributes as they are on disk now, under the store's lock, so what
        another process wrote since this one opened the store is kept (``Backend.change_meta``).
        """
        frozen = set(fields) & (set(SIGNATURE_KEYS) | {"schema_version"})
        if frozen:
            raise StoreError(f"{', '.join(sorted(frozen))} cannot be changed in an existing store")
        self.meta = self._b.change_meta(lambda meta: meta.update(fields))

    @property
    def embeddings_shape(self) -> tuple[int, ...]:
        """The shape of the stored ``embeddings`` array as it is on disk: ``(N, 256, G, G)``."""
        return tuple(self._b["embeddings"].shape)

    @property
    def has_images(self) -> bool:
        """Whether the store keeps each image (``images``, ``(N, 3, R, R)`` uint8)."""
        return "images" in self._b

    def row_schema(self) -> RowSchema:
        """The store's rows as :meth:`create` takes them: to make another store of the same rows."""
        return RowSchema(ids=list(self.ids), labels=self.labels, splits=list(self.splits), class_names=self.class_names,
                         manifest_sha256=self.meta["manifest_sha256"], split_info=self.meta.get("split_info") or {},
                         dataset=dict(self.meta.get("dataset") or {}))

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
                bad = np.flatnonzero((high_res_crc(levels) != np.asarray(self._b["high_res_crc"][start:stop]))
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
        return self._decode(np.asarray(self._b["embeddings"][start:stop]), start, stop)

    def read_images(self, start: int, stop: int) -> np.ndarray | None:
        """Rows ``start:stop`` of the stored images as they are (uint8), or None without images;
        :meth:`read_rows` reads them checked against their checksums."""
        return np.asarray(self._b["images"][start:stop]) if self.has_images else None

    def stored_checksums(self, start: int, stop: int) -> np.ndarray:
        """``(stop - start, 2)`` CRC-32 of rows as they are on disk now (embedding, image).

        Compare with :meth:`recorded_checksums` to find corrupted rows; see the module docstring.
        """
        emb = np.asarray(self._b["embeddings"][start:stop])
        scales = np.asarray(self._b["scales"][start:stop]) if self.dtype == "int8" else None
        return row_checksums(emb, scales, self.read_images(start, stop))

    def recorded_checksums(self, start: int, stop: int) -> np.ndarray | None:
        """The checksums written with rows ``start:stop``, or None for a schema 1 store."""
        return np.asarray(self._b["checksums"][start:stop]) if self.has_checksums else None

    def content_digest(self) -> str | None:
        """sha256 (16 hex digits) of what the rows hold: their recorded checksums, ids, labels, splits
        and done flags. Two stores with one digest hold the same bytes for the same samples (a store
        extracted again gives the same digest only if its encoder gave the same bytes). None for a
        schema 1 store, which records no checksums."""
        if not self.has_checksums:
            return None
        h = hashlib.sha256(np.ascontiguousarray(self.recorded_checksums(0, len(self)), dtype="<u4").tobytes())
        for part in (self.labels.astype("<i8"), np.asarray(self.done, dtype=bool)):
            h.update(np.ascontiguousarray(part).tobytes())
        h.update(json.dumps([list(self.ids), list(map(str, self.splits))]).encode())
        return h.hexdigest()[:16]

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
        masks = mask_set_of(name)
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
        scales = np.asarray(self._b["scales"][start:stop]) if self.dtype == "int8" else None
        return decode_embeddings(raw, self.dtype, scales)

    def _verify(self, name: str, column: int, start: int, stop: int, raw: np.ndarray) -> None:
        scales = np.asarray(self._b["scales"][start:stop]) if name == "embeddings" and self.dtype == "int8" else None
        have = embedding_crc(raw, scales) if name == "embeddings" else image_crc(raw)
        masks = mask_set_of(name)
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
        self._b.require_writable()
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
            hr_dtype = high_res_dtype(self.dtype)
            levels = [np.ascontiguousarray(level.float().numpy() if hasattr(level, "numpy") else level, dtype=hr_dtype)
                      for level in high_res]
            if [tuple(level.shape) for level in levels] != [(len(raw),) + s for s in shapes]:
                raise StoreError(f"high-resolution rows of shapes {[tuple(v.shape[1:]) for v in levels]} do not fit "
                                 f"the store's {shapes}")
            for k, level in enumerate(levels):
                self._b[f"high_res_{k}"][start:stop] = level
            self._b["high_res_crc"][start:stop] = high_res_crc(levels)
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
            self._b["checksums"][start:stop] = row_checksums(raw, scales, images if keep_images else None)
        self._b.flush()

    def mark_done(self, indices: np.ndarray) -> None:
        """Set the done flag of ``indices``; call only after their rows are written."""
        self._b.require_writable()
        indices = np.sort(np.asarray(indices, dtype=np.int64))
        for _, start, stop in contiguous_runs(indices):  # only these rows: other ranks own the rest
            self._b["done"][start:stop] = np.ones(stop - start, dtype=bool)
        self._b.flush()
        self.done[indices] = True  # in memory only once the flags are on disk

    def prepare_masks(self, signature: dict, overwrite: bool = False, mask_set: str = DEFAULT_MASK_SET) -> "MaskSet":
        """Make the arrays of the mask set ``mask_set`` for ``signature``, or check that the existing
        ones have it (:meth:`MaskSet.prepare`); other sets are not touched. Returns the set."""
        return self.mask_set(mask_set).prepare(signature, overwrite)

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
