"""A classifier on the cached embedding alone: ``slca-train --backbone none --head attention``.

The linear probes of ``bench/RESULTS.md`` show that the embedding carries most of the class
information. This head reads only it, with no image backbone, so a run costs seconds on a CPU:
the fastest iteration loop, and the baseline any image model with SLCA must beat.

``attention`` (the only head so far): the batch's embedding view (the crop of the grid that the
image's crop covers, resampled to :data:`HEAD_GRID` cells by the batch pipeline, so crops and
flips move the grid as they move the image) is normalised per cell (LayerNorm over the 256
channels); a small MLP scores every cell; the softmax of the scores pools the cells into one
256-vector, joined with their plain mean and standard deviation; dropout and a linear layer give
the logits. 2 k + 1.5 k x classes parameters at the defaults.
"""

from __future__ import annotations

import torch
from torch import nn

from .extras import Extra, register_extra

__all__ = ["HEADS", "HEAD_GRID", "AttentionHead", "create_head"]

HEADS = ("attention",)
HEAD_GRID = 16


class AttentionHead(Extra):
    """``(B, 256, G, G)`` embeddings -> ``(B, num_classes)`` logits by attention pooling over cells.

    An extra of the classifier (:mod:`trainer.extras`) under the name ``head`` that replaces its
    backbone."""

    replaces_backbone = True

    def __init__(self, num_classes: int, embed_dim: int = 256, hidden: int = 64, drop: float = 0.2):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.score = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(3 * embed_dim, num_classes)
        self.num_classes = num_classes

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = self.norm(emb.float().flatten(2).transpose(1, 2))  # B x cells x 256
        weights = torch.softmax(self.score(x), dim=1)          # B x cells x 1
        pooled = (weights * x).sum(1)
        feats = torch.cat([pooled, x.mean(1), x.std(1)], dim=1)
        return self.fc(self.drop(feats))

    def grid(self) -> tuple[int, bool]:
        return HEAD_GRID, True

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self(embeddings)

    def describe(self) -> str:
        return "cache-only head attention on the embedding"

    def attention(self, emb: torch.Tensor) -> torch.Tensor:
        """``(B, G, G)`` the pooling weights of each cell (they sum to 1 per sample)."""
        x = self.norm(emb.float().flatten(2).transpose(1, 2))
        return torch.softmax(self.score(x), dim=1)[..., 0].reshape(emb.shape[0], *emb.shape[2:])


def create_head(name: str, num_classes: int) -> nn.Module:
    """The cache-only head ``name`` (one of :data:`HEADS`).

    Raises:
      ValueError: an unknown head (the config refuses it first, with the choices).
    """
    if name == "attention":
        return AttentionHead(num_classes)
    raise ValueError(f"unknown head {name!r}; known: {', '.join(HEADS)}")


@register_extra("head", order=30)
def _build(cfg, backbone: nn.Module, num_classes: int, img_size: int) -> nn.Module | None:
    return create_head(cfg.head, num_classes) if cfg.backbone == "none" else None
