"""The training loop: one cache, one model (backbone, SLCA or not, fusion or not); reads top to bottom.

A run folder (timm's habit) holds ``config.yaml`` (the resolved recipe and where the backbone's
weights came from), ``metrics.csv`` (one row per epoch), ``last.pt`` and ``best.pt`` (selected on
the validation split), ``metrics.json`` (test metrics of the best checkpoint), and
``curves.png``, ``confusion.png``, ``attention.png``.

Steps, not epochs, are the budget that matters for small subsets: an epoch is
``max(steps per pass, ceil(min_steps / epochs))`` optimizer steps, taken from consecutive passes
over the training rows, so a 5 % subset trains as many steps as ``--min-steps`` asks. Pass ``p``
visits the rows in an order drawn from ``(seed, p)`` and step ``j`` of it crops with a generator
seeded by ``(seed, p, j)``: the data a step sees depends on nothing else, never on the model, so
``--no-slca``, ``--fuse`` and ``--focus`` runs of one seed see the same batches (``data_order``
in ``metrics.csv`` is their digest) and a resumed run sees what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sam_cache import distributed
from sam_cache.outputs import OutputError, dataset_folder, describe_os_error, refuse_overlap
from sam_cache.store import EmbeddingStore
from sam_cache.threads import cpu_threads

from .checkpoint import RunCheckpoint, load_checkpoint, save_checkpoint
from .config import METRIC_KEYS, TrainConfig
from .data import PairedCache, cache_bytes, plan_residency
from .epoch import EpochLoop, train_one_epoch, validate
from .errors import TrainError
from .metrics import format_metrics
from .model import build_model, load_weights
from .records import write_rows
from .run_report import (attention_figure, open_tensorboard, per_class_rows, tensorboard_summary, tensorboard_tag,
                         write_figures, write_file)
from .schedule import plan_steps, warmup_cosine
from .step import BatchPipeline
from .subset import split_rows

_LOG = logging.getLogger(__name__)  # the default of ``log``: silent unless logging is configured (timm's habit)
__all__ = ["train", "train_or_resume", "TrainError", "resolve_device", "METRIC_KEYS"]

RUN_FILES = "config.yaml metrics.csv metrics.json last.pt best.pt curves.png confusion.png attention.png"


def resolve_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _shuffle_plan(cfg: TrainConfig, store: EmbeddingStore, n_rows: int, device: torch.device) -> tuple[int, int] | None:
    """``(shard_size, buffer_shards)`` when the order is shard-sequential, else None.

    ``auto`` asks whether an SLCA run's cache (embeddings included, whether or not this run
    uses them) would stream, so that every run of a comparison resolves it the same way.
    """
    shuffle = cfg.shuffle
    if shuffle == "auto":
        planned = cfg.residency if cfg.residency != "auto" else plan_residency(cache_bytes(store, n_rows), device)
        shuffle = "shards" if planned == "stream" else "global"
    if shuffle == "global":
        return None
    return store.shard_size, max(1, cfg.shuffle_buffer // store.shard_size)


def _loss_fn(weight: torch.Tensor | None, label_smoothing: float, ctx) -> Callable:
    """Cross-entropy, with optional class weights, whose step under torchrun equals one process's.

    PyTorch's weighted mean divides by the batch's sum of weights. Under DDP, which averages the
    ranks' gradients, each rank would divide by its own sum; here each divides by the mean over
    ranks of those sums (a collective on the device, no host sync), which makes the step equal to
    the same global batch in one process. In one process this is ``F.cross_entropy`` itself.
    """
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if weight is None or ctx.world == 1:
            return F.cross_entropy(logits, y, weight=weight, label_smoothing=label_smoothing)
        per_sample = F.cross_entropy(logits, y, weight=weight, label_smoothing=label_smoothing, reduction="none")
        return per_sample.sum() / ctx.mean(weight[y].sum())

    return loss


def _class_weights(labels: np.ndarray, k: int, device: torch.device) -> torch.Tensor:
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return torch.tensor(len(labels) / (k * np.maximum(counts, 1)), dtype=torch.float32, device=device)


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          log: Callable[[str], None] | None = None, on_epoch: Callable[[dict], None] | None = None,
          cache: PairedCache | None = None, progress: bool = False) -> dict:
    """Train a model on a store; write the run folder.

    Arguments:
      cfg: the recipe.
      resume: continue from ``out/last.pt``; the recipe must be the same, except that ``epochs``
        may be raised to extend a finished run (the cosine schedule is stretched to the new end).
      overwrite: replace an existing run folder's results.
      log: where progress lines go (default: this module's logger, at INFO).
      on_epoch: called with each epoch's metrics row.
      cache: a :class:`PairedCache` already loaded (sweeps and studies load a store once for all
        runs); by default the run loads its own from ``cfg.cache``.
      progress: a progress bar within each epoch, on a terminal (in a file or a pipe it writes nothing).

    Returns:
      The content of ``metrics.json``: test metrics of the best checkpoint, best epoch, cache mode,
      and ``seconds``, the run's wall time up to its test scoring, counting the parts before a resume.

    Raises:
      TrainError: an existing run folder (without resume/overwrite), a changed recipe on resume,
        bad labels, an incomplete store, an empty or missing split, a store without images, a
        loss that is not finite, or a run folder that cannot be written.
      StoreError, BackboneError: the store or the backbone cannot be used.
    """
    return _start(cfg, resume, overwrite, log, on_epoch, cache, progress)


def _start(cfg, resume=False, overwrite=False, log=None, on_epoch=None, cache=None, progress=False, state=None):
    """:func:`train`, with ``state``: ``last.pt`` when the caller has read and checked it already."""
    log = log or _LOG.info
    want_cuda = resolve_device(cfg.device).type == "cuda"
    with distributed.context("cuda" if want_cuda else "cpu") as ctx, contextlib.ExitStack() as stack:
        return _train(cfg, ctx, stack, resume, overwrite, log if ctx.is_main else (lambda s: None), on_epoch, cache,
                      progress and ctx.is_main, state)


def train_or_resume(cfg: TrainConfig, note: Callable[[str], None] | None = None, **kwargs) -> dict:
    """Train ``cfg`` for a driver of many runs (a study, the lever runner): continue the run that
    was cut off part way in ``cfg.out``, or run it from the start.

    A run folder whose ``last.pt`` holds the same recipe (and, given ``cache``, was trained on the
    same store) is resumed from its last finished epoch, so a stopped half-hour run loses at most
    one epoch; one that cannot be (no ``last.pt``, another recipe or store, an unreadable file) is
    started again and its files replaced, and ``note`` is told which and why.

    Arguments:
      cfg: the recipe; its ``out`` is the run folder, which the driver owns.
      note: where the one line on resuming or starting again goes (default: this module's logger).
      kwargs: passed to :func:`train` (``log``, ``cache``, ``on_epoch``, ``progress``).

    Returns:
      What :func:`train` returns.

    Raises:
      What :func:`train` raises, except for a run folder already there.
    """
    note = note or _LOG.info
    out = Path(cfg.out)
    if not (out / "last.pt").exists():
        return train(cfg, overwrite=True, **kwargs)
    try:
        state = load_checkpoint(out / "last.pt")
        _check_resume(cfg, state, out)
        if kwargs.get("cache") is not None:
            _check_resumed_store(kwargs["cache"].store, state, out)
    except TrainError as exc:
        note(f"{out}: starting again, its last.pt cannot be resumed: {exc}")
        return train(cfg, overwrite=True, **kwargs)
    done = state.epoch + 1
    if state.best is not None and _patience_met(cfg, state.epoch - state.best["epoch"]):
        note(f"{out}: it had stopped early (after epoch {done} of {cfg.epochs}); scoring its best.pt")
    else:
        note(f"{out}: resuming after epoch {done} of {cfg.epochs}" if done < cfg.epochs else
             f"{out}: it had finished ({done} of {cfg.epochs} epochs); scoring its best.pt")
    return _start(cfg, resume=True, state=state, **kwargs)  # last.pt read once


def _train(cfg, ctx, stack, resume, overwrite, log, on_epoch, cache, progress, state) -> dict:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    main = ctx.is_main
    stack.enter_context(cpu_threads(cfg.threads))
    if (out / "last.pt").exists() and not (resume or overwrite):
        raise TrainError(f"run folder {out} has a run already; pass --resume to continue it or --overwrite")
    if resume and not (out / "last.pt").exists():
        raise TrainError(f"cannot resume: {out / 'last.pt'} does not exist")
    if resume and state is None:
        state = load_checkpoint(out / "last.pt")
        _check_resume(cfg, state, out)
    try:
        refuse_overlap(out, {"--cache": cfg.cache})
    except OutputError as exc:
        raise TrainError(str(exc)) from None
    if not (resume or overwrite):
        _refuse_foreign_files(out)
    device = resolve_device(cfg.device)
    if ctx.world > 1 and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)

    # data
    if cache is None:
        store = stack.enter_context(EmbeddingStore.open(cfg.cache))
    else:
        store = cache.store
    try:
        refuse_overlap(out, {}, dataset_folder(store.meta))
    except OutputError as exc:
        raise TrainError(str(exc)) from None
    if state is not None:
        _check_resumed_store(store, state, out)
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainError(f"cannot create run folder {out}: {describe_os_error(exc)}") from None
    rows = split_rows(store, cfg.train_fraction, cfg.shots, cfg.subset_seed, cfg.allow_partial, log)
    class_names = store.class_names
    # model: built before the cache, which loads the embeddings only if one of its extras reads them
    model, weights = build_model(cfg, len(class_names), class_names)
    needs_emb = model.needs_embeddings
    masks = cfg.focus_masks
    if cache is None:
        cache = stack.enter_context(PairedCache(store, rows.all, device, cfg.residency, embeddings=needs_emb,
                                                masks=masks))
    elif not cache.covers(rows.all) or (needs_emb and not cache.with_embeddings) or \
            (masks is not None and cache.mask_set != masks):
        raise TrainError("the shared cache lacks rows, embeddings or masks that this run needs")
    log(f"cache: {cache.describe()}" + (f", on each of {ctx.world} ranks" if ctx.world > 1 else ""))
    shards = _shuffle_plan(cfg, store, len(rows.all), device)
    if shards is not None:
        log(f"order: shard by shard, shuffle buffer of {shards[1]} shards ({shards[0] * shards[1]} samples)")
    log(f"data: {len(rows.train)} train / {len(rows.val)} val / {len(rows.test)} test, {len(class_names)} classes"
        + (f" (train fraction {cfg.train_fraction})" if cfg.train_fraction else "")
        + (f" ({cfg.shots} shots per class)" if cfg.shots else ""))

    model = model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    log(_describe_model(cfg, model, weights))
    log(f"best.pt: the epoch of the highest val {cfg.select_metric} (a tie goes to the lower val loss), marked *")
    net = model
    if ctx.world > 1:  # DDP: each rank takes every world-th sample of a global batch of batch_size * world
        if cfg.sync_bn and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        log(f"distributed: {ctx.world} ranks, {cfg.batch_size} per rank, global batch {cfg.batch_size * ctx.world}")
    pipeline = BatchPipeline(model, cfg, device)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.lr, cfg.weight_decay, cfg.layer_decay))
    bs = cfg.batch_size * ctx.world
    plan = plan_steps(len(rows.train), bs, ctx.world, cfg.epochs, cfg.min_steps,
                      state.steps_per_epoch if state is not None else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, plan.total))
    weight = _class_weights(store.labels[rows.train], len(class_names), device) if cfg.class_balance == "loss" else None
    loss_fn = _loss_fn(weight, cfg.label_smoothing, ctx)
    amp = cfg.amp and device.type == "cuda"
    if plan.steps_per_epoch > plan.steps_per_pass:
        log(f"steps: {plan.steps_per_epoch} per epoch ({plan.steps_per_epoch / plan.steps_per_pass:.1f} passes over "
            f"the {len(rows.train)} train samples), {plan.total} in all (--min-steps {cfg.min_steps})")

    # resume
    start, history, best, before = 0, [], None, 0.0
    if state is not None:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        start, history, best = state.epoch + 1, state.history, state.best
        # the earlier parts' wall time; a file without it gives its epochs' training seconds only
        before = state.elapsed if state.elapsed is not None else sum(h.get("seconds", 0.0) for h in history)
        if history and history[0]["epoch"] == 0:  # a run of samcache <= 0.2 counted epochs from 0 in its rows
            history = [{**h, "epoch": h["epoch"] + 1} for h in history]
        log(f"resumed from {out / 'last.pt'} at epoch {start + 1} of {cfg.epochs}")
    if main:
        write_file(out / "config.yaml", lambda p: p.write_text(_config_text(cfg, weights)))
    tb = open_tensorboard(out, cfg) if main else None
    if tb is not None:
        stack.callback(tb.close)

    # training loop
    since_best = 0 if best is None else start - 1 - best["epoch"]
    if _patience_met(cfg, since_best):  # it had stopped early, then was cut off before scoring
        log(f"early stop: it had stopped after epoch {start}, with no val improvement in {cfg.patience} epochs")
        start = cfg.epochs
    loop = EpochLoop(cfg, net, pipeline, cache, rows.train, plan, optimizer, scheduler, loss_fn, ctx, device, shards, amp)
    for epoch in range(start, cfg.epochs):
        trained = train_one_epoch(loop, epoch, progress)
        val, val_loss = validate(model, loop, rows.val)
        row = {"epoch": epoch + 1, "step": (epoch + 1) * plan.steps_per_epoch,  # epochs count from 1, as printed
               "lr": trained["lr"], "train_loss": trained["train_loss"], "train_accuracy": trained["train_accuracy"],
               "val_loss": val_loss, **{f"val_{m}": val[m] for m in METRIC_KEYS},
               **{k: trained[k] for k in ("seconds", "img_per_s", "data_order")}}
        history.append(row)
        score = [val[cfg.select_metric] if val[cfg.select_metric] is not None else -1.0, -val_loss]
        improved = best is None or score > list(best["score"])
        if improved:
            best, since_best = {"epoch": epoch, "score": score}, 0
        else:
            since_best += 1
        ckpt = RunCheckpoint(model=model.state_dict(), config=cfg.to_dict(), class_names=class_names,
                             store_signature=store.signature, epoch=epoch, weights=weights,
                             elapsed=before + time.perf_counter() - t0,
                             masks_signature=store.mask_set(cfg.mask_set).signature if masks else None,
                             optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), history=history,
                             best=best, steps_per_epoch=plan.steps_per_epoch)
        if main:  # only rank 0 writes the run folder
            write_file(out / "metrics.csv", lambda p: write_rows(history, p))
            save_checkpoint(ckpt.to_dict(), out / "last.pt")
            if improved:
                save_checkpoint(ckpt.to_dict(resume=False), out / "best.pt")
            if tb is not None:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                        tb.add_scalar(tensorboard_tag(key), value, row["step"])
        log(f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.3f}  "
            f"val loss {val_loss:.4f}  {cfg.select_metric} {_fmt(val[cfg.select_metric])}  "
            f"{row['img_per_s']:.0f} img/s{'  *' if improved else ''}")
        if on_epoch is not None:
            on_epoch(row)
        if _patience_met(cfg, since_best):
            log(f"early stop: no val improvement in {cfg.patience} epochs")
            break
    cache.end_epoch()

    # test with the best checkpoint
    ctx.barrier()  # best.pt is written
    best_state = load_checkpoint(out / "best.pt", map_location=device)
    load_weights(model, best_state.model)
    test, test_loss = validate(model, loop, rows.test)
    best_row = next(h for h in history if h["epoch"] == best_state.epoch + 1)
    result = {"test": {**test, "loss": test_loss}, "best_epoch": best_state.epoch + 1, "epochs_run": len(history),
              "steps": history[-1]["step"], "val_best": {m: best_row[f"val_{m}"] for m in METRIC_KEYS},
              "val_best_loss": best_row["val_loss"],
              "class_names": class_names, "cache_mode": cache.mode, "slca": cfg.slca.enabled, "fuse": cfg.fuse,
              "focus": cfg.focus, "backbone": cfg.backbone, "weights": weights, "train_samples": int(len(rows.train)),
              "device": str(device), "world_size": ctx.world,
              "seconds": round(before + time.perf_counter() - t0, 1)}
    if not main:
        return result
    write_file(out / "metrics.json", lambda p: p.write_text(json.dumps(result, indent=2)))
    if tb is not None:
        tensorboard_summary(tb, cfg, result)

    shown = per_class_rows(rows.test, store.labels[rows.test], cfg.attention_images)
    write_figures(out, cfg, history, plan, test, class_names, best_state.epoch + 1,
                  lambda path: attention_figure(model, pipeline, cache, shown, cfg, class_names, path, store.ids[shown]))
    log(f"test: {format_metrics(test)}")
    log(f"wrote {out}/: {RUN_FILES}")
    return result


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _describe_model(cfg: TrainConfig, model, weights: dict) -> str:
    """The model line: the backbone's, SLCA's and the fusion head's parameter counts, and the total."""
    def millions(module) -> str:
        n = sum(p.numel() for p in module.parameters())
        return f"{n / 1e6:.2f} M" if n >= 100_000 else f"{n / 1e3:.1f} k"

    source = "random init" if weights["source"] == "random" else f"weights {weights['source']}"
    if weights.get("skipped"):
        sk = weights["skipped"]
        source += f" (partial: {sk['file_keys']} keys of the file and {sk['model_keys']} of the model not loaded)"
    extras = model.extras
    if not model.has_backbone:
        return "model: no backbone, " + ", ".join(f"{e.describe()}, {millions(e)} parameters" for e in extras.values())
    parts = [f"model: {cfg.backbone} ({source}, {millions(model.backbone)} parameters)"]
    if "slca" not in extras:
        parts.append("no SLCA")  # the paper's method: its absence is said
    parts += [f"{e.describe()}, {millions(e)}" for e in extras.values()]
    if cfg.focus_masks:
        parts.append(f"focus {cfg.focus}")
    return ", ".join(parts) + f"; {millions(model)} parameters in all"


def _config_text(cfg: TrainConfig, weights: dict) -> str:
    import yaml

    return (yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            + "# where the backbone's weights came from (information; not an option)\n"
            + yaml.safe_dump({"backbone_weights": weights}, sort_keys=False))


def _check_resume(cfg: TrainConfig, state: RunCheckpoint, out: Path) -> None:
    if not state.resumable:
        raise TrainError(f"cannot resume {out}: {out / 'last.pt'} holds no resume state (optimizer, schedule, history)")
    old = TrainConfig.from_dict(state.config, source=str(out / "last.pt"))
    paths = ("out", "cache")  # one folder written /abs/run or ./run: compare where they point
    changed = sorted(k for k, v in cfg.flat().items() if k != "epochs" and (
        old.flat().get(k) != v if k not in paths else os.path.realpath(str(old.flat().get(k))) != os.path.realpath(v)))
    if changed:
        raise TrainError(f"cannot resume {out}: the recipe differs from {out / 'config.yaml'} in "
                         f"{', '.join(changed)} (only --epochs may change, to extend a run)")
    if cfg.epochs < state.epoch + 1:
        raise TrainError(f"cannot resume {out} with --epochs {cfg.epochs}: it has run {state.epoch + 1} already")


def _patience_met(cfg: TrainConfig, since_best: int) -> bool:
    """Whether ``since_best`` epochs without val improvement meet ``--patience``: the run stops (and
    a resumed one trains no more)."""
    return cfg.patience is not None and since_best >= cfg.patience


def _check_resumed_store(store: EmbeddingStore, state: RunCheckpoint, out: Path) -> None:
    """A resumed run trains on the store it started on: its signature must be the checkpoint's."""
    from sam_cache.errors import differences
    from sam_cache.store import flatten

    have, want = flatten(store.signature), flatten(state.store_signature)
    diffs = differences(have, want, "store has", "the run started on")
    if diffs:
        raise TrainError(f"cannot resume {out}: store {store.path} is not the one the run started on (it was made "
                         "again or replaced):\n  " + "\n  ".join(diffs) + "\nStart a new run (another --out), or "
                         "pass --overwrite to restart this one")


def _is_run_config(path: Path) -> bool:
    """Whether ``config.yaml`` is one that slca-train wrote (a recipe), not a file of the user's."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and {"cache", "out", "backbone"} <= set(data)


def _refuse_foreign_files(out: Path) -> None:
    """A run folder that holds files slca-train did not write is refused (``--overwrite`` allows it)."""
    if not out.is_dir():
        return
    ours = set(RUN_FILES.split()) | {"tb"}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))
    if (out / "config.yaml").is_file() and not _is_run_config(out / "config.yaml"):
        foreign.insert(0, "config.yaml")
    if foreign:
        raise TrainError(f"run folder {out} holds files that slca-train did not write ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}); choose a new --out, or pass --overwrite to replace "
                         "them")
