"""One batch pipeline, one training step, one prediction loop: used by training, evaluation,
prediction, the attention figure and ``bench/train.py`` alike.

:class:`BatchPipeline` turns store rows into model input: images (with masks) and embeddings cut
from one box and flipped together (:func:`~trainer.data.paired_views`), the focus prompt
(:mod:`trainer.focus`), the backbone's normalization, and the memory layout. :func:`train_step`
runs one optimizer step and returns the loss and the number correct as device tensors: it never
waits for the GPU, so the loop syncs only when it logs (nanoGPT's habit).
"""

from __future__ import annotations

import numpy as np
import timm.data
import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data import PairedCache, paired_views, sample_boxes
from .focus import apply_focus, focus_mode
from .model import Classifier

__all__ = ["BatchPipeline", "train_step", "predict"]


class BatchPipeline:
    """Store rows -> ``(x, e, y)``, the model's input, for one model and recipe.

    Arguments:
      model: the :class:`~trainer.model.Classifier` (its backbone decides the normalization;
        whether it reads embeddings decides whether they are fetched).
      cfg: the recipe (image size, focus mode, augmentation, channels_last).
      device: where the batch goes.
    """

    def __init__(self, model: Classifier, cfg: TrainConfig, device: torch.device):
        data_cfg = timm.data.resolve_data_config({}, model=model.backbone)
        self.mean = torch.tensor(data_cfg["mean"][:3], device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(data_cfg["std"][:3], device=device).view(1, 3, 1, 1) * 255
        self.img_size, self.focus, self.augment = cfg.img_size, cfg.focus, cfg.augment
        self.embeddings = model.needs_embeddings
        self.emb_size = model.embedding_grid
        self.channels_last = cfg.channels_last and device.type == "cuda"

    def boxes(self, cache: PairedCache, rows: np.ndarray, rng: np.random.Generator | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Crop boxes and flips: random (training) with ``rng``, the whole view without it."""
        regions = cache.regions_of(rows, focus_crop=focus_mode(self.focus).crops_to_mask)
        return sample_boxes(regions, self.augment if rng is not None else None, rng)

    def __call__(self, cache: PairedCache, rows: np.ndarray, boxes: np.ndarray, flips: np.ndarray
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The batch of ``rows`` cut by ``boxes`` and ``flips``: ``(x, e, y)`` on the device."""
        img, emb, y = cache.batch(rows, self.embeddings)
        return self.views(img, emb, y, boxes, flips)

    def views(self, img: torch.Tensor, emb: torch.Tensor | None, y: torch.Tensor, boxes: np.ndarray,
              flips: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Stored frames (and full-frame embeddings, e.g. from an encoder run online) -> ``(x, e, y)``."""
        x, e = paired_views(img, emb, boxes, flips, self.img_size, self.emb_size)
        rgb, extra = apply_focus(x, self.focus)
        x = (rgb - self.mean) / self.std
        if extra is not None:
            x = torch.cat([x, extra * 2 - 1], 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, e, y


def train_step(net: torch.nn.Module, x: torch.Tensor, e: torch.Tensor | None, y: torch.Tensor,
               optimizer: torch.optim.Optimizer, scheduler, loss_fn, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns ``(loss, correct)`` as detached device tensors (no host sync)."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        logits = net(x, e)
        loss = loss_fn(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


@torch.no_grad()
def predict(model: Classifier, pipeline: BatchPipeline, cache: PairedCache, rows: np.ndarray, batch_size: int,
            amp: bool = False, ctx=None, on_batch=None) -> tuple[np.ndarray, np.ndarray, float]:
    """Class probabilities for store ``rows`` on their whole (un-augmented) views.

    Under torchrun each rank predicts every world-th row and the results are gathered, so every
    rank returns the same, complete arrays. One host sync at the end. ``on_batch(n)`` is called
    after each batch of ``n`` rows (a progress bar).

    Returns:
      ``(labels, probs, mean cross-entropy)``.
    """
    if ctx is not None and ctx.world > 1:
        parts = ctx.gather(predict(model, pipeline, cache, rows[ctx.rank::ctx.world], batch_size, amp))
        n = [len(rows[r::ctx.world]) for r in range(ctx.world)]
        loss = sum(p[2] * k for p, k in zip(parts, n)) / max(len(rows), 1)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), float(loss)
    model.eval()
    probs, labels, loss = [], [], None
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        boxes, flips = pipeline.boxes(cache, chunk)
        x, e, y = pipeline(cache, chunk, boxes, flips)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            logits = model(x, e).float()
        y = torch.where((y >= 0) & (y < logits.shape[1]), y, -1)  # unlabelled, or a class the model lacks
        batch_loss = F.cross_entropy(logits, y, reduction="sum", ignore_index=-1)
        loss = batch_loss if loss is None else loss + batch_loss
        probs.append(torch.softmax(logits, 1))
        labels.append(y)
        if on_batch is not None:
            on_batch(len(chunk))
    if not probs:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0)), float("nan")
    return (torch.cat(labels).cpu().numpy(), torch.cat(probs).cpu().numpy(),
            float(loss.item()) / max(len(rows), 1))
