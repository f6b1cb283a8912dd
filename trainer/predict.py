"""Prediction with a trained model on new data: ``slca-train predict``.

The data may be a store, or a dataset (a folder, a CSV, an npz; labels optional). A dataset gets
its embeddings extracted first, into a store next to the output (resumable), with the encoder,
weights, preprocessing and image size recorded in the checkpoint, so that its embeddings mean
what the model was trained on. A store is accepted when that encoder side matches
(:func:`~trainer.evaluate.check_encoder_side`); its dataset may be any.

A dataset is read with the options that ``samcache extract`` takes (CSV column names, NIfTI
slicing: :class:`~sam_cache.extract_config.ReadingConfig`, defined once for both).

The output is CSV or JSON. The CSV has one row per sample: ``id``, ``source``, a probability per
class (``p_<class>``), ``predicted``, with ``top<k>``/``top<k>_p`` columns for each rank up to
``topk`` when ``topk`` > 1, and ``label`` where the data has labels. The JSON holds the classes
and one record per sample with the same content, its ``topk`` as a list of ``{"class", "p"}``
(timm's ``inference.py`` gives both forms too). With labels, the metrics are returned (and
printed by the CLI).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from sam_cache import EmbeddingStore, extract_dataset
from sam_cache.readers import open_dataset, sample_sources
from sam_cache.extract_config import ReadingConfig

from sam_cache.outputs import OutputError, atomic_write, refuse_overlap
from sam_cache.progress import progress as show_progress
from sam_cache.threads import cpu_threads

from .data import PairedCache
from .errors import TrainError
from .evaluate import check_encoder_side, load_run_model
from .metrics import classification_metrics
from .step import BatchPipeline, predict

_LOG = logging.getLogger(__name__)  # the default of ``log``: silent unless logging is configured (timm's habit)
__all__ = ["predict_data", "RESULTS_FORMATS"]

RESULTS_FORMATS = ("csv", "json")
_JSON_KIND = "samcache predictions"


def predict_data(checkpoint: str | Path, data: str | Path, out: str | Path, store: str | Path | None = None,
                 encoder_checkpoint: str | Path | None = None, device: str | None = None,
                 batch_size: int | None = None, progress: bool = False,
                 log: Callable[[str], None] | None = None, overwrite: bool = False, allow_partial: bool = False,
                 reading: ReadingConfig | None = None, results_format: str | None = None, topk: int = 1,
                 threads: int = 0) -> dict:
    """Predict every sample of ``data`` with the model of ``checkpoint``; write ``out`` (CSV or JSON).

    Arguments:
      checkpoint: ``best.pt`` of a run.
      data: a store, or a dataset path (labels optional).
      out: the file to write.
      store: where a dataset's embeddings are stored (default: ``out`` with ``.zarr``); resumable.
      encoder_checkpoint: the encoder weights (SAM ViTs and medsam; litemedsam has them packaged);
        their sha256 must be the training store's.
      device: default CUDA when available.
      batch_size: default the run's.
      progress: show progress: extraction's bar on a terminal or its lines in a file (see
        :mod:`sam_cache.progress`), and prediction's bar on a terminal only.
      log: where the one-off lines go (default: this module's logger, at INFO).
      overwrite: replace an existing ``out`` that is not a predictions file (refused otherwise; a
        rerun replaces its own predictions).
      allow_partial: predict the done rows of a given store whose extraction has not finished (a
        dataset that this call extracts is always complete, but for images that cannot be read).
      reading: how a dataset is read (CSV columns, NIfTI slicing); default ``ReadingConfig()``.
      results_format: ``csv`` or ``json``; default from ``out``'s suffix (``.json``: JSON, else CSV).
      topk: how many ranked classes each sample lists (1: the predicted class only).
      threads: CPU threads for the extraction and the model (0: torch's default); a fixed count
        repeats the probabilities to the last digit on one machine (:mod:`sam_cache.threads`).

    Returns:
      ``{"rows", "out", "store", "metrics", "format"}``; ``metrics`` is None without labels.

    Raises:
      TrainError, StoreMismatchError, EncoderError, DatasetError: an unusable checkpoint, store,
        encoder or dataset, each named; an ``out`` that exists (without ``overwrite``), is one of
        the inputs or lies inside the dataset; an unknown format; a ``topk`` below 1 or above the
        model's number of classes.
    """
    log = log or _LOG.info
    data, out = str(data), Path(out)
    fmt = results_format or ("json" if out.suffix.lower() == ".json" else "csv")
    if fmt not in RESULTS_FORMATS:
        raise TrainError(f"--results-format must be one of {', '.join(RESULTS_FORMATS)}; got {fmt!r}")
    reading = reading or ReadingConfig()
    is_store = EmbeddingStore.is_store(data)
    try:
        # a folder dataset takes every image file in it: nothing may be written inside it
        refuse_overlap(out, {"--checkpoint": checkpoint, "--data": data, "--store": store},
                       dataset=data if os.path.isdir(data) and not is_store else None)
    except OutputError as exc:
        raise TrainError(str(exc)) from None
    if out.exists() and not overwrite and not _is_predictions(out):
        raise TrainError(f"{out} exists and is not a predictions file; choose another --out, or pass --overwrite to "
                         "replace it")
    model, cfg, state = load_run_model(checkpoint, device)
    if not 1 <= topk <= len(state.class_names):
        raise TrainError(f"--topk {topk}: the model has {len(state.class_names)} classes "
                         f"({', '.join(state.class_names)}); give 1 to {len(state.class_names)}")
    dev = next(model.parameters()).device
    sig = state.store_signature
    partial_ok = allow_partial or not is_store  # our own extraction: only skipped images are missing, each named
    if is_store:
        store_path = data
    else:
        store_path = str(store or out.with_suffix(".zarr"))
        manifest = open_dataset(data, options=reading.dataset_options(require_labels=False, single_split="test"))
        log(f"extracting {len(manifest)} images of {data} with {sig['encoder']} into {store_path} (resumable)")
        result = extract_dataset(manifest, store_path, sig["encoder"], checkpoint=encoder_checkpoint,
                                 random_weights=bool(sig["random_weights"]), image_size=sig["image_size"],
                                 window=sig["preprocessing"]["window"], progress=progress,
                                 num_workers=min(4, os.cpu_count() or 1), threads=threads)
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
            made = state.masks_signature or {}
            how = (f"--prompt learned --head-from {cfg.cache}:{cfg.mask_set}" if made.get("prompt") == "learned"
                   else f"the prompt it was trained with ({made.get('prompt', 'candidates')})")
            raise TrainError(f"the model uses --focus {cfg.focus}: run `samcache masks {store_path} --mask-set "
                             f"{cfg.mask_set}` with {how}")
        names = state.class_names
        # labels count when every class of the data is one of the model's (some may be absent)
        labelled = bool(s.class_names) and set(s.class_names) <= set(names) and (s.labels[rows] >= 0).all()
        if s.class_names and not set(s.class_names) <= set(names):
            log(f"warning: the data's classes {sorted(set(s.class_names) - set(names))} are not among the model's "
                f"{names}: no metrics")
        pipeline = BatchPipeline(model, cfg, dev)
        with PairedCache(s, rows, dev, "auto", embeddings=model.needs_embeddings, masks=cfg.focus_masks) as c, \
                show_progress("predict", len(rows), enabled=progress, transient=True) as bar, cpu_threads(threads):
            _, probs, _ = predict(model, pipeline, c, rows, batch_size or cfg.batch_size,
                                  cfg.amp and dev.type == "cuda", on_batch=bar.advance)
        ids = s.ids[rows]
        sources = sample_sources(s.meta.get("dataset", {}), s.ids[rows])  # the reader says where
        labels = np.array([names.index(s.class_names[v]) for v in s.labels[rows]]) if labelled else s.labels[rows]
    ranked = np.argsort(-probs, axis=1, kind="stable")[:, :topk]
    records = [{"id": str(ids[k]), "source": sources[k],
                "probabilities": {n: round(float(p), 6) for n, p in zip(names, probs[k])},
                "predicted": names[ranked[k, 0]],
                "topk": [{"class": names[c], "p": round(float(probs[k, c]), 6)} for c in ranked[k]],
                **({"label": names[labels[k]]} if labelled else {})} for k in range(len(rows))]
    try:
        atomic_write(out, lambda path: (_write_json if fmt == "json" else _write_csv)(path, records, names, topk,
                                                                                     checkpoint))
    except OutputError as exc:
        raise TrainError(str(exc)) from None
    metrics = classification_metrics(labels, probs) if labelled else None
    return {"rows": int(len(rows)), "out": str(out), "store": store_path, "metrics": metrics, "format": fmt}


def _write_csv(path: Path, records: list[dict], names: list[str], topk: int, checkpoint) -> None:
    ranks = range(2, topk + 1)
    labelled = bool(records) and "label" in records[0]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "source", *[f"p_{n}" for n in names], "predicted",
                    *[c for k in ranks for c in (f"top{k}", f"top{k}_p")]] + (["label"] if labelled else []))
        for r in records:
            top = [v for t in r["topk"][1:] for v in (t["class"], f"{t['p']:.6f}")]
            w.writerow([r["id"], r["source"], *[f"{r['probabilities'][n]:.6f}" for n in names], r["predicted"], *top]
                       + ([r["label"]] if labelled else []))


def _write_json(path: Path, records: list[dict], names: list[str], topk: int, checkpoint) -> None:
    doc = {"kind": _JSON_KIND, "checkpoint": str(checkpoint), "classes": names, "topk": topk,
           "predictions": records}
    path.write_text(json.dumps(doc, indent=1) + "\n")


def _is_predictions(path: Path) -> bool:
    """Whether ``path`` is a file that predict wrote, CSV or JSON (a rerun replaces its own output)."""
    try:
        with open(path, newline="") as f:
            head = f.read(64)
    except (OSError, UnicodeDecodeError):
        return False
    if head.startswith("id,source,p_"):
        return True
    if head.lstrip().startswith("{"):
        try:
            return json.loads(path.read_text()).get("kind") == _JSON_KIND
        except (OSError, ValueError, AttributeError):
            return False
    return False
