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

Residency (:class:`PairedCache`): the rows a run needs are loaded once into GPU memory when they
fit, else into (pinned) host memory when that fits, else streamed from the store (``stream``):
during training, shard by shard through a shuffle buffer (:mod:`trainer.stream`), and per batch
for evaluation. The chosen mode is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import roi_align

from sam_cache.store import EmbeddingStore

from .stream import ShardStream

__all__ = ["AugmentConfig", "PairedCache", "sample_boxes", "paired_views", "image_regions", "plan_residency",
           "cache_bytes"]

GRID = 64


@dataclass
class AugmentConfig:
    """Training augmentation; each moves image and embedding together.

    Arguments:
      hflip: flip left-right with probability 1/2.
      crop_scale: area range of the random resized crop, as fractions of the image region;
        ``(1, 1)`` turns cropping off.
      crop_ratio: aspect-ratio range of the crop (width / height), sampled log-uniformly.
    """

    hflip: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)


def image_regions(orig_size: np.ndarray) -> np.ndarray:
    """``(N, 4)`` boxes ``x0, y0, x1, y1`` of each image inside the 64x64 grid (no padding)."""
    h, w = orig_size[:, 0].astype(np.float64), orig_size[:, 1].astype(np.float64)
    m = np.maximum(h, w)
    return np.stack([np.zeros_like(h), np.zeros_like(h), GRID * w / m, GRID * h / m], 1)


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


def _crop(x: torch.Tensor, boxes: torch.Tensor, out: int, scale: float) -> torch.Tensor:
    rois = torch.cat([torch.arange(len(x), device=x.device, dtype=boxes.dtype).view(-1, 1), boxes * scale], 1)
    return roi_align(x, rois.to(x.dtype), output_size=(out, out), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def paired_views(images: torch.Tensor | None, embeddings: torch.Tensor | None, boxes: np.ndarray, flips: np.ndarray,
                 out_size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Cut the same box out of images and embeddings and flip both alike.

    Arguments:
      images: ``Bx3xRxR`` stored frames (any dtype; resampled in float), or None.
      embeddings: ``Bx256x64x64``, or None (``--no-slca`` needs none).
      boxes: ``(B, 4)`` boxes in grid units; flips: ``(B,)`` bools.
      out_size: the training image side T.

    Returns:
      ``(Bx3xTxT float in 0..255, Bx256x64x64)``; either is None when its input was.
    """
    dev = (images if images is not None else embeddings).device
    b = torch.as_tensor(boxes, dtype=torch.float32, device=dev)
    flipped = torch.as_tensor(np.flatnonzero(flips), device=dev)
    img_out = emb_out = None
    if images is not None:
        img_out = _flip_some(_crop(images.float(), b, out_size, images.shape[-1] / GRID), flipped)
    if embeddings is not None:
        e = embeddings if embeddings.is_cuda and embeddings.dtype == torch.float16 else embeddings.float()
        emb_out = _flip_some(_crop(e, b, GRID, 1.0), flipped)
    return img_out, emb_out


def _flip_some(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Flip the samples at ``index`` left-right, in place: only they are read and written again."""
    if len(index):
        x.index_copy_(0, index, x.index_select(0, index).flip(-1))
    return x


def cache_bytes(store: EmbeddingStore, n: int, embeddings: bool = True) -> int:
    """Bytes that ``n`` rows of ``store`` take in memory (images, and embeddings at 2 or 4 bytes a value)."""
    emb = n * 256 * GRID * GRID * (2 if store.meta["dtype"] != "float32" else 4) if embeddings else 0
    img = n * int(np.prod(store.images.shape[1:])) if store.images is not None else 0
    return emb + img


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


class PairedCache:
    """The rows of a store that a run uses: embeddings, images, labels and image regions.

    Arguments:
      store: an open store with images (``samcache extract --image-size R``).
      indices: store rows, e.g. the union of the train, val and test rows used.
      device: where training runs.
      residency: ``auto``, ``gpu``, ``host`` or ``stream``.
      embeddings: False to leave embeddings out (``--no-slca``).
      budget_fraction: ``auto`` keeps a cache in a memory only under this share of what is free.

    Raises:
      ValueError: the store keeps no images.
    """

    def __init__(self, store: EmbeddingStore, indices: np.ndarray, device: torch.device, residency: str = "auto",
                 embeddings: bool = True, budget_fraction: float = 0.5):
        if store.images is None:
            raise ValueError(f"store {store.path} keeps no images; extract it again with --image-size (e.g. 224)")
        self.store, self.device = store, device
        self.rows = np.asarray(sorted(set(int(i) for i in indices)), dtype=np.int64)
        self.position = {int(r): k for k, r in enumerate(self.rows)}
        self.labels = store.labels[self.rows]
        self.regions = image_regions(store.orig_size[self.rows])
        self.with_embeddings = embeddings
        self.bytes = cache_bytes(store, len(self.rows), embeddings)
        self.mode = residency if residency != "auto" else plan_residency(self.bytes, device, budget_fraction)
        self.emb = self.img = None
        self._stream: ShardStream | None = None
        if self.mode in ("gpu", "host"):
            target = device if self.mode == "gpu" else torch.device("cpu")
            self.img = self._load("images", target)
            self.emb = self._load("embeddings", target) if embeddings else None

    def _read(self, rows: np.ndarray, name: str) -> torch.Tensor:
        t = torch.from_numpy(self.store.read_rows(rows, name))
        if name == "embeddings" and t.dtype == torch.float32 and self.store.meta["dtype"] != "float32":
            t = t.half()  # bfloat16 and int8 stores come back widened; keep the cache at 2 bytes a value
        return t

    def _load(self, name: str, target: torch.device) -> torch.Tensor:
        t = self._read(self.rows, name)
        if target.type == "cuda":
            return t.to(target)
        return t.pin_memory() if self.device.type == "cuda" else t

    def describe(self) -> str:
        where = {"gpu": "GPU memory", "host": "host memory", "stream": "streamed from the store"}[self.mode]
        return f"{len(self.rows)} samples, {self.bytes / 2**20:.0f} MiB, in {where}"

    def start_epoch(self, groups: list[np.ndarray] | None) -> None:
        """Stream the coming epoch buffer by buffer (``groups`` from :func:`trainer.stream.shard_order`).

        Only the ``stream`` mode reads ahead; the others, or ``groups=None``, keep per-batch access.
        """
        self.end_epoch()
        if self.mode == "stream" and groups is not None:
            emb = self.with_embeddings

            def read(rows):
                return self._read(rows, "images"), (self._read(rows, "embeddings") if emb else None)

            self._stream = ShardStream(read, groups, pin=self.device.type == "cuda")

    def end_epoch(self) -> None:
        """Stop the epoch's read-ahead, if any, and free its buffers."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def regions_of(self, store_rows: np.ndarray) -> np.ndarray:
        """Image regions (grid boxes) of ``store_rows``, without touching images or embeddings."""
        return self.regions[[self.position[int(r)] for r in store_rows]]

    def covers(self, store_rows: np.ndarray) -> bool:
        """Whether every row in ``store_rows`` is held by this cache."""
        return all(int(r) in self.position for r in store_rows)

    def batch(self, store_rows: np.ndarray, embeddings: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, np.ndarray]:
        """Images, embeddings (None when asked not to, or not held), labels and regions of
        ``store_rows``, on the device."""
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
        else:
            p = torch.from_numpy(pos).to(self.img.device)
            img = self.img.index_select(0, p)
            emb = self.emb.index_select(0, p) if embeddings else None
        non_blocking = self.device.type == "cuda"
        img = img.to(self.device, non_blocking=non_blocking)
        emb = emb.to(self.device, non_blocking=non_blocking) if emb is not None else None
        labels = torch.from_numpy(self.labels[pos]).to(self.device)
        return img, emb, labels, self.regions[pos]
