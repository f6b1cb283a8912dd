"""Paired data: (image, embedding, label) from a store, with one geometry for both.

Geometry is shared. A sample's *region* is a box in the 64x64 embedding grid, in continuous
cell units: at first the image's own (unpadded) part of the frame, ``64*w/max(h,w)`` by
``64*h/max(h,w)``. Training augmentation picks a random resized crop inside that region and a
horizontal flip. The same box, scaled by ``R/64``, is cut from the stored ``RxR`` image, and both
are resampled with ``torchvision.ops.roi_align`` (``aligned=True``), the embedding to 64x64 and
the image to the training size; then both are flipped or neither is. So embedding cell (i, j)
always describes the same image region before and after the transform. (Bilinear sampling lets
the outermost output row or column of an image that does not fill the frame reach less than half
a stored pixel into the zero padding.)

Masks (``--focus``) travel as a fourth image channel (0 or 1, from ``samcache masks``), so the
one crop and flip that moves the image moves its mask too.

Residency (:class:`PairedCache`): the rows a run needs are loaded once into GPU memory when they
fit, else into (pinned) host memory when that fits, else streamed from the store (``stream``):
during training, shard by shard through a shuffle buffer (:mod:`trainer.stream`), and per batch
for evaluation. The chosen mode is reported. Rows are checked against their stored checksums as
they are loaded, so a corrupted shard stops a run instead of training on it. Host-resident
batches reach a GPU through two pinned staging buffers, so the copy is asynchronous.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sam_cache.regions import GRID, image_regions, roi_crop
from sam_cache.store import EmbeddingStore

from .config import AugmentConfig
from .errors import TrainError
from .stream import ShardStream

__all__ = ["AugmentConfig", "PairedCache", "sample_boxes", "paired_views", "image_regions", "plan_residency",
           "cache_bytes", "mask_regions"]



def mask_regions(masks: np.ndarray, regions: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """Grid boxes around each mask (``(N, 1, R, R)``, nonzero inside), grown by ``margin`` of their
    size on each side and clipped to the image region; an empty mask keeps the whole region."""
    out = np.array(regions, dtype=np.float64, copy=True)
    r = masks.shape[-1]
    for k, m in enumerate(masks[:, 0]):
        ys, xs = np.nonzero(m)
        if not len(ys):
            continue
        x0, x1 = xs.min() * GRID / r, (xs.max() + 1) * GRID / r
        y0, y1 = ys.min() * GRID / r, (ys.max() + 1) * GRID / r
        dx, dy = margin * (x1 - x0), margin * (y1 - y0)
        box = np.array([max(x0 - dx, regions[k, 0]), max(y0 - dy, regions[k, 1]),
                        min(x1 + dx, regions[k, 2]), min(y1 + dy, regions[k, 3])])
        if (box[2:] - box[:2]).min() > 0.5:  # at least half a grid cell each way
            out[k] = box
    return out


def sample_boxes(regions: np.ndarray, aug: AugmentConfig | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes (grid units) and flip flags for a batch; the full regions, unflipped, without ``aug``."""
    n = len(regions)
    if aug is None:
        return regions.copy(), np.zeros(n, dtype=bool)
    boxes = regions.copy()
    rw, rh = regions[:, 2] - regions[:, 0], regions[:, 3] - regions[:, 1]
    area = rng.uniform(*aug.crop_scale, size=n) * rw * rh
    ratio = np.exp(rng.uniform(math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]), size=n))
    cw = np.minimum(np.sqrt(area * ratio), rw)
    ch = np.minimum(np.sqrt(area / ratio), rh)
    x0 = regions[:, 0] + rng.uniform(0, 1, size=n) * (rw - cw)
    y0 = regions[:, 1] + rng.uniform(0, 1, size=n) * (rh - ch)
    boxes[:] = np.stack([x0, y0, x0 + cw, y0 + ch], 1)
    flips = rng.uniform(size=n) < 0.5 if aug.hflip else np.zeros(n, dtype=bool)
    return boxes, flips


def paired_views(images: torch.Tensor | None, embeddings: torch.Tensor | None, boxes: np.ndarray, flips: np.ndarray,
                 out_size: int, emb_size: int = GRID) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Cut the same box out of images and embeddings and flip both alike.

    Arguments:
      images: ``BxCxRxR`` stored frames (any dtype; resampled in float; a fourth channel is a
        mask), or None.
      embeddings: ``Bx256x64x64``, or None (``--no-slca`` needs none).
      boxes: ``(B, 4)`` boxes in grid units; flips: ``(B,)`` bools.
      out_size: the training image side T.
      emb_size: the side G of the embedding view (default 64). A model that only reads the crop
        pooled to a coarser grid (SLCA's average pooling, fusion's statistics) asks for that grid:
        the box is then resampled straight to it (2x2 bilinear samples per cell), not to 64x64
        and pooled after, which on a CPU cost as much as the training step itself.

    Returns:
      ``(BxCxTxT float, Bx256xGxG)``; either is None when its input was.
    """
    dev = (images if images is not None else embeddings).device
    b = torch.as_tensor(boxes, dtype=torch.float32, device=dev)
    flipped = torch.as_tensor(np.flatnonzero(flips), device=dev)
    img_out = emb_out = None
    if images is not None:
        img_out = _flip_some(roi_crop(images.float(), b, out_size, images.shape[-1] / GRID), flipped)
    if embeddings is not None:
        e = embeddings if embeddings.is_cuda and embeddings.dtype == torch.float16 else embeddings.float()
        emb_out = _flip_some(roi_crop(e, b, emb_size, e.shape[-1] / GRID), flipped)  # a compact store's grid too
    return img_out, emb_out


def _flip_some(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Flip the samples at ``index`` left-right, in place: only they are read and written again."""
    if len(index):
        x.index_copy_(0, index, x.index_select(0, index).flip(-1))
    return x


def cache_bytes(store: EmbeddingStore, n: int, embeddings: bool = True, masks: bool = False) -> int:
    """Bytes that ``n`` rows of ``store`` take in memory (images, masks, embeddings at 2 or 4 bytes a value)."""
    emb = n * 256 * store.grid * store.grid * (4 if store.dtype == "float32" else 2) if embeddings else 0
    img = n * 3 * store.image_size ** 2 if store.has_images else 0
    return emb + img + (img // 3 if masks else 0)


def plan_residency(nbytes: int, device: torch.device, fraction: float = 0.5) -> str:
    """``gpu`` when ``nbytes`` is under ``fraction`` of free GPU memory (CUDA only), else ``host``
    when under that share of free host memory, else ``stream``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes < fraction * free:
            return "gpu"
    try:
        import os

        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 0
    return "host" if nbytes < fraction * avail else "stream"


class _PinnedStaging:
    """Two pinned host buffers that batches are gathered into before an asynchronous copy to the GPU.

    ``index_select`` of a pinned tensor returns pageable memory, whose copy to the GPU blocks the
    host. Gathering into a pinned buffer instead lets the copy overlap with compute; a buffer is
    reused two batches later, after the event recorded behind its copy has completed.
    """

    def __init__(self):
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.events: list = [None, None]
        self.turn = 0

    def to_device(self, source: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        k, self.turn = self.turn, 1 - self.turn
        if self.events[k] is not None:
            self.events[k].synchronize()  # the copy out of this buffer has landed
        buf = self.buffers[k]
        if buf is None or buf.dtype != source.dtype or buf.shape[1:] != source.shape[1:] or buf.shape[0] < len(index):
            buf = torch.empty((max(len(index), 1),) + tuple(source.shape[1:]), dtype=source.dtype).pin_memory()
            self.buffers[k] = buf
        staged = buf[: len(index)]
        torch.index_select(source, 0, index, out=staged)
        out = staged.to(device, non_blocking=True)
        self.events[k] = torch.cuda.Event()
        self.events[k].record()
        return out


class PairedCache:
    """The rows of a store that a run uses: embeddings, images (with masks), labels and image regions.

    Arguments:
      store: an open store with images (``samcache extract --image-size R``).
      indices: store rows, e.g. the union of the train, val and test rows used.
      device: where training runs.
      residency: ``auto``, ``gpu``, ``host`` or ``stream``.
      embeddings: False to leave embeddings out (a model without SLCA or fusion).
      masks: the mask set (e.g. ``default``) to carry as a fourth image channel (``--focus``), or None.
      budget_fraction: ``auto`` keeps a cache in a memory only under this share of what is free.

    Use it in a ``with`` block (or call :meth:`close`): a streaming pass holds a reader thread.

    Raises:
      TrainError: the store keeps no images, or lacks masks for a row when masks are asked for.
      StoreError: rows that do not match their checksums.
    """

    def __init__(self, store: EmbeddingStore, indices: np.ndarray, device: torch.device, residency: str = "auto",
                 embeddings: bool = True, masks: str | None = None, budget_fraction: float = 0.5):
        if not store.has_images:
            raise TrainError(f"store {store.path} keeps no images; extract it again with --image-size (e.g. 224)")
        self.store, self.device = store, device
        self.rows = np.asarray(sorted(set(int(i) for i in indices)), dtype=np.int64)
        self.position = {int(r): k for k, r in enumerate(self.rows)}
        self.labels = store.labels[self.rows]
        self.regions = image_regions(store.orig_size[self.rows])
        self.with_embeddings = embeddings
        self.mask_set = masks
        self.with_masks = masks is not None
        self.mask_regions = None
        if masks is not None:
            ms = store.mask_set(masks)
            missing = self.rows[~ms.done[self.rows]]
            if len(missing):
                named = "" if masks == "default" else f" in mask set {masks!r}"
                have = f" (its mask sets: {', '.join(store.mask_sets)})" if store.mask_sets else ""
                raise TrainError(f"store {store.path} has no masks{named} for {len(missing)} of the {len(self.rows)} "
                                 f"samples this run uses{have}; run `samcache masks {store.path}"
                                 + ("" if masks == "default" else f" --mask-set {masks}") + "` first")
            self.mask_regions = mask_regions(ms.read(self.rows), self.regions)
        self.bytes = cache_bytes(store, len(self.rows), embeddings, self.with_masks)
        self.mode = residency if residency != "auto" else plan_residency(self.bytes, device, budget_fraction)
        self.emb = self.img = None
        self._stream: ShardStream | None = None
        self._staging = _PinnedStaging() if self.mode == "host" and device.type == "cuda" else None
        if self.mode in ("gpu", "host"):
            target = device if self.mode == "gpu" else torch.device("cpu")
            self.img = self._load(self.rows, target, "images")
            self.emb = self._load(self.rows, target, "embeddings") if embeddings else None

    def _read(self, rows: np.ndarray, name: str) -> torch.Tensor:
        if name == "images" and self.with_masks:
            img = self.store.read_rows(rows, "images")
            return torch.from_numpy(np.concatenate([img, self.store.mask_set(self.mask_set).read(rows)], 1))
        t = torch.from_numpy(self.store.read_rows(rows, name))
        if name == "embeddings" and t.dtype == torch.float32 and self.store.dtype != "float32":
            t = t.half()  # bfloat16 and int8 stores come back widened; keep the cache at 2 bytes a value
        return t

    def _load(self, rows: np.ndarray, target: torch.device, name: str) -> torch.Tensor:
        t = self._read(rows, name)
        if target.type == "cuda":
            return t.to(target)
        return t.pin_memory() if self.device.type == "cuda" else t

    def describe(self) -> str:
        where = {"gpu": "GPU memory", "host": "host memory", "stream": "streamed from the store"}[self.mode]
        return f"{len(self.rows)} samples, {self.bytes / 2**20:.0f} MiB, in {where}"

    def start_epoch(self, groups: list[np.ndarray] | None) -> None:
        """Stream the coming pass buffer by buffer (``groups`` from :func:`trainer.stream.shard_order`).

        Only the ``stream`` mode reads ahead; the others, or ``groups=None``, keep per-batch access.
        """
        self.end_epoch()
        if self.mode == "stream" and groups is not None:
            emb = self.with_embeddings

            def read(rows):
                return self._read(rows, "images"), (self._read(rows, "embeddings") if emb else None)

            self._stream = ShardStream(read, groups, pin=self.device.type == "cuda")

    def end_epoch(self) -> None:
        """Stop the pass's read-ahead, if any, and free its buffers."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        """Stop any read-ahead; the cache stays usable for per-batch access."""
        self.end_epoch()

    def __enter__(self) -> "PairedCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def regions_of(self, store_rows: np.ndarray, focus_crop: bool = False) -> np.ndarray:
        """Boxes (grid units) to crop ``store_rows`` from: the image regions, or with ``focus_crop``
        the boxes around their masks; nothing is read from the store."""
        pos = [self.position[int(r)] for r in store_rows]
        if focus_crop:
            if self.mask_regions is None:
                raise TrainError("focus crop needs a cache that holds masks")
            return self.mask_regions[pos]
        return self.regions[pos]

    def covers(self, store_rows: np.ndarray) -> bool:
        """Whether every row in ``store_rows`` is held by this cache."""
        return all(int(r) in self.position for r in store_rows)

    def batch(self, store_rows: np.ndarray, embeddings: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Images (with a mask channel when the cache holds masks), embeddings (None when asked not
        to, or not held) and labels of ``store_rows``, on the device."""
        pos = np.array([self.position[int(r)] for r in store_rows])
        embeddings = embeddings and self.with_embeddings
        if self._stream is not None and all(int(r) in self._stream.owner for r in store_rows):
            img, emb = self._stream.take(store_rows)
            emb = emb if embeddings else None
        elif self.mode == "stream":
            order = np.argsort(store_rows)
            inverse = np.argsort(order)
            img = self._read(store_rows[order], "images")[inverse]
            emb = self._read(store_rows[order], "embeddings")[inverse] if embeddings else None
        elif self._staging is not None:  # host memory -> GPU through pinned staging buffers
            p = torch.from_numpy(pos)
            img = self._staging.to_device(self.img, p, self.device)
            emb = self._staging.to_device(self.emb, p, self.device) if embeddings else None
        else:
            p = torch.from_numpy(pos).to(self.img.device)
            img = self.img.index_select(0, p)
            emb = self.emb.index_select(0, p) if embeddings else None
        non_blocking = self.device.type == "cuda"
        img = img.to(self.device, non_blocking=non_blocking)
        emb = emb.to(self.device, non_blocking=non_blocking) if emb is not None else None
        labels = torch.from_numpy(self.labels[pos]).to(self.device)
        return img, emb, labels
