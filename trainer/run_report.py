"""What a run leaves for people to look at: its figures and its TensorBoard log, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sam_cache.outputs import OutputError, atomic_write

from .config import METRIC_KEYS, TrainConfig
from .data import PairedCache, paired_views
from .errors import TrainError
from .plots import plot_attention, plot_confusion, plot_learning_curves
from .schedule import warmup_cosine
from .step import BatchPipeline

__all__ = ["write_file", "write_figures", "attention_figure", "per_class_rows", "tensorboard_tag", "open_tensorboard",
           "tensorboard_summary"]


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write a run file atomically with ``write(tmp_path)``; a failure is a :class:`TrainError`."""
    try:
        atomic_write(path, write)
    except OutputError as exc:
        raise TrainError(str(exc)) from None


def open_tensorboard(out: Path, cfg: TrainConfig):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("--tensorboard needs the tensorboard package: pip install 'samcache[tensorboard]'") from None
    return SummaryWriter(str(out / "tb"))


def per_class_rows(rows: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` of ``rows`` taken class by class in turn (the first of each class, then the
    second, ...), so that every class is shown when ``n`` allows."""
    by_class = [list(rows[labels == c]) for c in np.unique(labels)]
    picked = []
    while len(picked) < n and any(by_class):
        for group in by_class:
            if group and len(picked) < n:
                picked.append(group.pop(0))
    return np.asarray(picked, dtype=rows.dtype)


def _short(text: str, width: int = 30) -> str:
    """An id that fits over a panel: its end, where file names differ."""
    return text if len(text) <= width else "..." + text[-(width - 3):]


def tensorboard_tag(key: str) -> str:
    """A metrics row's key as a grouped TensorBoard tag: ``val_auc`` -> ``val/auc``,
    ``train_loss`` -> ``train/loss``, ``img_per_s`` -> ``speed/img_per_s``, ``lr`` stays."""
    for group in ("train", "val", "test"):
        if key.startswith(group + "_"):
            return f"{group}/{key[len(group) + 1:]}"
    return f"speed/{key}" if key in ("img_per_s", "seconds") else key


def tensorboard_summary(tb, cfg: TrainConfig, result: dict) -> None:
    """The test metrics (at the last step) and the run's hyperparameters beside them (HPARAMS tab)."""
    test = {f"test/{k}": float(result["test"][k]) for k in (*METRIC_KEYS, "loss") if result["test"].get(k) is not None}
    for tag, value in test.items():
        tb.add_scalar(tag, value, result["steps"])
    hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.flat().items()
               if k not in ("cache", "out", "device") and v is not None}
    tb.add_hparams(hparams, {f"hparam/{k.replace('/', '_')}": v for k, v in test.items()}, run_name=".")
    tb.flush()


@torch.no_grad()
def attention_figure(model, pipeline: BatchPipeline, cache: PairedCache, rows: np.ndarray, cfg: TrainConfig,
                     class_names: list[str], path: Path, ids=None) -> None:
    """``attention.png``: test images, each above its SLCA gate deviation, and in focus runs the
    SAM mask; titled with the id (``ids``), the true and the predicted class."""
    if not len(rows):
        return
    model.eval()
    boxes, flips = pipeline.boxes(cache, rows)
    x, e, y = pipeline(cache, rows, boxes, flips)
    logits = model(x, e)
    img, _, _ = cache.batch(rows, embeddings=False)
    raw, _ = paired_views(img, None, boxes, flips, cfg.img_size)
    pictures = raw[:, :3].clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
    masks = raw[:, 3].cpu().numpy() if raw.shape[1] == 4 else None
    names = [str(i) for i in ids] if ids is not None else [str(r) for r in rows]
    titles = [f"{_short(i)}\n{class_names[t]} -> {class_names[p]}"
              for i, t, p in zip(names, y.tolist(), logits.argmax(1).tolist())]
    maps, stage_name = None, ""
    slca = model.extras.get("slca")
    if slca is not None:
        stage = slca.stages[0]
        stage_name = slca.stage_names[stage]
        grid = slca.stage_grid(stage, cfg.img_size)
        m = slca.attention_maps(e.float(), stage, grid)
        maps = F.interpolate(m[:, None], size=(cfg.img_size, cfg.img_size), mode="nearest")[:, 0].cpu().numpy()
    write_file(path, lambda p: plot_attention(pictures, maps, titles, p, stage_name, masks))


def write_figures(out: Path, cfg: TrainConfig, history: list[dict], plan, test: dict, class_names: list[str],
                  best_epoch: int, attention: Callable[[Path], None]) -> None:
    """``curves.png`` (with the schedule the run followed), ``confusion.png`` of the test split at
    the 1-based ``best_epoch``, and ``attention.png`` through ``attention(path)``."""
    factor = warmup_cosine(cfg.warmup_steps, plan.total)
    schedule = [cfg.lr * factor(k) for k in range(plan.total)][: history[-1]["step"]]
    write_file(out / "curves.png", lambda p: plot_learning_curves(history, p, cfg.select_metric, schedule,
                                                                 plan.steps_per_epoch))
    write_file(out / "confusion.png", lambda p: plot_confusion(test["confusion"], class_names, p,
                                                              f"test, best epoch {best_epoch}"))
    attention(out / "attention.png")
