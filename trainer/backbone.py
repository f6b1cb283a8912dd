"""A timm classification backbone with SLCA gates on its stages, registered through forward hooks.

Any timm model that exposes ``feature_info`` works: ResNets, SE-ResNets/SENets, ConvNeXts, Swin
V2 and others. Stage outputs may be ``NCHW`` (CNNs) or ``NHWC`` (Swin); the layout is found by a
dry run at construction, so the gate is applied on the right axis instead of being skipped.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from .slca import SLCA, SLCAConfig

__all__ = ["SLCAClassifier", "create_backbone", "BackboneError"]


class BackboneError(ValueError):
    """A backbone cannot be built or wired as asked."""


def create_backbone(name: str, num_classes: int, img_size: int, pretrained: str | Path | None = None,
                    **kwargs) -> nn.Module:
    """``timm.create_model`` with a local weights file and the input size where the model needs one.

    Arguments:
      name: a timm model name (``resnet18``, ``seresnet50``, ``swinv2_tiny_window8_256``...).
      num_classes: the classifier's outputs.
      img_size: passed to models built for a fixed input size (ViT, Swin); ignored by CNNs.
      pretrained: a local weights file; timm loads it and re-initializes a classifier of another
        size. None: random initialization (nothing is downloaded).
      kwargs: more model arguments (e.g. ``embed_dim`` for a small test Swin).

    Raises:
      BackboneError: unknown model, missing weights file, or a model without ``feature_info``.
    """
    if not timm.is_model(name):
        raise BackboneError(f"unknown timm model {name!r}")
    extra = {}
    if pretrained is not None:
        if not Path(pretrained).is_file():
            raise BackboneError(f"pretrained weights {pretrained} do not exist (nothing is downloaded)")
        extra = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(pretrained)}}
    try:
        model = timm.create_model(name, num_classes=num_classes, img_size=img_size, **kwargs, **extra)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        model = timm.create_model(name, num_classes=num_classes, **kwargs, **extra)
    if not getattr(model, "feature_info", None):
        raise BackboneError(f"timm model {name!r} exposes no feature_info, so SLCA cannot find its stages")
    return model


class SLCAClassifier(nn.Module):
    """A backbone whose chosen stages are gated by SLCA (or not, with ``slca=None``).

    Arguments:
      backbone: a timm model with ``feature_info``.
      slca: the SLCA design, or None for the plain backbone (``--no-slca``).
      img_size: input side used for the dry run that finds each stage's grid and layout.

    ``forward(images, embeddings)`` takes ``Bx3xTxT`` images and, with SLCA, the ``Bx256x64x64``
    embeddings of the same crops.
    """

    def __init__(self, backbone: nn.Module, slca: SLCAConfig | None, img_size: int):
        super().__init__()
        self.backbone = backbone
        info = list(backbone.feature_info)
        self.stage_names = [f["module"] for f in info]
        self.slca = None
        self.stages: list[int] = []
        self.channels_last_dim: dict[int, bool] = {}
        if slca is None:
            return
        stages = slca.stages if slca.stages is not None else [i for i, f in enumerate(info) if f["reduction"] >= 4]
        bad = [s for s in stages if not 0 <= s < len(info)]
        if bad or not stages:
            raise BackboneError(f"SLCA stages {stages} do not index this backbone's {len(info)} feature stages "
                                f"({', '.join(self.stage_names)})")
        self.stages = sorted(stages)
        self._find_layouts(info, img_size)
        self.slca = SLCA(slca, {s: info[s]["num_chs"] for s in self.stages})
        modules = dict(backbone.named_modules())
        for s in self.stages:
            modules[self.stage_names[s]].register_forward_hook(self._hook(s))

    def _find_layouts(self, info, img_size: int) -> None:
        modules = dict(self.backbone.named_modules())
        shapes, handles = {}, []
        for s in self.stages:
            handles.append(modules[self.stage_names[s]].register_forward_hook(
                lambda m, i, o, s=s: shapes.__setitem__(s, tuple(o.shape))))
        was_training = self.backbone.training
        try:
            with torch.no_grad():
                self.backbone.eval()(torch.zeros(1, 3, img_size, img_size))
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
        if self.slca is None:
            return self.backbone(images)
        if embeddings is None:
            raise ValueError("this model has SLCA: pass the batch's embeddings")
        self.slca.set_embedding(embeddings)
        try:
            return self.backbone(images)
        finally:
            self.slca.set_embedding(None)

    def stage_grid(self, stage: int, img_size: int) -> tuple[int, int]:
        """The ``(H, W)`` grid of a stage for a square input of ``img_size``."""
        r = self.backbone.feature_info[stage]["reduction"]
        return img_size // r, img_size // r
