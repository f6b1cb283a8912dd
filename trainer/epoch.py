"""One epoch of a run: :func:`train_one_epoch` and :func:`validate` (timm's split of its loop).

:func:`trainer.train.train` owns the run (folder, model, checkpoints, resume); these two own what
happens within an epoch, on the objects an :class:`EpochLoop` holds for the whole run.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from sam_cache.progress import progress as show_progress

from .config import TrainConfig
from .data import PairedCache
from .errors import TrainError
from .metrics import classification_metrics
from .schedule import StepPlan, epoch_order
from .step import BatchPipeline, predict, train_step

__all__ = ["EpochLoop", "train_one_epoch", "validate"]


@dataclass
class EpochLoop:
    """What every epoch of one run shares.

    ``order`` is the current pass's row order: a pass may span epochs (``--min-steps``), so it
    is carried from one epoch to the next; None before the first step.
    """

    cfg: TrainConfig
    net: torch.nn.Module  # the model, or its DDP wrapper
    pipeline: BatchPipeline
    cache: PairedCache
    train_rows: np.ndarray
    plan: StepPlan
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: Callable
    ctx: object  # sam_cache.distributed's context
    device: torch.device
    shards: tuple[int, int] | None
    amp: bool
    order: np.ndarray | None = None


def train_one_epoch(loop: EpochLoop, epoch: int, progress: bool = False) -> dict:
    """Take epoch ``epoch``'s ``plan.steps_per_epoch`` optimizer steps (counted from 0).

    Step ``g`` of the run is step ``j`` of pass ``p`` (``divmod(g, steps_per_pass)``): the pass's
    order is drawn from ``(seed, p)`` and the step's crops from ``(seed, p, j)``, so the batches
    depend on nothing else. Each rank takes every world-th sample of a global batch.

    Returns:
      ``{"lr", "train_loss", "train_accuracy", "seconds", "img_per_s", "data_order"}``, summed over
      ranks; ``lr`` is the first group's after the epoch, ``data_order`` a digest of the rows,
      crops and flips seen.

    Raises:
      TrainError: the loss is not finite (checked every ``log_interval`` steps, one host sync each).
    """
    cfg, plan, ctx, cache, pipeline = loop.cfg, loop.plan, loop.ctx, loop.cache, loop.pipeline
    device = loop.device
    bs = cfg.batch_size * ctx.world
    loop.net.train()
    digest = hashlib.sha1()
    t0, seen = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    with show_progress(f"epoch {epoch + 1}/{cfg.epochs}", plan.steps_per_epoch, enabled=progress,
                       transient=True) as bar:
        for k in range(plan.steps_per_epoch):
            p, j = divmod(epoch * plan.steps_per_epoch + k, plan.steps_per_pass)
            if j == 0 or loop.order is None:
                loop.order, groups = epoch_order(loop.train_rows, cfg.seed, p, loop.shards)
                cache.start_epoch(groups)
            batch = loop.order[j * bs:(j + 1) * bs]
            boxes, flips = pipeline.boxes(cache, batch, np.random.default_rng([cfg.seed, p, j]))
            digest.update(batch.tobytes()), digest.update(np.round(boxes, 4).tobytes()), digest.update(flips.tobytes())
            mine = slice(ctx.rank, None, ctx.world)
            x, e, y = pipeline(cache, batch[mine], boxes[mine], flips[mine])
            loss, right = train_step(loop.net, x, e, y, loop.optimizer, loop.scheduler, loop.loss_fn, loop.amp)
            finite &= torch.isfinite(loss)
            loss_sum += loss * len(y)
            correct += right
            seen += len(y)
            if (k + 1) % cfg.log_interval == 0 or k + 1 == plan.steps_per_epoch:
                _check_finite(ctx, finite, epoch, k, cfg)  # the one host sync of an interval
            bar.advance()
    seconds = time.perf_counter() - t0
    seen, loss_total, right_total = (sum(v) for v in zip(*ctx.gather((seen, float(loss_sum), int(correct)))))
    # the run's own rate: the first group that no layer decay scales (not the stem's under --layer-decay)
    lr = next((g["lr"] for g in loop.optimizer.param_groups if g.get("lr_scale", 1.0) == 1.0),
              loop.optimizer.param_groups[0]["lr"])
    return {"lr": float(lr), "train_loss": loss_total / max(seen, 1),
            "train_accuracy": right_total / max(seen, 1), "seconds": round(seconds, 3),
            "img_per_s": round(seen / max(seconds, 1e-9), 1), "data_order": digest.hexdigest()[:16]}


def validate(model: torch.nn.Module, loop: EpochLoop, rows: np.ndarray) -> tuple[dict, float]:
    """Score ``model`` (not its DDP wrapper) on ``rows``: ``(classification_metrics, mean loss)``,
    over every rank's share."""
    y, prob, loss = predict(model, loop.pipeline, loop.cache, rows, loop.cfg.batch_size, loop.amp, loop.ctx)
    return classification_metrics(y, prob), loss


def _check_finite(ctx, finite: torch.Tensor, epoch: int, step: int, cfg: TrainConfig) -> None:
    if not ctx.all_finite(torch.where(finite, 0.0, float("nan"))):
        raise TrainError(f"loss is not finite in epoch {epoch + 1}, by step {step + 1}: lower --lr, "
                         f"or check the store with `samcache verify {cfg.cache}`")
