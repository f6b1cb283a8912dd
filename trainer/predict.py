"""Prediction with a trained model on new data: ``slca-train predict``.

The data may be a store, or a dataset (a folder, a CSV, an npz; labels optional). A dataset gets
its embeddings extracted first, into a store next to the output (resumable), with the encoder,
weights, preprocessing and image size recorded in the checkpoint, so that its embeddings mean
what the model was trained on. A store is accepted when that encoder side matches
(:func:`~trainer.evaluate.check_encoder_side`); its dataset may be any.

The output CSV has one row per sample: ``id``, ``source``, a probability per class
(``p_<class>``), ``predicted``, and ``label`` where the data has labels. With labels, the
metrics are returned (and printed by the CLI).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable

import numpy as np

from sam_cache import EmbeddingStore, extract_dataset
from sam_cache.datasets import DatasetOptions, open_dataset

from sam_cache.outputs import OutputError, atomic_write, refuse_overlap

from .data import PairedCache
from .errors import TrainError
from .evaluate import check_encoder_side, load_run_model
from .metrics import classification_metrics
from .step import BatchPipeline, predict

__all__ = ["predict_data"]


def predict_data(checkpoint: str | Path, data: str | Path, out: str | Path, store: str | Path | None = None,
                 encoder_checkpoint: str | Path | None = None, device: str | None = None,
                 batch_size: int | None = None, progress: bool = False,
                 log: Callable[[str], None] = print, overwrite: bool = False, allow_partial: bool = False) -> dict:
    """Predict every sample of ``data`` with the model of ``checkpoint``; write ``out`` (CSV).

    Arguments:
      checkpoint: ``best.pt`` of a run.
      data: a store, or a dataset path (labels optional).
      out: the CSV to write.
      store: where a dataset's embeddings are stored (default: ``out`` with ``.zarr``); resumable.
      encoder_checkpoint: the encoder weights (SAM ViTs and medsam; litemedsam has them packaged);
        their sha256 must be the training store's.
      device: default CUDA when available.
      batch_size: default the run's.
      progress: progress bars for extraction and prediction.
      log: where the one-off lines go.
      overwrite: replace an existing ``out`` that is not a predictions CSV (refused otherwise; a
        rerun replaces its own predictions).
      allow_partial: predict the done rows of a given store whose extraction has not finished (a
        dataset that this call extracts is always complete, but for images that cannot be read).

    Returns:
      ``{"rows", "csv", "store", "metrics"}``; ``metrics`` is None without labels.

    Raises:
      TrainError, StoreMismatchError, EncoderError, DatasetError: an unusable checkpoint, store,
        encoder or dataset, each named; an ``out`` that exists (without ``overwrite``), is one of
        the inputs or lies inside the dataset.
    """
    data, out = str(data), Path(out)
    is_store = EmbeddingStore.is_store(data)
    try:
        # a folder dataset takes every image file in it: nothing may be written inside it
        refuse_overlap(out, {"--checkpoint": checkpoint, "--data": data, "--store": store},
                       dataset=data if os.path.isdir(data) and not is_store else None)
    except OutputError as exc:
        raise TrainError(str(exc)) from None
    if out.exists() and not overwrite and not _is_predictions(out):
        raise TrainError(f"{out} exists and is not a predictions CSV; choose another --out, or pass --overwrite to "
                         "replace it")
    model, cfg, state = load_run_model(checkpoint, device)
    dev = next(model.parameters()).device
    sig = state["store_signature"]
    partial_ok = allow_partial or not is_store  # our own extraction: only skipped images are missing, each named
    if is_store:
        store_path = data
    else:
        store_path = str(store or out.with_suffix(".zarr"))
        manifest = open_dataset(data, options=DatasetOptions(require_labels=False, single_split="test"))
        log(f"extracting {len(manifest)} images of {data} with {sig['encoder']} into {store_path} (resumable)")
        result = extract_dataset(manifest, store_path, sig["encoder"], checkpoint=encoder_checkpoint,
                                 random_weights=bool(sig["random_weights"]), image_size=sig["image_size"],
                                 window=sig["preprocessing"]["window"], progress=progress,
                                 num_workers=min(4, os.cpu_count() or 1))
        if result.skipped:
            log(f"warning: {len(result.skipped)} image(s) could not be read and get no prediction "
                f"(first: {result.skipped[0]['source']}: {result.skipped[0]['error']})")
    with EmbeddingStore.open(store_path) as s:
        check_encoder_side(s, state, checkpoint)
        s.require_complete(partial_ok)
        rows = np.flatnonzero(s.done)
        if not len(rows):
            raise TrainError(f"store {store_path} has no done samples to predict")
        if cfg.focus_masks and not s.mask_set(cfg.mask_set).done[rows].all():
            made = state.get("masks_signature") or {}
            how = (f"--prompt learned --head-from {cfg.cache}:{cfg.mask_set}" if made.get("prompt") == "learned"
                   else f"the prompt it was trained with ({made.get('prompt', 'candidates')})")
            raise TrainError(f"the model uses --focus {cfg.focus}: run `samcache masks {store_path} --mask-set "
                             f"{cfg.mask_set}` with {how}")
        names = state["class_names"]
        labelled = s.class_names == names and (s.labels[rows] >= 0).all()
        if s.class_names and s.class_names != names:
            log(f"warning: the data's classes {s.class_names} are not the model's {names}: no metrics")
        pipeline = BatchPipeline(model, cfg, dev)
        with PairedCache(s, rows, dev, "auto", embeddings=model.needs_embeddings, masks=cfg.focus_masks) as c, \
                _bar(progress, len(rows)) as advance:
            _, probs, _ = predict(model, pipeline, c, rows, batch_size or cfg.batch_size,
                                  cfg.amp and dev.type == "cuda", on_batch=advance)
        ids = s.ids[rows]
        sources = _sources(s, rows)
        labels = s.labels[rows]
    pred = probs.argmax(1)

    def write(path: Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "source", *[f"p_{n}" for n in names], "predicted"] + (["label"] if labelled else []))
            for k in range(len(rows)):
                row = [ids[k], sources[k], *[f"{p:.6f}" for p in probs[k]], names[pred[k]]]
                w.writerow(row + ([names[labels[k]]] if labelled else []))

    try:
        atomic_write(out, write)
    except OutputError as exc:
        raise TrainError(str(exc)) from None
    metrics = classification_metrics(labels, probs) if labelled else None
    return {"rows": int(len(rows)), "csv": str(out), "store": store_path, "metrics": metrics}


def _is_predictions(path: Path) -> bool:
    """Whether ``path`` is a CSV that predict wrote (a rerun replaces its own output)."""
    try:
        with open(path, newline="") as f:
            return f.readline().startswith("id,source,p_")
    except (OSError, UnicodeDecodeError):
        return False


def _sources(store: EmbeddingStore, rows: np.ndarray) -> list[str]:
    """Where each sample came from: the file (folder and CSV ids are relative to the dataset), or
    ``file.npz#id`` for arrays."""
    dataset = store.meta.get("dataset", {})
    root, kind = dataset.get("root", ""), dataset.get("kind", "")
    base = os.path.dirname(root) if kind == "csv" else root
    if kind == "npz":
        return [f"{root}#{i}" for i in store.ids[rows]]
    return [os.path.join(base, str(i)) for i in store.ids[rows]]


class _bar:
    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          transient=True)
        self.p.__enter__()
        task = self.p.add_task("predict", total=self.total)
        return lambda n: self.p.advance(task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
