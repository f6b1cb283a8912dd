"""Test metrics, computed with scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

__all__ = ["classification_metrics", "format_metrics"]


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    """Accuracy, balanced accuracy, macro-F1, ROC-AUC and the confusion matrix.

    Arguments:
      y_true: ``(N,)`` class indices.
      probs: ``(N, K)`` class probabilities.

    Returns:
      A JSON-ready dict. ``auc`` is binary ROC-AUC for K = 2, macro one-vs-rest for K > 2, and
      None when it is undefined (a class absent from ``y_true``). ``confusion`` is K x K, rows
      are true classes.
    """
    y_true = np.asarray(y_true)
    k = probs.shape[1]
    pred = probs.argmax(1)
    auc = None
    if len(np.unique(y_true)) == k:
        auc = float(roc_auc_score(y_true, probs[:, 1]) if k == 2 else
                    roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=np.arange(k)))
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "macro_f1": float(f1_score(y_true, pred, average="macro", labels=np.arange(k), zero_division=0)),
        "auc": auc,
        "confusion": confusion_matrix(y_true, pred, labels=np.arange(k)).tolist(),
    }


def format_metrics(m: dict) -> str:
    """One line of the four metrics, as every command prints them."""
    auc = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
    return (f"accuracy {m['accuracy']:.3f}  balanced accuracy {m['balanced_accuracy']:.3f}  "
            f"macro-F1 {m['macro_f1']:.3f}  AUC {auc}")
