"""The training loop: one cache, one backbone, SLCA or not; reads top to bottom.

A run folder (timm's habit) holds ``config.yaml`` (the resolved recipe), ``metrics.csv`` (one
row per epoch), ``last.pt`` and ``best.pt`` (selected on the validation split), ``metrics.json``
(test metrics of the best checkpoint), and ``curves.png``, ``confusion.png``, ``attention.png``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sam_cache import distributed
from sam_cache.store import EmbeddingStore

from .config import TrainConfig
from .data import PairedCache, cache_bytes, paired_views, plan_residency, sample_boxes
from .evaluate import TrainError, build_model, normalizer, predict, resolve_device
from .metrics import classification_metrics
from .records import write_rows
from .plots import plot_attention, plot_confusion, plot_learning_curves
from .stream import shard_order
from .subset import stratified_subset

__all__ = ["train", "TrainError", "epoch_order"]

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")


def epoch_order(rows: np.ndarray, seed: int, epoch: int, shards: tuple[int, int] | None = None
                ) -> tuple[np.ndarray, list[np.ndarray] | None, np.random.Generator]:
    """The epoch's shuffled rows, its stream buffers, and the generator that then draws its augmentations.

    Arguments:
      rows: the training rows.
      seed, epoch: what the order depends on.
      shards: ``(shard_size, buffer_shards)`` for a shard-sequential order
        (:func:`trainer.stream.shard_order`); None for a global permutation.

    Returns:
      ``(order, groups, rng)``; ``groups`` is None for a global permutation. All depend only on
      the arguments, never on the model: ``--no-slca`` sees exactly the same batches and crops.
    """
    rng = np.random.default_rng([seed, epoch])
    if shards is None:
        return rng.permutation(rows), None, rng
    order, groups = shard_order(rows, shards[0], shards[1], rng)
    return order, groups, rng


def _shuffle_plan(cfg: TrainConfig, store: EmbeddingStore, n_rows: int, device: torch.device) -> tuple[int, int] | None:
    """``(shard_size, buffer_shards)`` when the epoch order is shard-sequential, else None.

    ``auto`` asks whether the SLCA run's cache (embeddings included, whether or not this run
    uses them) would stream, so that an ablation pair resolves it the same way.
    """
    if cfg.shuffle not in ("auto", "global", "shards"):
        raise TrainError(f"shuffle must be auto, global or shards, not {cfg.shuffle!r}")
    shuffle = cfg.shuffle
    if shuffle == "auto":
        planned = cfg.residency if cfg.residency != "auto" else plan_residency(cache_bytes(store, n_rows), device)
        shuffle = "shards" if planned == "stream" else "global"
    if shuffle == "global":
        return None
    shard = int(store.meta.get("shard_size") or 1)
    return shard, max(1, cfg.shuffle_buffer // shard)


def _check_store(store: EmbeddingStore, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = len(store.class_names)
    if k < 2:
        raise TrainError(f"store {store.path} has {k} class; classification needs at least 2")
    bad = np.flatnonzero((store.labels < 0) | (store.labels >= k))
    if len(bad):
        raise TrainError(f"store {store.path}: labels of samples {bad[:5].tolist()} are outside 0..{k - 1}")
    splits = {}
    for split in ("train", "val", "test"):
        rows = store.split_indices(split)
        if not len(rows):
            have = "no such split" if not (store.splits == split).any() else "no done samples"
            raise TrainError(f"store {store.path} has {have} in split {split!r}; training needs train, val and test")
        splits[split] = rows
    train_rows = splits["train"]
    keep = stratified_subset(store.labels[train_rows], cfg.train_fraction, cfg.shots, cfg.subset_seed)
    return train_rows[keep], splits["val"], splits["test"]


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and gate scales (1-D parameters), as timm does."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          log: Callable[[str], None] = print, on_epoch: Callable[[dict], None] | None = None,
          cache: PairedCache | None = None) -> dict:
    """Train SLCA + backbone (or the backbone alone) on a store; write the run folder.

    Arguments:
      cfg: the recipe.
      resume: continue from ``out/last.pt``.
      overwrite: replace an existing run folder's results.
      log: where progress lines go.
      on_epoch: called with each epoch's metrics row.
      cache: a :class:`PairedCache` already loaded (sweeps load the store once for all trials);
        by default the run loads its own from ``cfg.cache``.

    Returns:
      The content of ``metrics.json``: test metrics of the best checkpoint, best epoch, cache mode.

    Raises:
      TrainError: an existing run folder (without resume/overwrite), bad labels, an empty or
        missing split, a store without images, or a NaN loss.
    """
    out = Path(cfg.out)
    want_cuda = resolve_device(cfg.device).type == "cuda"
    ctx = distributed.context("cuda" if want_cuda else "cpu")
    try:
        return _train(cfg, ctx, resume, overwrite, log if ctx.is_main else (lambda s: None), on_epoch, cache)
    finally:
        ctx.close()


def _train(cfg, ctx, resume, overwrite, log, on_epoch, cache) -> dict:
    out = Path(cfg.out)
    main = ctx.is_main
    if (out / "last.pt").exists() and not (resume or overwrite):
        raise TrainError(f"run folder {out} has a run already; pass --resume to continue it or --overwrite")
    if resume and not (out / "last.pt").exists():
        raise TrainError(f"cannot resume: {out / 'last.pt'} does not exist")
    if main:
        out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if ctx.world > 1 and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    torch.manual_seed(cfg.seed)

    # data
    own_cache = cache is None
    store = EmbeddingStore.open(cfg.cache) if own_cache else cache.store
    train_rows, val_rows, test_rows = _check_store(store, cfg)
    needed = np.concatenate([train_rows, val_rows, test_rows])
    if own_cache:
        try:
            cache = PairedCache(store, needed, device, cfg.residency, embeddings=cfg.slca)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
    elif not cache.covers(needed) or (cfg.slca and not cache.with_embeddings):
        raise TrainError("the shared cache lacks rows or embeddings that this run needs")
    class_names = store.class_names
    log(f"cache: {cache.describe()}" + (f", on each of {ctx.world} ranks" if ctx.world > 1 else ""))
    shards = _shuffle_plan(cfg, store, len(needed), device)
    if shards is not None:
        log(f"order: shard by shard, shuffle buffer of {shards[1]} shards ({shards[0] * shards[1]} samples)")
    log(f"data: {len(train_rows)} train / {len(val_rows)} val / {len(test_rows)} test, {len(class_names)} classes"
        + (f" (train fraction {cfg.train_fraction})" if cfg.train_fraction else "")
        + (f" ({cfg.shots} shots per class)" if cfg.shots else ""))

    # model
    model = build_model(cfg, len(class_names)).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    n_slca = sum(p.numel() for p in model.slca.parameters()) if model.slca is not None else 0
    log(f"model: {cfg.backbone} ({'random init' if cfg.pretrained is None else 'weights ' + cfg.pretrained}), "
        + (f"SLCA on stages {[model.stage_names[s] for s in model.stages]}, window {cfg.window}, pool {cfg.pool}, "
           f"gate {cfg.gate}, {n_slca / 1e6:.2f} M parameters" if cfg.slca else "no SLCA"))
    net = model
    if ctx.world > 1:  # DDP: each rank takes every world-th sample of a global batch of batch_size * world
        if cfg.sync_bn and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        log(f"distributed: {ctx.world} ranks, {cfg.batch_size} per rank, global batch {cfg.batch_size * ctx.world}")
    norm = normalizer(model, device)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    bs = cfg.batch_size * ctx.world
    steps = math.ceil(len(train_rows) / bs)
    if len(train_rows) - (steps - 1) * bs < 2 * ctx.world:
        steps -= 1  # a last batch of 1 per rank breaks BatchNorm
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs * max(steps, 1)))
    aug = cfg.augment()
    amp = cfg.amp and device.type == "cuda"

    # resume
    start, history, best = 0, [], None
    if resume:
        state = torch.load(out / "last.pt", map_location=device, weights_only=False)
        if state["config"] != cfg.to_dict():
            raise TrainError(f"cannot resume {out}: the recipe differs from {out / 'config.yaml'}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history, best = state["epoch"] + 1, state["history"], state["best"]
        log(f"resumed from {out / 'last.pt'} at epoch {start}")
    if main:
        cfg.save(out / "config.yaml")

    # training loop
    since_best = 0 if best is None else start - 1 - best["epoch"]
    for epoch in range(start, cfg.epochs):
        net.train()
        order, groups, rng = epoch_order(train_rows, cfg.seed, epoch, shards)
        cache.start_epoch(groups)
        digest = hashlib.sha1()
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        for step in range(steps):
            rows = order[step * bs:(step + 1) * bs]
            boxes, flips = sample_boxes(cache.regions_of(rows), aug, rng)  # drawn for the global batch
            digest.update(rows.tobytes()), digest.update(np.round(boxes, 4).tobytes()), digest.update(flips.tobytes())
            mine = slice(ctx.rank, None, ctx.world)
            rows, boxes, flips = rows[mine], boxes[mine], flips[mine]
            img, emb, y, _ = cache.batch(rows, cfg.slca)
            x, e = paired_views(img, emb, boxes, flips, cfg.img_size)
            x = norm(x)
            if cfg.channels_last and device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                logits = net(x, e)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if not ctx.all_finite(loss):
                raise TrainError(f"loss is {loss.item()} at epoch {epoch}, step {step}: lower --lr, "
                                 f"or check the store with `samcache verify {cfg.cache}`")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(rows)
            loss_sum += loss.item() * len(rows)
            correct += (logits.argmax(1) == y).sum().item()
        cache.end_epoch()
        seconds = time.perf_counter() - t0
        seen, loss_sum, correct = (sum(v) for v in zip(*ctx.gather((seen, loss_sum, correct))))

        # validation and checkpoints
        yv, pv, val_loss = predict(model, cache, val_rows, cfg, device, norm, ctx)
        val = classification_metrics(yv, pv)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss_sum / max(seen, 1),
               "train_accuracy": correct / max(seen, 1), "val_loss": val_loss,
               **{f"val_{k}": val[k] for k in METRIC_KEYS}, "seconds": round(seconds, 3),
               "img_per_s": round(seen / max(seconds, 1e-9), 1), "data_order": digest.hexdigest()[:16]}
        history.append(row)
        score = (val[cfg.select_metric] if val[cfg.select_metric] is not None else -1.0, -val_loss)
        improved = best is None or score > tuple(best["score"])
        if improved:
            best, since_best = {"epoch": epoch, "score": list(score)}, 0
        else:
            since_best += 1
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch, "history": history, "best": best, "config": cfg.to_dict(),
                 "class_names": class_names, "store_signature": store.signature}
        if main:  # only rank 0 writes the run folder
            write_rows(history, out / "metrics.csv")
            _atomic_save(state, out / "last.pt")
            if improved:
                _atomic_save({k: state[k] for k in ("model", "epoch", "config", "class_names", "store_signature")},
                             out / "best.pt")
        log(f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.3f}  "
            f"val loss {val_loss:.4f}  {cfg.select_metric} {val[cfg.select_metric]:.3f}  "
            f"{row['img_per_s']:.0f} img/s{'  *' if improved else ''}")
        if on_epoch is not None:
            on_epoch(row)
        if cfg.patience is not None and since_best >= cfg.patience:
            log(f"early stop: no val improvement in {cfg.patience} epochs")
            break

    # test with the best checkpoint
    ctx.barrier()  # best.pt is written
    best_state = torch.load(out / "best.pt", map_location=device, weights_only=False)
    model.load_state_dict(best_state["model"])
    yt, pt, test_loss = predict(model, cache, test_rows, cfg, device, norm, ctx)
    test = classification_metrics(yt, pt)
    best_row = next(h for h in history if h["epoch"] == best_state["epoch"])
    result = {"test": {**test, "loss": test_loss}, "best_epoch": best_state["epoch"], "epochs_run": len(history),
              "val_best": {k: best_row[f"val_{k}"] for k in METRIC_KEYS},
              "class_names": class_names, "cache_mode": cache.mode, "slca": cfg.slca, "backbone": cfg.backbone,
              "train_samples": int(len(train_rows)), "device": str(device), "world_size": ctx.world}
    if not main:
        if own_cache:
            store.close()
        return result
    (out / "metrics.json").write_text(json.dumps(result, indent=2))

    # figures
    plot_learning_curves(history, out / "curves.png", cfg.select_metric)
    plot_confusion(test["confusion"], class_names, out / "confusion.png", f"test, best epoch {best_state['epoch'] + 1}")
    _attention_figure(model, cache, test_rows[: cfg.attention_images], cfg, device, norm, class_names, out / "attention.png")
    if own_cache:
        store.close()
    log(f"test: accuracy {test['accuracy']:.3f}  balanced accuracy {test['balanced_accuracy']:.3f}  "
        f"macro-F1 {test['macro_f1']:.3f}  AUC {test['auc'] if test['auc'] is None else round(test['auc'], 3)}")
    log(f"wrote {out}/: config.yaml metrics.csv metrics.json last.pt best.pt curves.png confusion.png attention.png")
    return result


@torch.no_grad()
def _attention_figure(model, cache: PairedCache, rows: np.ndarray, cfg: TrainConfig, device, norm, class_names,
                      path: Path) -> None:
    model.eval()
    img, emb, y, regions = cache.batch(rows, cfg.slca)
    boxes, flips = sample_boxes(regions, None, None)
    x, e = paired_views(img, emb, boxes, flips, cfg.img_size)
    logits = model(norm(x), e)
    pictures = x.clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
    titles = [f"{class_names[t]} -> {class_names[p]}" for t, p in zip(y.tolist(), logits.argmax(1).tolist())]
    maps, stage_name = None, ""
    if model.slca is not None:
        stage = model.stages[0]
        stage_name = model.stage_names[stage]
        grid = model.stage_grid(stage, cfg.img_size)
        m = model.slca.attention_maps(e.float(), stage, grid)
        maps = F.interpolate(m[:, None], size=(cfg.img_size, cfg.img_size), mode="nearest")[:, 0].cpu().numpy()
    plot_attention(pictures, maps, titles, path, stage_name)
