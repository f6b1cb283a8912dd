"""Building a model from a config, predicting on a split, and re-evaluating a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sam_cache.distributed import DistContext
from sam_cache.store import EmbeddingStore, StoreMismatchError

from .backbone import SLCAClassifier, create_backbone
from .config import TrainConfig
from .data import PairedCache, paired_views, sample_boxes
from .metrics import classification_metrics

__all__ = ["TrainError", "build_model", "predict", "evaluate_checkpoint", "normalizer", "resolve_device"]


class TrainError(RuntimeError):
    """Training or evaluation cannot go on: bad data, a missing split, a NaN loss."""


def resolve_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def build_model(cfg: TrainConfig, num_classes: int) -> SLCAClassifier:
    """The backbone (seeded by ``cfg.seed``, built first so that ``--no-slca`` gets the same
    initial weights) and, unless ``cfg.slca`` is False, its SLCA gates."""
    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.backbone, num_classes, cfg.img_size, cfg.pretrained, **cfg.backbone_kwargs)
    return SLCAClassifier(backbone, cfg.slca_config(), cfg.img_size)


def normalizer(model: SLCAClassifier, device: torch.device):
    """A function mapping 0..255 float images to the backbone's expected mean/std."""
    import timm.data

    data_cfg = timm.data.resolve_data_config({}, model=model.backbone)
    mean = torch.tensor(data_cfg["mean"], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(data_cfg["std"], device=device).view(1, 3, 1, 1) * 255
    return lambda x: (x - mean) / std


@torch.no_grad()
def predict(model: SLCAClassifier, cache: PairedCache, rows: np.ndarray, cfg: TrainConfig, device: torch.device,
            norm, ctx: DistContext | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Class probabilities for store ``rows`` on the un-augmented image regions.

    Under torchrun each rank predicts every world-th row and the results are gathered, so every
    rank returns the same, complete arrays. Returns ``(labels, probs, mean_loss)``.
    """
    if ctx is not None and ctx.world > 1:
        parts = ctx.gather(predict(model, cache, rows[ctx.rank::ctx.world], cfg, device, norm))
        n = [len(rows[r::ctx.world]) for r in range(ctx.world)]
        loss = sum(p[2] * k for p, k in zip(parts, n)) / max(len(rows), 1)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), float(loss)
    model.eval()
    probs, labels, losses = [], [], []
    for start in range(0, len(rows), cfg.batch_size):
        chunk = rows[start:start + cfg.batch_size]
        img, emb, y, regions = cache.batch(chunk, cfg.slca)
        boxes, flips = sample_boxes(regions, None, None)
        x, e = paired_views(img, emb, boxes, flips, cfg.img_size)
        x = norm(x)
        if cfg.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
            logits = model(x, e).float()
        losses.append(F.cross_entropy(logits, y, reduction="sum").item())
        probs.append(torch.softmax(logits, 1).cpu().numpy())
        labels.append(y.cpu().numpy())
    return np.concatenate(labels), np.concatenate(probs), float(np.sum(losses) / max(len(rows), 1))


def evaluate_checkpoint(checkpoint: str | Path, cache: str | Path | None = None, split: str = "test",
                        device: str | None = None) -> dict:
    """Re-evaluate a saved checkpoint on a split of a store.

    Arguments:
      checkpoint: ``best.pt`` or ``last.pt`` from a run folder.
      cache: the store; default the one the run trained on.
      split: ``train``, ``val`` or ``test``.
      device: default CUDA when available.

    Returns:
      :func:`~trainer.metrics.classification_metrics` plus ``loss``, ``split`` and ``checkpoint``.

    Raises:
      TrainError: the checkpoint is unreadable, or the split is empty.
      StoreMismatchError: the store's signature differs from the one trained on.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_dict(state["config"])
    cfg.cache = str(cache or cfg.cache)
    dev = resolve_device(device)
    cfg.device = str(dev)
    with EmbeddingStore.open(cfg.cache) as store:
        if store.signature != state["store_signature"]:
            raise StoreMismatchError(f"store {cfg.cache} differs from the store checkpoint {path} was trained on")
        rows = store.split_indices(split)
        if not len(rows):
            raise TrainError(f"store {cfg.cache} has no done samples in split {split!r}")
        model = build_model(cfg, len(state["class_names"]))
        model.load_state_dict(state["model"])
        model.to(dev)
        c = PairedCache(store, rows, dev, cfg.residency, embeddings=cfg.slca)
        y, p, loss = predict(model, c, rows, cfg, dev, normalizer(model, dev))
    out = classification_metrics(y, p)
    out.update(loss=loss, split=split, checkpoint=str(path))
    return out
