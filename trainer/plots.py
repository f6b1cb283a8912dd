"""PNG figures of a run: learning curves, the confusion matrix, SLCA attention on test images."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_learning_curves", "plot_confusion", "plot_attention"]


def plot_learning_curves(history: list[dict], path: str | Path, select_metric: str) -> None:
    """Train/val loss and the val selection metric against the epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["val_loss"] for h in history], label="val")
    a.set_xlabel("epoch"), a.set_ylabel("cross-entropy"), a.legend(), a.set_title("loss")
    b.plot(epochs, [h["train_accuracy"] for h in history], label="train accuracy")
    b.plot(epochs, [h[f"val_{select_metric}"] for h in history], label=f"val {select_metric}")
    b.set_xlabel("epoch"), b.set_ylim(0, 1), b.legend(), b.set_title("metrics")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: str | Path, title: str) -> None:
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1.2 * len(cm) + 3, 1.2 * len(cm) + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(cm)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(cm)), class_names)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="black" if cm[i, j] < cm.max() / 2 else "white")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_attention(images: np.ndarray, maps: np.ndarray | None, titles: list[str], path: str | Path,
                   stage_name: str, masks: np.ndarray | None = None) -> None:
    """Each test image with the SLCA gate's deviation from identity over it, and its SAM mask.

    Arguments:
      images: ``(n, T, T, 3)`` uint8; maps: ``(n, T, T)`` or None for a run without SLCA;
      masks: ``(n, T, T)`` in 0..1, drawn as a cyan outline (``--focus`` runs), or None.
    """
    n = len(images)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(2.6 * max(n, 1), 3), squeeze=False)
    for k, ax in enumerate(axes[0]):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k])
        if maps is not None:
            ax.imshow(maps[k], cmap="inferno", alpha=0.45)
        if masks is not None and masks[k].max() > 0.5:
            ax.contour(masks[k], levels=[0.5], colors="cyan", linewidths=1.2)
        ax.set_title(titles[k], fontsize=8)
    title = f"SLCA |gate - 1| at {stage_name}" if maps is not None else "no SLCA (--no-slca)"
    if masks is not None:
        title += "; SAM mask outlined in cyan"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
