"""The training recipe, defined once: every option's type, default, choices, bounds and help.

:class:`TrainConfig` nests :class:`SLCAConfig` and :class:`AugmentConfig`. Everything else is
derived from these three dataclasses, so a field is written in exactly one place:

- the ``slca-train`` options (``cli/_options.py`` turns :func:`options` into typer options);
- the names a sweep may vary (:func:`options` with ``sweep=True``);
- ``config.yaml`` in a run folder (:meth:`TrainConfig.to_dict`, nested) and its reading back.

Every value is checked when a config is made, whatever it came from (command line, YAML file,
sweep): its type, its choices and its bounds. A mistake fails at once with one line naming the
option, never later inside AdamW or after an epoch. Each leaf option has one *flat name*, unique
across the nesting (``lr``, ``window``, ``slca`` for ``slca.enabled``, ``slca_lr_mult``,
``crop_scale_min``); flags, sweeps and :meth:`TrainConfig.from_dict` all accept flat names, and
``from_dict`` also accepts the nested form that ``config.yaml`` holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sam_cache.errors import ConfigError
from sam_cache.options import DEVICE_HELP, THREADS_HELP, Option, opt, validate_fields
from sam_cache.options import options as _options
from sam_cache.store import StoreError, check_mask_set_name

__all__ = ["TrainConfig", "SLCAConfig", "AugmentConfig", "Option", "options", "METRIC_KEYS"]

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")
INFO_KEYS = ("backbone_weights",)  # written into config.yaml for the record; not options
POOLS = ("avg", "max", "avgmax")
GATES = ("scaled", "residual")
FUSIONS = ("none", "mean", "meanstd")
from .focus import MODES as FOCUS_MODES, focus_mode  # noqa: E402  (the registered focus modes, live)
from .cache_head import HEADS  # noqa: E402  (the one list of cache-only heads)
from .litemedsam_weights import LITEMEDSAM, TIMM_MODEL  # noqa: E402  (the default backbone and its weights)

AUTO_WEIGHTS = "auto"  # --pretrained-path's default: LiteMedSAM's weights for TinyViT, none for other backbones


@dataclass
class SLCAConfig:
    """The SLCA design space; :mod:`trainer.slca` explains each choice."""

    enabled: bool = opt(True, flat="slca", flag="--slca/--no-slca", sweep=True,
                        help="SLCA gates on the backbone's stages; --no-slca trains the same backbone, data order "
                             "and recipe without them (the ablation).")
    window: int = opt(4, low=1, high=64, sweep=True, help="SLCA local region side, in embedding cells (divides 64).")
    pool: str = opt("avg", choices=POOLS, sweep=True, help="SLCA region pooling.")
    reduction: int = opt(4, low=1, high=256, sweep=True, help="SLCA MLP bottleneck ratio (256/r hidden channels).")
    stages: list[int] | None = opt(None, sweep=True,
                                   help="Gated stages as feature_info indices, e.g. 1,2,3,4 (default: every stage "
                                        "with stride >= 4).")
    gate: str = opt("scaled", choices=GATES, sweep=True, help="Gate form; both are the identity at initialization.")
    lr_mult: float = opt(10.0, low=0.0, flat="slca_lr_mult", sweep=True,
                         help="Learning-rate multiplier of the SLCA parameters (their own group, no weight decay).")
    embed_dim: int = 256

    def __post_init__(self) -> None:
        validate_fields(self)
        if 64 % self.window:
            raise ConfigError(f"window: the SLCA window must divide 64, got {self.window}")

    @property
    def in_channels(self) -> int:
        return self.embed_dim * (2 if self.pool == "avgmax" else 1)


@dataclass
class AugmentConfig:
    """Training augmentation; each one moves image, mask and embedding together (:mod:`trainer.data`)."""

    hflip: bool = opt(True, flag="--hflip/--no-hflip", sweep=True, help="Flip left-right with probability 1/2.")
    crop_scale_min: float = opt(0.5, low=0.01, high=1.0, sweep=True,
                                help="Smallest random-resized-crop area, as a fraction of the image (1: no crop).")
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        self.crop_ratio = tuple(float(v) for v in self.crop_ratio)
        validate_fields(self)

    @property
    def crop_scale(self) -> tuple[float, float]:
        return (self.crop_scale_min, 1.0)


@dataclass
class TrainConfig:
    """Everything that decides a training run; see :func:`options` for each field's help."""

    cache: str = opt(help="Store made by `samcache extract` (with --image-size).")
    out: str = opt(help="Run folder (config, metrics, checkpoints, figures).")
    # model
    backbone: str = opt(TIMM_MODEL, sweep=True,
                        help="timm model name with feature_info; tagged, hf-hub: and local-dir: names work too; "
                             "the default is TinyViT with LiteMedSAM's weights (see --pretrained-path), chosen on "
                             "validation over three datasets (bench/RESULTS.md); "
                             "none: no image backbone, a head on the cached embedding alone (--head; SLCA and "
                             "fusion off).")
    head: str = opt("attention", choices=HEADS, sweep=True,
                    help="With --backbone none: the cache-only head (attention pooling over the embedding's cells).")
    backbone_kwargs: dict = opt(factory=dict, help="JSON of extra timm model arguments.")
    pretrained: bool = opt(False, flag="--pretrained", help="Load timm's default weights for the backbone (from timm's "
                                                           "cache or hub; honours HF_HUB_OFFLINE).")
    pretrained_path: str | None = opt(AUTO_WEIGHTS, help="Local backbone weights file, or litemedsam (LiteMedSAM's "
                                                         "TinyViT encoder, packaged; for tiny_vit_5m_224); implies "
                                                         "--pretrained; loaded strictly, but for the classifier. auto: "
                                                         "litemedsam for tiny_vit_5m_224 unless --pretrained asks for "
                                                         "timm's weights, none for any other backbone; none: no file.")
    pretrained_partial: bool = opt(False, flag="--pretrained-partial",
                                   help="Load the keys of --pretrained-path that fit and skip the rest, on purpose.")
    slca: SLCAConfig = field(default_factory=SLCAConfig)
    fuse: str = opt("none", choices=FUSIONS, sweep=True,
                    help="Join statistics of the cached embedding (over the image crop) to the head: mean (256) or "
                         "mean and std (512) per channel; none leaves them out. With ResNet-18 from scratch, "
                         "meanstd helps on little data.")
    focus: str = opt("none", choices=FOCUS_MODES, sweep=True,
                     help="Use the store's mask (`samcache masks`) as a visual prompt: tint it onto the image "
                          "(overlay, MedFocusCLIP's), darken the background, crop to the mask's box, or add it as a "
                          "fourth input channel.")
    mask_set: str = opt("default", help="The store's mask set that --focus uses (`samcache masks --mask-set NAME`: "
                                        "e.g. your ground truth, or learned masks).")
    # data
    img_size: int = opt(224, low=16, high=4096, sweep=True, help="Training image side.")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train_fraction: float | None = opt(None, low=1e-9, high=1.0, sweep=True,
                                       help="Stratified fraction of the train split.")
    shots: int | None = opt(None, low=1, sweep=True, help="Stratified k images per class of the train split.")
    subset_seed: int = opt(0, sweep=True, help="Seed of the train subset.")
    allow_partial: bool = opt(False, flag="--allow-partial",
                              help="Train on a store whose extraction has not finished (only its done samples).")
    residency: str = opt("auto", choices=("auto", "gpu", "host", "stream"), help="Where the cache lives.")
    shuffle: str = opt("auto", choices=("auto", "global", "shards"),
                       help="Epoch order: global, shards (shard by shard through a buffer) or auto (shards when "
                            "the embeddings would stream).")
    shuffle_buffer: int = opt(512, low=1, help="Samples held at once by shard-by-shard streaming.")
    # recipe
    epochs: int = opt(30, low=1, sweep=True, help="Epochs (evaluation rounds; see --min-steps).")
    min_steps: int = opt(0, low=0, sweep=True,
                         help="Train at least this many optimizer steps in all: an epoch of a small subset then "
                              "takes several passes over it.")
    batch_size: int = opt(32, low=2, sweep=True, help="Samples per step (per rank under torchrun; at least 2 for "
                                                     "BatchNorm).")
    lr: float = opt(1e-3, low=0.0, sweep=True, help="AdamW peak learning rate.")
    weight_decay: float = opt(0.05, low=0.0, sweep=True, help="AdamW weight decay (not on biases, norms, gates).")
    layer_decay: float = opt(1.0, low=0.0, high=1.0, sweep=True,
                             help="Layer-wise learning-rate decay of the backbone (timm's, as in BEiT): each layer "
                                  "below the classifier trains at this times the rate of the one above; 1 is off. "
                                  "For a pretrained backbone, e.g. 0.75.")
    warmup_steps: int = opt(0, low=0, sweep=True, help="Linear learning-rate warmup, in steps, before cosine decay.")
    label_smoothing: float = opt(0.0, low=0.0, high=1.0, sweep=True, help="Cross-entropy label smoothing.")
    class_balance: str = opt("loss", choices=("none", "loss"), sweep=True,
                             help="loss: weight each class by n / (K n_c) of the training subset.")
    seed: int = opt(0, sweep=True, help="Seed of the initialization, the data order and the augmentation.")
    patience: int | None = opt(None, low=1, help="Early stop after this many epochs without val improvement.")
    select_metric: str = opt("balanced_accuracy", choices=METRIC_KEYS, help="Validation metric that picks best.pt.")
    # machinery
    device: str | None = opt(None, help=DEVICE_HELP)
    threads: int = opt(0, low=0, help=THREADS_HELP + "a seed's CPU run exactly on this machine, whatever the load "
                                                     "(the README's demo uses 1).")
    amp: bool = opt(True, flag="--amp/--no-amp", help="bf16 autocast on CUDA.")
    channels_last: bool = opt(True, flag="--channels-last/--no-channels-last", help="channels_last layout on CUDA.")
    sync_bn: bool = opt(False, flag="--sync-bn", help="Under torchrun on CUDA: SyncBatchNorm.")
    log_interval: int = opt(50, low=1, help="Steps between host syncs that check the loss (and between progress "
                                           "updates of metrics).")
    tensorboard: bool = opt(False, flag="--tensorboard", help="Also log scalars to OUT/tb (needs tensorboard).")
    attention_images: int = opt(6, low=0, help="Test images drawn in attention.png.")

    def __post_init__(self) -> None:
        if isinstance(self.slca, bool):  # TrainConfig(..., slca=False): the ablation, as on the command line
            self.slca = SLCAConfig(enabled=self.slca)
        if isinstance(self.slca, dict):
            self.slca = SLCAConfig(**self.slca)
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        validate_fields(self)
        if self.train_fraction is not None and self.shots is not None:
            raise ConfigError("train_fraction and shots: pass one of them, not both")
        if self.pretrained_path == AUTO_WEIGHTS:  # resolved here, so config.yaml records what was loaded
            self.pretrained_path = LITEMEDSAM if self.backbone == TIMM_MODEL and not self.pretrained else None
        elif self.pretrained_path in ("none", ""):
            self.pretrained_path = None
        if self.pretrained_path is not None:
            self.pretrained = True
        if self.backbone == "none":  # a head on the cache alone: nothing for SLCA to gate or fusion to add to
            if self.pretrained or focus_mode(self.focus).needs_mask:
                raise ConfigError("--backbone none reads only the cached embedding: --pretrained and --focus need an "
                                  "image backbone")
            self.slca = dataclasses.replace(self.slca, enabled=False)
            self.fuse = "none"
        if self.backbone.startswith("clip:") and self.slca.enabled:  # refused here, before any model is built
            raise ConfigError(f"--backbone {self.backbone}: CLIP's visual encoder has no feature stages for SLCA to "
                              "gate; pass --no-slca (fusion and focus work with it)")
        try:
            check_mask_set_name(self.mask_set)
        except StoreError as exc:
            raise ConfigError(f"mask_set: {exc}") from None

    @property
    def reads_embeddings(self) -> bool:
        """Whether the built-in extras that this recipe asks for read the cached embedding (SLCA,
        fusion, or a cache-only head). Sweeps use it to load a shared cache before any model
        exists; a run asks its built model instead (:attr:`trainer.model.Classifier.needs_embeddings`),
        which also knows registered extras."""
        return self.slca.enabled or self.fuse != "none" or self.backbone == "none"

    @property
    def focus_masks(self) -> str | None:
        """The mask set that a run carries with its images: ``mask_set`` under ``--focus``, else None."""
        return self.mask_set if focus_mode(self.focus).needs_mask else None

    # construction ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """Build from a nested dict (``config.yaml``) or flat option names, checking every value.

        Raises:
          ConfigError: an unknown option, or a value of the wrong type, range or choice; the
            message names ``source`` and the option.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of options, got {type(d).__name__}")
        nested = _nest({k: v for k, v in d.items() if k not in INFO_KEYS}, source)
        try:
            return cls(**nested)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        """Read a ``config.yaml`` (or a sweep's ``best.yaml``).

        Raises:
          ConfigError: the file is missing, not YAML, or holds a bad option.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data or {}, source=str(path))

    def replace(self, **flat) -> "TrainConfig":
        """A copy with some options changed, by flat name; checked like any config."""
        return TrainConfig.from_dict({**self.to_dict(), **flat})

    # output ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Nested, YAML-ready: what ``config.yaml`` and checkpoints hold."""
        d = dataclasses.asdict(self)
        d["augment"]["crop_ratio"] = list(self.augment.crop_ratio)
        return d

    def save(self, path: str | Path) -> None:
        """Write the recipe as YAML, atomically (raises OutputError when it cannot be written)."""
        from sam_cache.outputs import atomic_write

        atomic_write(path, lambda p: p.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False)))

    def flat(self) -> dict:
        """``{flat name: value}`` of every option."""
        return {o.name: o.get(self) for o in options()}


def options() -> list[Option]:
    """Every leaf option of :class:`TrainConfig` (nested configs flattened), in declaration order."""
    return _options(TrainConfig)


def _nest(d: dict, source: str) -> dict:
    """Flat option names -> the nested layout of :class:`TrainConfig`; nested input passes through."""
    by_flat = {o.name: o for o in options()}
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    nested: dict = {}
    unknown = []
    for key, value in d.items():
        if key == "slca" and isinstance(value, bool):
            nested.setdefault("slca", {})["enabled"] = value
        elif key in ("slca", "augment") and isinstance(value, dict):
            sub = nested.setdefault(key, {})
            allowed = {f.name for f in dataclasses.fields(SLCAConfig if key == "slca" else AugmentConfig)}
            bad = set(value) - allowed
            unknown += [f"{key}.{b}" for b in sorted(bad)]
            sub.update({k: v for k, v in value.items() if k in allowed})
        elif key in by_flat:
            path = by_flat[key].path
            target = nested
            for p in path[:-1]:
                target = target.setdefault(p, {})
            target[path[-1]] = value
        elif key in top:
            nested[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(f"{source}: unknown training options: {', '.join(sorted(unknown))}")
    return nested


