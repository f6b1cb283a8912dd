"""The image's region of the 64x64 embedding grid, and statistics of an embedding over it.

One definition, used by the trainer's paired crops (:mod:`trainer.data`), its fusion head
(``--fuse``), the study's linear probes, and ``samcache export --pooled``.

A sample's *region* is the part of the grid that sees image rather than padding, as a continuous
box ``x0, y0, x1, y1`` in cell units: ``64*w/max(h,w)`` by ``64*h/max(h,w)`` from the top left
(the SAM frame pads at the bottom and right). A box is cut out of a grid with
``torchvision.ops.roi_align`` (``aligned=True``, 2x2 bilinear samples per output cell).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import roi_align

__all__ = ["GRID", "STATS_GRID", "image_regions", "roi_crop", "grid_stats", "pooled_features"]

GRID = 64
STATS_GRID = 16  # statistics are taken over a 16x16 resampling of the region (the mean is the same at any size)


def image_regions(orig_size: np.ndarray) -> np.ndarray:
    """``(N, 4)`` boxes ``x0, y0, x1, y1`` of each image inside the 64x64 grid (no padding)."""
    h, w = orig_size[:, 0].astype(np.float64), orig_size[:, 1].astype(np.float64)
    m = np.maximum(h, w)
    return np.stack([np.zeros_like(h), np.zeros_like(h), GRID * w / m, GRID * h / m], 1)


def roi_crop(x: torch.Tensor, boxes: torch.Tensor, out: int, scale: float) -> torch.Tensor:
    """Cut ``boxes`` (grid units, times ``scale`` in ``x``'s pixels) out of ``x`` at ``out x out``."""
    rois = torch.cat([torch.arange(len(x), device=x.device, dtype=boxes.dtype).view(-1, 1), boxes * scale], 1)
    return roi_align(x, rois.to(x.dtype), output_size=(out, out), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def grid_stats(emb: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-channel statistics over the spatial grid: ``B x C x H x W`` -> ``B x C`` (``mean``) or ``B x 2C`` (``meanstd``)."""
    e = emb.float()
    mean = e.mean((2, 3))
    if kind == "mean":
        return mean
    if kind != "meanstd":
        raise ValueError(f"statistics must be mean or meanstd, got {kind!r}")
    return torch.cat([mean, e.std((2, 3), unbiased=False)], 1)


@torch.no_grad()
def pooled_features(embeddings: np.ndarray | torch.Tensor, orig_size: np.ndarray, kind: str = "mean") -> np.ndarray:
    """Statistics of each embedding over its image region: ``(N, 256)`` or ``(N, 512)`` float32.

    Arguments:
      embeddings: ``(N, 256, G, G)`` (any stored grid); orig_size: ``(N, 2)`` original (height, width).
      kind: ``mean`` or ``meanstd``.
    """
    e = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings).float()
    boxes = torch.as_tensor(image_regions(np.asarray(orig_size)), dtype=torch.float32, device=e.device)
    return grid_stats(roi_crop(e, boxes, STATS_GRID, e.shape[-1] / GRID), kind).cpu().numpy().astype(np.float32)
