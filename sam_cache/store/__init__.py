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
scales); :meth:`EmbeddingStore.read_embeddings` decodes them. Nobody outside this package touches
the arrays: the store reads and writes them through its methods (``read_rows``, ``read_images``,
``write_rows``, ``mark_done``, :class:`MaskSet`), and its backend is private.

The package, bottom up: :mod:`~sam_cache.store.schema` (layout constants, :class:`RowSchema`, the
signature), :mod:`~sam_cache.store.codec` (the one place that knows bytes and CRCs),
:mod:`~sam_cache.store.backends` (Zarr and HDF5), :mod:`~sam_cache.store.mask_sets` (the mask
layer), :mod:`~sam_cache.store.lifecycle` (create, recognise, remove) and
:mod:`~sam_cache.store.embedding_store` (:class:`EmbeddingStore`).

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

from .backends import store_format
from .codec import bytes_per_row, encode_embeddings, pool_to_grid
from .embedding_store import EmbeddingStore
from .mask_sets import DEFAULT_MASK_SET, MaskSet, check_mask_set_name, mask_array
from .schema import (EMBED_SHAPE, GRIDS, SCHEMA_VERSION, SIGNATURE_KEYS, SPLITS, RowSchema, StoreError,
                     StoreMismatchError, contiguous_runs, flatten, signature_digest)

__all__ = ["EmbeddingStore", "RowSchema", "MaskSet", "DEFAULT_MASK_SET", "mask_array", "check_mask_set_name", "StoreError",
           "StoreMismatchError", "SCHEMA_VERSION", "SIGNATURE_KEYS", "SPLITS", "store_format", "bytes_per_row",
           "encode_embeddings", "pool_to_grid", "EMBED_SHAPE", "GRIDS", "contiguous_runs", "flatten", "signature_digest"]
