"""The training recipe as one dataclass; the run folder keeps it as ``config.yaml``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import AugmentConfig
from .slca import SLCAConfig

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Everything that decides a training run (defaults in brackets).

    Data: ``cache`` (store path), ``train_fraction`` / ``shots`` with ``subset_seed`` (a
    stratified subset of the train split), ``img_size`` [224], ``residency`` [auto], ``shuffle``
    [auto: ``shards`` when the store's embeddings would stream, else ``global``] and
    ``shuffle_buffer`` [512 samples held at once by shard-sequential streaming].
    Model: ``backbone`` [resnet18], ``backbone_kwargs``, ``pretrained`` (local weights file; default
    random init), ``slca`` [True] and the SLCA design (``window``, ``pool``, ``reduction``,
    ``stages``, ``gate``; see :mod:`trainer.slca`).
    Recipe: AdamW (``lr`` [1e-3], ``weight_decay`` [0.05]) with cosine decay per step over
    ``epochs`` [30], ``batch_size`` [32], ``label_smoothing`` [0], augmentation (``hflip``,
    ``crop_scale``), ``seed`` [0], ``patience`` (early stopping on the selection metric; None: off),
    ``select_metric`` [balanced_accuracy], ``amp`` (bf16 autocast on CUDA) and ``channels_last``.
    Under torchrun, ``batch_size`` is per rank and ``sync_bn`` turns BatchNorm into SyncBatchNorm
    on CUDA (otherwise each rank keeps its own batch statistics, as plain DDP does).
    """

    cache: str
    out: str
    backbone: str = "resnet18"
    backbone_kwargs: dict = field(default_factory=dict)
    pretrained: str | None = None
    slca: bool = True
    window: int = 4
    pool: str = "avg"
    reduction: int = 4
    stages: list[int] | None = None
    gate: str = "scaled"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    img_size: int = 224
    hflip: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    train_fraction: float | None = None
    shots: int | None = None
    subset_seed: int = 0
    seed: int = 0
    patience: int | None = None
    select_metric: str = "balanced_accuracy"
    device: str | None = None
    residency: str = "auto"
    shuffle: str = "auto"
    shuffle_buffer: int = 512
    amp: bool = True
    channels_last: bool = True
    sync_bn: bool = False
    attention_images: int = 6

    def slca_config(self) -> SLCAConfig | None:
        if not self.slca:
            return None
        return SLCAConfig(window=self.window, pool=self.pool, reduction=self.reduction, stages=self.stages, gate=self.gate)

    def augment(self) -> AugmentConfig:
        return AugmentConfig(hflip=self.hflip, crop_scale=tuple(self.crop_scale))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "crop_scale" in d:
            d["crop_scale"] = tuple(d["crop_scale"])
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))
