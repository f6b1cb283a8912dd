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
fit, else into (pinned) host memory when that fits, else read from the store per batch
(``stream``). The chosen mode is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import roi_align

from sam_cache.store import EmbeddingStore

__all__ = ["AugmentConfig", "PairedCache", "sample_boxes", "paired_views", "image_regions"]

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
    f = torch.as_tensor(flips, device=dev).view(-1, 1, 1, 1)
    img_out = emb_out = None
    if images is not None:
        img_out = _crop(images.float(), b, out_size, images.shape[-1] / GRID)
        img_out = torch.where(f, img_out.flip(-1), img_out)
    if embeddings is not None:
        e = embeddings if embeddings.is_cuda and embeddings.dtype == torch.float16 else embeddings.float()
        emb_out = _crop(e, b, GRID, 1.0)
        emb_out = torch.where(f, emb_out.flip(-1), emb_out)
    return img_out, emb_out


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
        emb_bytes = len(self.rows) * 256 * GRID * GRID * (2 if store.meta["dtype"] != "float32" else 4) * embeddings
        img_bytes = len(self.rows) * int(np.prod(store.images.shape[1:]))
        self.bytes = emb_bytes + img_bytes
        self.mode = residency if residency != "auto" else self._choose(device, budget_fraction)
        self.emb = self.img = None
        if self.mode in ("gpu", "host"):
            target = device if self.mode == "gpu" else torch.device("cpu")
            self.img = self._load("images", target)
            self.emb = self._load("embeddings", target) if embeddings else None

    def _choose(self, device: torch.device, fraction: float) -> str:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.bytes < fraction * free:
                return "gpu"
        try:
            import os

            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 0
        return "host" if self.bytes < fraction * avail else "stream"

    def _load(self, name: str, target: torch.device) -> torch.Tensor:
        rows = self.store.read_rows(self.rows, name)
        t = torch.from_numpy(rows)
        if name == "embeddings" and t.dtype == torch.float32 and self.store.meta["dtype"] != "float32":
            t = t.half()  # bfloat16 stores come back widened; keep the cache at 2 bytes a value
        if target.type == "cuda":
            return t.to(target)
        return t.pin_memory() if self.device.type == "cuda" else t

    def describe(self) -> str:
        where = {"gpu": "GPU memory", "host": "host memory", "stream": "streamed from the store per batch"}[self.mode]
        return f"{len(self.rows)} samples, {self.bytes / 2**20:.0f} MiB, in {where}"

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
        if self.mode == "stream":
            order = np.argsort(store_rows)
            inverse = np.argsort(order)
            img = torch.from_numpy(self.store.read_rows(store_rows[order], "images")[inverse])
            emb = torch.from_numpy(self.store.read_rows(store_rows[order])[inverse]) if embeddings else None
        else:
            p = torch.from_numpy(pos).to(self.img.device)
            img = self.img.index_select(0, p)
            emb = self.emb.index_select(0, p) if embeddings else None
        non_blocking = self.device.type == "cuda"
        img = img.to(self.device, non_blocking=non_blocking)
        emb = emb.to(self.device, non_blocking=non_blocking) if emb is not None else None
        labels = torch.from_numpy(self.labels[pos]).to(self.device)
        return img, emb, labels, self.regions[pos]
