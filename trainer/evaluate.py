"""Re-using a trained model: rebuild it from a checkpoint, and evaluate it on a store.

A checkpoint is tied to the *encoder side* of the store it was trained on: the encoder, its
weights, and the preprocessing. Any store that matches those is accepted, whatever its dataset
(an external test set), because its embeddings mean the same thing; a store made with another
encoder or preprocessing is refused, naming every difference. Its class names must match too
when it has labels to score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sam_cache.store import EmbeddingStore, StoreMismatchError
from sam_cache.threads import cpu_threads

from .checkpoint import RunCheckpoint, load_checkpoint
from .config import TrainConfig
from .data import PairedCache
from .errors import TrainError
from .metrics import classification_metrics
from .model import Classifier, build_model, load_weights
from .step import BatchPipeline, predict
from .train import resolve_device

__all__ = ["load_run_model", "check_encoder_side", "evaluate_checkpoint", "ENCODER_SIDE"]

ENCODER_SIDE = ("encoder", "checkpoint_sha256", "random_weights", "preprocessing")


def load_run_model(checkpoint: str | Path, device: str | torch.device | None = None
                   ) -> tuple[Classifier, TrainConfig, dict]:
    """The trained model of a run, in eval mode on ``device``, with its config and checkpoint.

    Raises:
      TrainError: the checkpoint is missing, unsafe or unreadable (see :func:`load_checkpoint`), or
        inconsistent: class names or store signature of the wrong kind, or weights that do not fit
        the model its config describes.
      ConfigError: its config holds a bad option.
    """
    state = load_checkpoint(checkpoint)
    names = state.class_names
    cfg = TrainConfig.from_dict(state.config, source=str(checkpoint))
    dev = resolve_device(str(device) if device is not None else None)
    cfg = cfg.replace(device=str(dev), pretrained=False, pretrained_path=None)  # the weights come from the checkpoint
    model, _ = build_model(cfg, len(names), names)
    try:
        load_weights(model, state.model)
    except (RuntimeError, TypeError, AttributeError) as exc:  # missing, unexpected or misshapen tensors
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        detail = " ".join(str(exc).split())[:300]
        raise TrainError(f"checkpoint {checkpoint}: its weights do not fit the model that its config and "
                         f"{len(names)} classes describe ({cfg.backbone}): {first} {detail[len(first):]}".rstrip()) from None
    return model.to(dev), cfg, state


def check_encoder_side(store: EmbeddingStore, state: RunCheckpoint, checkpoint: str | Path) -> None:
    """Refuse a store whose encoder, weights or preprocessing differ from the training store's.

    Raises:
      StoreMismatchError: naming every field that differs.
    """
    from sam_cache.errors import differences
    from sam_cache.store import flatten

    want = flatten({k: state.store_signature.get(k) for k in ENCODER_SIDE})
    have = flatten({k: store.signature.get(k) for k in ENCODER_SIDE})
    diffs = differences(have, want, "store has", "the model was trained on")
    if diffs:
        raise StoreMismatchError(f"store {store.path} was not made the way the store of {checkpoint} was; its "
                                 "embeddings would mean something else:\n  " + "\n  ".join(diffs))


def evaluate_checkpoint(checkpoint: str | Path, cache: str | Path | None = None, split: str = "test",
                        device: str | None = None, allow_partial: bool = False, threads: int = 0) -> dict:
    """Evaluate a saved model on a split of a store.

    Arguments:
      checkpoint: ``best.pt`` or ``last.pt`` from a run folder.
      cache: the store; default the one the run trained on. Another store (an external test
        set) is accepted when its encoder side matches (:func:`check_encoder_side`).
      split: ``train``, ``val``, ``test`` or ``all``.
      device: default CUDA when available.
      allow_partial: evaluate the done rows of a store whose extraction has not finished.
      threads: CPU threads (0: torch's default); a fixed count repeats the metrics on one machine.

    Returns:
      :func:`~trainer.metrics.classification_metrics` plus ``loss``, ``split``, ``store`` and ``checkpoint``.

    Raises:
      TrainError: an unreadable checkpoint, other class names, or an empty split.
      StoreError: an incomplete store without ``allow_partial``.
      StoreMismatchError: the store's encoder side differs from the one trained on.
    """
    model, cfg, state = load_run_model(checkpoint, device)
    path = str(cache or cfg.cache)
    with EmbeddingStore.open(path) as store:
        check_encoder_side(store, state, checkpoint)
        store.require_complete(allow_partial)
        if store.class_names != state.class_names:
            raise TrainError(f"store {path} has classes {store.class_names}, the model {state.class_names}")
        rows = np.flatnonzero(store.done) if split == "all" else store.split_indices(split)
        if not len(rows):
            raise TrainError(f"store {path} has no done samples in split {split!r}")
        dev = next(model.parameters()).device
        with PairedCache(store, rows, dev, cfg.residency, embeddings=model.needs_embeddings,
                         masks=cfg.focus_masks) as c, cpu_threads(threads):
            y, p, loss = predict(model, BatchPipeline(model, cfg, dev), c, rows, cfg.batch_size,
                                 cfg.amp and dev.type == "cuda")
    out = classification_metrics(y, p)
    out.update(loss=loss, split=split, store=path, checkpoint=str(checkpoint))
    return out
