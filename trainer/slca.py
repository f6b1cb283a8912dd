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

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import SLCAConfig
from .errors import BackboneError
from .extras import Extra, register_extra

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


class SLCA(Extra):
    """The gates for the chosen stages, and the embedding pooling they share; an extra of the
    classifier (:mod:`trainer.extras`) under the name ``slca``.

    Arguments:
      config: the :class:`SLCAConfig`.
      stage_channels: ``{stage_index: C_s}`` for the gated stages.

    :meth:`for_backbone` builds it for a backbone and puts the gates into it.
    """

    def __init__(self, config: SLCAConfig, stage_channels: dict[int, int]):
        super().__init__()
        self.config = config
        self.gates = nn.ModuleDict({
            str(s): SLCAGate(config.in_channels, c, config.reduction, config.gate) for s, c in stage_channels.items()
        })
        self._pooled: torch.Tensor | None = None
        self.stages: list[int] = sorted(stage_channels)
        self.stage_names: list[str] = []
        self.channels_last_dim: dict[int, bool] = {}
        self._reductions: dict[int, int] = {}

    @classmethod
    def for_backbone(cls, config: SLCAConfig, backbone: nn.Module, img_size: int) -> "SLCA":
        """Gates for ``backbone``'s stages (``config.stages``, default every stage of stride >= 4),
        hooked into it; a dry run at ``img_size`` finds each stage's layout (NCHW or NHWC).

        Raises:
          BackboneError: the backbone has no ``feature_info``, the stages do not index it, or a
            stage is neither NCHW nor NHWC.
        """
        info = list(getattr(backbone, "feature_info", None) or [])
        if not info:
            raise BackboneError(f"{type(backbone).__name__} has no feature stages (feature_info), so SLCA cannot gate "
                                "it; train it with --no-slca (focus and fusion work without stages)")
        names = [f["module"] for f in info]
        stages = config.stages if config.stages is not None else [i for i, f in enumerate(info) if f["reduction"] >= 4]
        bad = [s for s in stages if not 0 <= s < len(info)]
        if bad or not stages:
            raise BackboneError(f"SLCA stages {stages} do not index this backbone's {len(info)} feature stages "
                                f"({', '.join(names)})")
        stages = sorted(set(stages))
        layouts = _stage_layouts(backbone, info, stages, img_size)
        slca = cls(config, {s: info[s]["num_chs"] for s in stages})
        slca.stage_names, slca.channels_last_dim = names, layouts
        slca._reductions = {s: info[s]["reduction"] for s in stages}
        modules = dict(backbone.named_modules())
        for s in stages:
            modules[names[s]].register_forward_hook(slca._hook(s))
        return slca

    def _hook(self, stage: int):
        def hook(module, inputs, output):
            return self.gate_stage(stage, output, self.channels_last_dim[stage])
        return hook

    def stage_grid(self, stage: int, img_size: int) -> tuple[int, int]:
        """The ``(H, W)`` grid of a gated stage for a square input of ``img_size``."""
        r = self._reductions[stage]
        return img_size // r, img_size // r

    # the extra's protocol (trainer.extras) ------------------------------------------------
    def grid(self) -> tuple[int, bool]:
        """Average pooling reads the ``64/window`` grid (the pipeline pools for it); max needs all 64."""
        return (64 if self.config.pool != "avg" else max(1, 64 // self.config.window)), True

    @contextlib.contextmanager
    def inside(self, embeddings: torch.Tensor):
        self.set_embedding(embeddings)
        try:
            yield
        finally:
            self.set_embedding(None)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """One group at ``lr * lr_mult``, without weight decay (see ``lr_mult`` above)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": 0.0,
                 "lr": lr * self.config.lr_mult, "name": "slca"}]

    def describe(self) -> str:
        c = self.config
        return (f"SLCA on stages {[self.stage_names[s] for s in self.stages]}, window {c.window}, "
                f"pool {c.pool}, gate {c.gate}, lr x{c.lr_mult:g}")

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


def _stage_layouts(backbone: nn.Module, info: list[dict], stages: list[int], img_size: int) -> dict[int, bool]:
    """``{stage: channels_last}`` from one no-grad dry run of ``backbone`` in eval mode."""
    modules = dict(backbone.named_modules())
    shapes, handles = {}, []
    for s in stages:
        handles.append(modules[info[s]["module"]].register_forward_hook(
            lambda m, i, o, s=s: shapes.__setitem__(s, tuple(o.shape))))
    was_training = backbone.training
    in_chans = next(p for p in backbone.parameters() if p.ndim == 4).shape[1]
    try:
        with torch.no_grad():
            backbone.eval()(torch.zeros(1, in_chans, img_size, img_size))
    finally:
        backbone.train(was_training)
        for h in handles:
            h.remove()
    layouts = {}
    for s in stages:
        c, shape = info[s]["num_chs"], shapes[s]
        if len(shape) != 4 or (shape[1] != c and shape[3] != c):
            raise BackboneError(f"stage {info[s]['module']} gives shape {shape}, not {c} channels in NCHW/NHWC")
        # NHWC (Swin) when the last axis holds the channels; if both axes could, ask the model
        layouts[s] = shape[3] == c and (shape[1] != c or getattr(backbone, "output_fmt", "") == "NHWC")
    return layouts


@register_extra("slca", order=10)
def _build(cfg, backbone: nn.Module, num_classes: int, img_size: int) -> SLCA | None:
    return SLCA.for_backbone(cfg.slca, backbone, img_size) if cfg.slca.enabled else None
