"""The mask layer of a store: any number of named mask sets beside the embeddings.

See :class:`MaskSet`. Only :mod:`sam_cache.store` touches a set's arrays.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from ..errors import differences
from .codec import image_crc
from .schema import StoreError, contiguous_runs, flatten

if TYPE_CHECKING:
    from .embedding_store import EmbeddingStore

__all__ = ["DEFAULT_MASK_SET", "MASK_ARRAYS", "MaskSet", "mask_array", "mask_set_of", "check_mask_set_name"]

DEFAULT_MASK_SET = "default"
MASK_ARRAYS = ("masks", "mask_iou", "mask_box", "mask_done", "mask_checksums", "mask_head")  # mask_head: learned sets


def mask_array(base: str, mask_set: str = DEFAULT_MASK_SET) -> str:
    """The array name of ``base`` (``masks``, ``mask_iou``, ...) in the mask set ``mask_set``:
    ``base`` itself in the ``default`` set (the layout of stores made before sets existed),
    ``base.NAME`` in another."""
    return base if mask_set == DEFAULT_MASK_SET else f"{base}.{mask_set}"


def mask_set_of(name: str) -> str | None:
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
        """Record (or, with None, forget) the set's signature in the store's attributes, changing
        this set's entry only: a set another process recorded since this store was opened is kept."""
        def change(meta: dict) -> None:
            if self.name == DEFAULT_MASK_SET:  # the default set's signature is the ``masks`` attribute
                table, key = meta, "masks"
            else:
                table = meta["mask_sets"] = dict(meta.get("mask_sets") or {})
                key = self.name
            if signature is None:
                table.pop(key, None)
            else:
                table[key] = signature

        self.store.meta = self.store._b.change_meta(change)

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
        b.require_writable()
        rows = np.asarray(rows, dtype=np.int64)
        for pos, start, stop in contiguous_runs(rows):
            sl = slice(pos, pos + stop - start)
            block = np.ascontiguousarray(masks[sl], dtype=np.uint8)
            b[self.key("masks")][start:stop] = block
            b[self.key("mask_iou")][start:stop] = iou[sl]
            b[self.key("mask_box")][start:stop] = boxes[sl]
            if self.key("mask_checksums") in b:
                b[self.key("mask_checksums")][start:stop] = image_crc(block)
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
        self.store._b.require_writable()
        raw = np.frombuffer(data, dtype=np.uint8)
        key = self.key("mask_head")
        self.store._b.create_array(key, raw.shape, "uint8", raw.shape)
        self.store._b[key][:] = raw
        self.store._b.flush()

    def prepare(self, signature: dict, overwrite: bool = False) -> "MaskSet":
        """Make the set's arrays for ``signature``, or check that the existing ones have it; returns self.

        Raises:
          StoreError: the store keeps no images or is read-only; or the set exists with another
            signature and not ``overwrite`` (which deletes only this set's arrays and starts them over).
        """
        store = self.store
        store._b.require_writable()
        if store.image_size is None:
            raise StoreError(f"store {store.path} keeps no images, so masks have no frame")
        have = self.signature
        if have is not None and have != signature:
            if not overwrite:
                named = "" if self.name == DEFAULT_MASK_SET else f" in its mask set {self.name!r}"
                raise StoreError(f"store {store.path} has masks made differently{named}:\n  "
                                 + "\n  ".join(differences(flatten(have), flatten(signature)))
                                 + "\nPass --overwrite to replace these masks (the embeddings and other mask sets are "
                                 "kept), or --mask-set NAME to keep both")
            self.drop()
            have = None
        if have is None or self.key("masks") not in store._b:
            n, r, b = len(store), store.image_size, store._b
            block = min(n, store.block_size)
            shape = (1, r, r)
            b.create_array(self.key("masks"), (n,) + shape, "uint8", (1,) + shape,
                           (min(store.shard_size, n),) + shape if store.format == "zarr" else None)
            b.create_array(self.key("mask_iou"), (n,), "float32", (block,))
            b.create_array(self.key("mask_box"), (n, 4), "float32", (block, 4))
            b.create_array(self.key("mask_done"), (n,), "bool", (block,))
            b.create_array(self.key("mask_checksums"), (n,), "uint32", (block,))
            self.set_signature(signature)
        return self

    def drop(self) -> None:
        """Delete the set's arrays and signature; the embeddings and other sets are kept."""
        self.store._b.require_writable()
        for base in MASK_ARRAYS:
            if self.key(base) in self.store._b:
                self.store._b.delete(self.key(base))
        self.set_signature(None)
