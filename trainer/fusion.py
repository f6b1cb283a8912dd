"""Fusion (``--fuse mean|meanstd``): what a linear probe on the cache sees, added to the logits.

The per-channel mean (and standard deviation) of the embedding over the image crop, resampled
to the model's embedding grid (:data:`~sam_cache.regions.STATS_GRID`, 16x16, or SLCA's grid
when SLCA is on), standardized by a BatchNorm without affine parameters (a running z-score),
through a linear layer whose logits are added to the backbone's. Adding logits is a linear
head on the concatenated features, and it keeps the backbone's own classifier, so
``slca-train export`` still yields a plain timm model. The layer starts at zero: at
initialization the model is the backbone alone.

An extra of the classifier (:mod:`trainer.extras`) under the name ``fuse``.
"""

from __future__ import annotations

import torch
from torch import nn

from sam_cache.regions import STATS_GRID, grid_stats

from .extras import Extra, register_extra

__all__ = ["EmbeddingStats"]


class EmbeddingStats(Extra):
    """Standardized embedding statistics (``kind``: ``mean`` or ``meanstd``) and the linear head
    that adds them to the logits; ``forward(emb)`` gives those logits."""

    def __init__(self, kind: str, num_classes: int, embed_dim: int = 256):
        super().__init__()
        self.kind = kind
        dim = embed_dim * (1 if kind == "mean" else 2)
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(grid_stats(emb, self.kind)))

    def grid(self) -> tuple[int, bool]:
        return STATS_GRID, False  # the mean is the same at any grid: SLCA's, when it has one, serves

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self(embeddings)

    def describe(self) -> str:
        return f"fused embedding {self.kind}"


@register_extra("fuse", order=20)
def _build(cfg, backbone: nn.Module, num_classes: int, img_size: int) -> EmbeddingStats | None:
    return EmbeddingStats(cfg.fuse, num_classes, cfg.slca.embed_dim) if cfg.fuse != "none" else None
