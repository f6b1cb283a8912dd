"""The model: a timm backbone, SLCA gates on its stages, and optional fusion of embedding statistics.

::

    logits = backbone(image [+ mask channel])             SLCA gates act inside, through hooks
           + fuse_head(standardize(stats(E_crop)))        only with --fuse; zero at initialization

- **SLCA** (:mod:`trainer.slca`) multiplies chosen stages' features by gates computed from the
  cached embedding; forward hooks put them in any timm model with ``feature_info`` (ResNets,
  SE-ResNets, ConvNeXts, TinyViT, Swin V2 with its NHWC stages, found by a dry run).
- **Fusion** (``--fuse mean|meanstd``) gives the head what a linear probe on the cache sees: the
  per-channel mean (and standard deviation) of the embedding over the image crop (resampled to
  the model's :attr:`~Classifier.embedding_grid`: 16x16, or SLCA's grid), standardized
  by a BatchNorm without affine parameters (a running z-score), through a linear layer added to
  the backbone's logits. Adding logits is a linear head on the concatenated features, and it
  keeps the backbone's own classifier, so ``slca-train export`` still yields a plain timm model.
- **Focus** ``channel`` (:mod:`trainer.focus`) adds the SAM mask as a fourth input channel.
- **No backbone** (``--backbone none``): a head on the cached embedding alone
  (:mod:`trainer.cache_head`), ``logits = head(E_crop)``; the images are cut and flipped as
  always, so the embedding view moves with them, but are not read.

Every extra starts at the identity (SLCA gates at 1, the fusion head at 0), and
:func:`build_model` creates the backbone first from the run's seed, so the backbone alone,
SLCA, fusion and focus runs of one seed start from the same backbone weights (a test checks it).
"""

from __future__ import annotations

import torch
from torch import nn

from sam_cache.regions import STATS_GRID, grid_stats

from .backbone import create_backbone
from .cache_head import HEAD_GRID, create_head
from .config import SLCAConfig, TrainConfig
from .errors import BackboneError
from .focus import focus_mode
from .slca import SLCA

__all__ = ["Classifier", "build_model", "load_weights", "EmbeddingStats"]


class EmbeddingStats(nn.Module):
    """Standardized embedding statistics and the linear head that adds them to the logits."""

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


class Classifier(nn.Module):
    """A backbone with optional SLCA gates and an optional fusion head.

    Arguments:
      backbone: a timm model with ``feature_info`` and a classifier for ``num_classes``.
      num_classes: the number of classes.
      slca: the SLCA design (``enabled=False``: no gates).
      fuse: ``none``, ``mean`` or ``meanstd``.
      img_size: input side of the dry run that finds each gated stage's layout.

    ``forward(images, embeddings)`` takes ``B x C x T x T`` images and, when SLCA or fusion is on,
    the ``B x 256 x 64 x 64`` embeddings of the same crops.

    Raises:
      BackboneError: SLCA stages that do not index the backbone's stages, or a stage that is
        neither NCHW nor NHWC.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, slca: SLCAConfig, fuse: str = "none",
                 img_size: int = 224, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head  # a cache-only head (``--backbone none``): the backbone is then an identity
        info = list(getattr(backbone, "feature_info", None) or [])
        if slca.enabled and not info:
            raise BackboneError(f"{type(backbone).__name__} has no feature stages (feature_info), so SLCA cannot gate "
                                "it; train it with --no-slca (focus and fusion work without stages)")
        self.stage_names = [f["module"] for f in info]
        self.slca: SLCA | None = None
        self.stages: list[int] = []
        self.channels_last_dim: dict[int, bool] = {}
        if slca.enabled:
            stages = slca.stages if slca.stages is not None else [i for i, f in enumerate(info) if f["reduction"] >= 4]
            bad = [s for s in stages if not 0 <= s < len(info)]
            if bad or not stages:
                raise BackboneError(f"SLCA stages {stages} do not index this backbone's {len(info)} feature stages "
                                    f"({', '.join(self.stage_names)})")
            self.stages = sorted(set(stages))
            self._find_layouts(info, img_size)
            self.slca = SLCA(slca, {s: info[s]["num_chs"] for s in self.stages})
            modules = dict(backbone.named_modules())
            for s in self.stages:
                modules[self.stage_names[s]].register_forward_hook(self._hook(s))
        self.fuse = EmbeddingStats(fuse, num_classes, slca.embed_dim) if fuse != "none" else None

    @property
    def needs_embeddings(self) -> bool:
        """Whether :meth:`forward` reads the embeddings (SLCA, fusion or a cache-only head)."""
        return self.slca is not None or self.fuse is not None or self.head is not None

    @property
    def embedding_grid(self) -> int:
        """The side of the embedding view this model reads (what the batch pipeline resamples to).

        SLCA with average pooling reads its ``64/window`` grid; max pooling needs all 64; fusion
        alone takes its statistics over :data:`~sam_cache.regions.STATS_GRID` (16; the mean is the same
        at any grid).
        """
        if self.head is not None:
            return HEAD_GRID
        if self.slca is not None:
            return 64 if self.slca.config.pool != "avg" else max(1, 64 // self.slca.config.window)
        return STATS_GRID

    def _find_layouts(self, info, img_size: int) -> None:
        modules = dict(self.backbone.named_modules())
        shapes, handles = {}, []
        for s in self.stages:
            handles.append(modules[self.stage_names[s]].register_forward_hook(
                lambda m, i, o, s=s: shapes.__setitem__(s, tuple(o.shape))))
        was_training = self.backbone.training
        in_chans = next(p for p in self.backbone.parameters() if p.ndim == 4).shape[1]
        try:
            with torch.no_grad():
                self.backbone.eval()(torch.zeros(1, in_chans, img_size, img_size))
        finally:
            self.backbone.train(was_training)
            for h in handles:
                h.remove()
        for s in self.stages:
            c, shape = info[s]["num_chs"], shapes[s]
            if len(shape) != 4 or (shape[1] != c and shape[3] != c):
                raise BackboneError(f"stage {self.stage_names[s]} gives shape {shape}, not {c} channels in NCHW/NHWC")
            # NHWC (Swin) when the last axis holds the channels; if both axes could, ask the model
            self.channels_last_dim[s] = shape[3] == c and (shape[1] != c or getattr(self.backbone, "output_fmt", "") == "NHWC")

    def _hook(self, stage: int):
        def hook(module, inputs, output):
            return self.slca.gate_stage(stage, output, self.channels_last_dim[stage])
        return hook

    def forward(self, images: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        if self.head is not None:
            if embeddings is None:
                raise ValueError("this model is a cache-only head: pass the batch's embeddings")
            return self.head(embeddings)
        if not self.needs_embeddings:
            return self.backbone(images)
        if embeddings is None:
            raise ValueError("this model has SLCA or fusion: pass the batch's embeddings")
        if self.slca is None:
            logits = self.backbone(images)
        else:
            self.slca.set_embedding(embeddings)
            try:
                logits = self.backbone(images)
            finally:
                self.slca.set_embedding(None)
        if self.fuse is not None:
            logits = logits + self.fuse(embeddings).to(logits.dtype)
        return logits

    def stage_grid(self, stage: int, img_size: int) -> tuple[int, int]:
        """The ``(H, W)`` grid of a stage for a square input of ``img_size``."""
        r = self.backbone.feature_info[stage]["reduction"]
        return img_size // r, img_size // r

    def param_groups(self, lr: float, weight_decay: float, slca_lr_mult: float = 1.0) -> list[dict]:
        """AdamW groups: timm's weight-decay split for backbone and fusion, and SLCA's own group.

        The backbone's ``no_weight_decay()`` names (Swin V2's ``logit_scale`` and ``cpb_mlp``,
        position tables) and every 1-D parameter go undecayed, as in timm's own optimizer
        factory. SLCA's parameters train at ``lr * slca_lr_mult`` without weight decay.
        """
        from timm.optim import param_groups_weight_decay

        skip = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else ()
        groups = param_groups_weight_decay(self.backbone, weight_decay, no_weight_decay_list=tuple(skip))
        if self.fuse is not None:
            groups += param_groups_weight_decay(self.fuse, weight_decay)
        if self.head is not None:
            groups += param_groups_weight_decay(self.head, weight_decay)
        for g in groups:
            g["lr"] = lr
        if self.slca is not None:
            groups.append({"params": [p for p in self.slca.parameters() if p.requires_grad], "weight_decay": 0.0,
                           "lr": lr * slca_lr_mult, "name": "slca"})
        return [g for g in groups if g["params"]]


def build_model(cfg: TrainConfig, num_classes: int, class_names: list[str] | None = None) -> tuple[Classifier, dict]:
    """The run's model from its config, and where the backbone's weights came from.

    The backbone is built first, right after seeding with ``cfg.seed``, and the generator is
    seeded again after the extras, so that the backbone's initial weights, and any randomness
    after the build, do not depend on whether SLCA or fusion is on.

    Returns:
      ``(model, weights)`` with ``weights`` as :func:`~trainer.backbone.create_backbone` gives it.
    """
    torch.manual_seed(cfg.seed)
    if cfg.backbone == "none":
        head = create_head(cfg.head, num_classes)
        torch.manual_seed(cfg.seed + 1)
        return Classifier(nn.Identity(), num_classes, cfg.slca, "none", cfg.img_size, head=head), \
            {"source": "random", "sha256": None}
    in_chans = focus_mode(cfg.focus).in_chans
    backbone, weights = create_backbone(cfg.backbone, num_classes, cfg.img_size, cfg.pretrained, cfg.pretrained_path,
                                        in_chans=in_chans, class_names=class_names, partial=cfg.pretrained_partial,
                                        **cfg.backbone_kwargs)
    model = Classifier(backbone, num_classes, cfg.slca, cfg.fuse, cfg.img_size)
    torch.manual_seed(cfg.seed + 1)
    return model, weights



def load_weights(model: nn.Module, state: dict) -> None:
    """Load a state dict and leave the model in eval mode, with no stale caches.

    Some timm models (TinyViT) cache tensors derived from their weights, such as attention
    biases, while in eval mode, and only ``train()`` clears them. A state dict loaded into a
    model that is already in eval mode would leave those caches describing the old weights.
    """
    model.train()
    model.load_state_dict(state)
    model.eval()
