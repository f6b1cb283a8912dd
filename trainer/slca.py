"""Spatially Localized Channel Attention (SLCA): our design, documented choice by choice.

The SLCA paper (Gu et al., CBMS 2025, arXiv 2505.06217) is public only as an abstract: SAM
features, through "spatially localized channel attention", improve a classification backbone,
most when labels are scarce. What follows is *our reading*; every choice is a flag, and
``--no-slca`` trains the same backbone without it.

::

    E  = cached SAM embedding, 256 x 64 x 64, cropped to the image region (the data pipeline
         does this, together with the augmentation, so E and the image share one frame)
    P  = pool(E, window k)                     local regions: a (64/k) x (64/k) grid
    for each chosen backbone stage s with C_s channels on an H_s x W_s grid:
        Q_s = resize(P, H_s x W_s)             adaptive average pooling when shrinking,
                                               nearest when growing: never a large bilinear
        A_s = sigmoid(MLP_s(Q_s))              1x1 convs 256 -> 256/r -> C_s: per-place,
                                               per-channel weights
        F_s' = F_s * gate(A_s)                 identity at initialization

Choices and their flags (:class:`~trainer.config.SLCAConfig`):

- ``window`` (k, default 4): the side of a local region in embedding cells (4 cells = 64 px of
  a 1024 frame). 1 keeps the full 64x64 grid; 64 collapses it to one global vector, which is
  plain (squeeze-and-excitation style) channel attention computed from SAM features.
- ``pool`` (``avg``, ``max`` or ``avgmax``): how a region is summarized; ``avgmax``
  concatenates both (512 channels into the MLP).
- ``reduction`` (r, default 4): the MLP's bottleneck, ``256 // r`` hidden channels.
- ``stages``: which backbone stages are gated, as indices into timm's ``feature_info``
  (default: every stage with stride >= 4, i.e. all but a stem).
- ``lr_mult`` (``--slca-lr-mult``): the SLCA parameters train in their own optimizer group, at
  this multiple of the learning rate and without weight decay. Gates start at the identity; with
  the backbone's rate and decay they barely move in a short recipe (``bench/gate_strength.py``
  measured 0.2-1 % after 8 epochs), so the group is what lets them act.
- ``gate``: ``scaled`` (default) is ``F * 2*sigmoid(z)`` with the MLP's last layer
  zero-initialized, so ``2*sigmoid(0) = 1`` and the MLP learns from the first step;
  ``residual`` is ``F * (1 + gamma * (2*sigmoid(z) - 1))`` with a per-channel ``gamma``
  initialized at 0 (ReZero style; the MLP keeps its default init).

Where the pooling happens: for ``pool avg`` the data pipeline resamples the crop box straight to
the ``64/k`` grid (:func:`trainer.data.paired_views` with ``emb_size``) instead of to 64x64 and
pooling after; on this project's CPU that was 2.9 s of a 5.8 s ResNet-18 step at 64 px, batch 32.
``max`` and ``avgmax`` need the 64x64 view.

Why resize the pooled map to each stage's grid before the MLP instead of upsampling the
attention afterwards: on an H100, upsampling per-channel attention bilinearly to each stage
took 81 % of the step time; pooling straight to the stage grid costs almost nothing
(``../shared/DESIGN.md``, Performance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SLCAConfig

__all__ = ["SLCAConfig", "SLCAGate", "SLCA", "pool_embedding", "resize_to_grid"]


def pool_embedding(emb: torch.Tensor, window: int, pool: str) -> torch.Tensor:
    """Summarize each ``window x window`` region of the 64-cell grid: ``-> Bx{256|512}x(64/k)x(64/k)``.

    ``emb`` may come at 64x64, or already resampled to the pooled grid by the data pipeline (see
    :attr:`trainer.model.Classifier.embedding_grid`), in which case average pooling is the identity.
    """
    n = max(1, 64 // window)
    parts = []
    if pool in ("avg", "avgmax"):
        parts.append(emb if emb.shape[-1] == n else F.adaptive_avg_pool2d(emb, n))
    if pool in ("max", "avgmax"):
        parts.append(emb if emb.shape[-1] == n else F.adaptive_max_pool2d(emb, n))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def resize_to_grid(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-average to a smaller grid, repeat (nearest) to a larger one, per axis pair."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="nearest")


class SLCAGate(nn.Module):
    """Channel attention for one backbone stage, computed per place from the pooled embedding.

    Arguments:
      in_channels: channels of the pooled embedding (256, or 512 for ``avgmax``).
      out_channels: the stage's channels C_s.
      reduction: bottleneck ratio r.
      gate: ``scaled`` or ``residual`` (both the identity at initialization).
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4, gate: str = "scaled"):
        super().__init__()
        hidden = max(1, 256 // reduction)
        self.gate = gate
        self.mlp = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1), nn.GELU(), nn.Conv2d(hidden, out_channels, 1),
        )
        if gate == "scaled":
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        else:
            self.gamma = nn.Parameter(torch.zeros(out_channels))

    def attention(self, pooled: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``A_s = sigmoid(MLP(resize(P)))``: ``B x C_s x H_s x W_s`` in (0, 1)."""
        return torch.sigmoid(self.mlp(resize_to_grid(pooled, size)))

    def multiplier(self, pooled: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The factor the stage's features are multiplied by; exactly 1 at initialization."""
        a = self.attention(pooled, size)
        if self.gate == "scaled":
            return 2.0 * a
        return 1.0 + self.gamma.view(1, -1, 1, 1) * (2.0 * a - 1.0)


class SLCA(nn.Module):
    """The gates for the chosen stages, and the embedding pooling they share.

    Arguments:
      config: the :class:`SLCAConfig`.
      stage_channels: ``{stage_index: C_s}`` for the gated stages.
    """

    def __init__(self, config: SLCAConfig, stage_channels: dict[int, int]):
        super().__init__()
        self.config = config
        self.gates = nn.ModuleDict({
            str(s): SLCAGate(config.in_channels, c, config.reduction, config.gate) for s, c in stage_channels.items()
        })
        self._pooled: torch.Tensor | None = None

    def set_embedding(self, emb: torch.Tensor | None) -> None:
        """Pool the batch's embeddings once; the stage hooks then read the pooled map."""
        self._pooled = None if emb is None else pool_embedding(emb, self.config.window, self.config.pool)

    def gate_stage(self, stage: int, features: torch.Tensor, channels_last_dim: bool) -> torch.Tensor:
        """Gate one stage's features (``BxCxHxW``, or ``BxHxWxC`` when ``channels_last_dim``)."""
        if self._pooled is None:
            raise RuntimeError("SLCA needs the batch's embeddings: call set_embedding() before the forward pass")
        size = tuple(features.shape[1:3]) if channels_last_dim else tuple(features.shape[-2:])
        m = self.gates[str(stage)].multiplier(self._pooled.to(features.dtype), size).to(features.dtype)
        if channels_last_dim:
            m = m.permute(0, 2, 3, 1)
        return features * m

    @torch.no_grad()
    def attention_maps(self, emb: torch.Tensor, stage: int, size: tuple[int, int]) -> torch.Tensor:
        """Mean over channels of ``|gate - 1|`` at ``stage``: where SLCA changes the features most."""
        pooled = pool_embedding(emb, self.config.window, self.config.pool)
        return (self.gates[str(stage)].multiplier(pooled, size) - 1.0).abs().mean(1)
