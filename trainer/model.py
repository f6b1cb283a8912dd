"""The model: a timm backbone and its extras (SLCA gates, fusion of embedding statistics).

::

    logits = backbone(image [+ mask channel])             SLCA gates act inside, through hooks
           + fuse_head(standardize(stats(E_crop)))        only with --fuse; zero at initialization

What the classifier adds to its backbone comes through one door, :mod:`trainer.extras`; each
extra says what it reads, its optimizer group and its grid, and :class:`Classifier` iterates
over them:

- **SLCA** (:mod:`trainer.slca`) multiplies chosen stages' features by gates computed from the
  cached embedding; forward hooks put them in any timm model with ``feature_info`` (ResNets,
  SE-ResNets, ConvNeXts, TinyViT, Swin V2 with its NHWC stages, found by a dry run).
- **Fusion** (``--fuse mean|meanstd``, :mod:`trainer.fusion`) adds to the logits a linear head on
  the embedding's statistics over the crop: what a linear probe on the cache sees.
- **No backbone** (``--backbone none``): a head on the cached embedding alone
  (:mod:`trainer.cache_head`), ``logits = head(E_crop)``; the images are cut and flipped as
  always, so the embedding view moves with them, but are not read.
- **Focus** ``channel`` (:mod:`trainer.focus`) is not an extra: it adds the SAM mask as a fourth
  input channel of the backbone.

Every extra starts at the identity (SLCA gates at 1, the fusion head at 0), and
:func:`build_model` creates the backbone first from the run's seed, so the backbone alone,
SLCA, fusion and focus runs of one seed start from the same backbone weights (a test checks it).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sam_cache.regions import STATS_GRID

from . import cache_head as _cache_head  # noqa: F401  (registers the extra "head")
from .backbone import create_backbone
from .config import TrainConfig
from .errors import BackboneError
from .extras import Extra, build_extras
from .focus import focus_mode
from .fusion import EmbeddingStats
from .slca import SLCA  # noqa: F401  (registers the extra "slca")

__all__ = ["Classifier", "build_model", "load_weights", "EmbeddingStats"]


class Classifier(nn.Module):
    """A backbone and its extras (:mod:`trainer.extras`).

    Arguments:
      backbone: a timm model with a classifier for ``num_classes`` (``nn.Identity()`` when an
        extra replaces it).
      num_classes: the number of classes.
      extras: ``{name: extra}``, each a child module under its name (so a checkpoint's keys are
        ``slca.*``, ``fuse.*``, ``head.*``), applied in this order.

    ``forward(images, embeddings)`` takes ``B x C x T x T`` images and, when an extra reads
    them, the embeddings of the same crops (``B x 256 x G x G``, G = :attr:`embedding_grid`).

    Raises:
      BackboneError: two extras replace the backbone, or two need different embedding grids.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, extras: dict[str, Extra] | None = None):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self._extras = list(extras or {})
        for name, extra in (extras or {}).items():
            self.add_module(name, extra)
        replacing = [n for n, e in self.extras.items() if e.replaces_backbone]
        if len(replacing) > 1:
            raise BackboneError(f"extras {replacing} each replace the backbone; a model can have one of them")
        fixed = {n: e.grid()[0] for n, e in self.extras.items() if e.grid() and e.grid()[1]}
        if len(set(fixed.values())) > 1:
            raise BackboneError(f"extras need different embedding grids ({fixed}); they cannot share a batch")

    @property
    def extras(self) -> dict[str, Extra]:
        """``{name: extra}`` in the order they act."""
        return {n: getattr(self, n) for n in self._extras}

    @property
    def has_backbone(self) -> bool:
        """False when an extra replaces the backbone (a cache-only head): there is no timm model to export."""
        return not any(e.replaces_backbone for e in self.extras.values())

    @property
    def needs_embeddings(self) -> bool:
        """Whether :meth:`forward` reads the embeddings (an extra reads them)."""
        return any(e.reads_embeddings for e in self.extras.values())

    @property
    def embedding_grid(self) -> int:
        """The side of the embedding view this model reads (what the batch pipeline resamples to).

        The grid an extra needs (SLCA's ``64/window`` with average pooling, 64 with max; the
        cache-only head's 16), else the one an extra prefers (fusion's statistics over
        :data:`~sam_cache.regions.STATS_GRID`, 16; the mean is the same at any grid).
        """
        grids = [e.grid() for e in self.extras.values() if e.grid()]
        fixed = [g for g, exact in grids if exact]
        return fixed[0] if fixed else max((g for g, _ in grids), default=STATS_GRID)

    def forward(self, images: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        extras = self.extras.values()
        if embeddings is None and self.needs_embeddings:
            raise ValueError(f"this model has extras that read the embeddings ({', '.join(self._extras)}): "
                             "pass the batch's embeddings")
        replacing = next((e for e in extras if e.replaces_backbone), None)
        if replacing is not None:
            logits = replacing.logits(embeddings)
        else:
            with contextlib.ExitStack() as stack:
                for e in extras:
                    stack.enter_context(e.inside(embeddings))
                logits = self.backbone(images)
        for e in extras:
            if e is not replacing and (add := e.logits(embeddings)) is not None:
                logits = logits + add.to(logits.dtype)
        return logits

    def param_groups(self, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
        """AdamW groups: timm's weight-decay split for the backbone, then each extra's groups.

        The backbone's ``no_weight_decay()`` names (Swin V2's ``logit_scale`` and ``cpb_mlp``,
        position tables) and every 1-D parameter go undecayed, as in timm's own optimizer
        factory. With ``layer_decay`` below 1 the backbone's groups are timm's
        ``param_groups_layer_decay`` (BEiT's layer-wise decay, the layers from the model's
        ``group_matcher``): the classifier keeps ``lr`` and each layer below it ``layer_decay``
        times the rate of the one above, so a pretrained stem moves least. Groups that an extra
        names (SLCA's, at its own learning rate) come after the shared ones, the order the
        optimizer state of earlier runs' ``last.pt`` holds; extras are not decayed by layer.
        """
        from timm.optim import param_groups_layer_decay, param_groups_weight_decay

        skip = tuple(self.backbone.no_weight_decay()) if hasattr(self.backbone, "no_weight_decay") else ()
        has_params = any(True for _ in self.backbone.parameters())
        if layer_decay < 1.0 and has_params:
            groups = param_groups_layer_decay(self.backbone, weight_decay, no_weight_decay_list=skip,
                                              layer_decay=layer_decay)
        else:
            groups = param_groups_weight_decay(self.backbone, weight_decay, no_weight_decay_list=skip)
        for g in groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        for e in self.extras.values():
            groups += e.param_groups(lr, weight_decay)
        groups.sort(key=lambda g: "name" in g)  # stable
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
        backbone, weights = nn.Identity(), {"source": "random", "sha256": None}
    else:
        backbone, weights = create_backbone(cfg.backbone, num_classes, cfg.img_size, cfg.pretrained,
                                            cfg.pretrained_path, in_chans=focus_mode(cfg.focus).in_chans,
                                            class_names=class_names, partial=cfg.pretrained_partial,
                                            **cfg.backbone_kwargs)
    model = Classifier(backbone, num_classes, build_extras(cfg, backbone, num_classes, cfg.img_size))
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
