"""PNG figures of a run: learning curves, the confusion matrix, SLCA attention on test images."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_learning_curves", "plot_confusion", "plot_attention"]


def plot_learning_curves(history: list[dict], path: str | Path, select_metric: str,
                         schedule: list[float] | None = None, steps_per_epoch: int | None = None) -> None:
    """Three panels against the epoch: train and val loss; train and val accuracy (the same
    metric on both sides) with the val selection metric dashed; the learning rate per step.

    Arguments:
      history: the metrics rows (``epoch`` counts from 1).
      schedule: the backbone's learning rate at every step (SLCA's is ``--slca-lr-mult`` times
        it); None leaves the third panel out.
      steps_per_epoch: turns steps into epochs on the schedule's axis.
    """
    epochs = [h["epoch"] for h in history]
    panels = 3 if schedule else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8))
    a, b = axes[0], axes[1]
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["val_loss"] for h in history], label="val")
    a.set_xlabel("epoch"), a.set_ylabel("cross-entropy"), a.legend(), a.set_title("loss")
    b.plot(epochs, [h["train_accuracy"] for h in history], label="train accuracy")
    b.plot(epochs, [h["val_accuracy"] for h in history], label="val accuracy")
    if select_metric != "accuracy":
        b.plot(epochs, [h[f"val_{select_metric}"] for h in history], "--", label=f"val {select_metric} (selects)")
    best = max(range(len(history)), key=lambda k: (history[k][f"val_{select_metric}"] or -1, -history[k]["val_loss"]))
    b.axvline(epochs[best], color="grey", lw=0.8, ls=":")
    b.set_xlabel("epoch (dotted: best.pt)"), b.set_ylim(0, 1.02), b.legend(fontsize=8), b.set_title("accuracy")
    if schedule:
        c = axes[2]
        per = steps_per_epoch or 1
        c.plot([(k + 1) / per for k in range(len(schedule))], schedule)
        c.set_xlabel("epoch"), c.set_ylabel("learning rate"), c.set_title("schedule (backbone)")
        c.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: str | Path, title: str) -> np.ndarray:
    """The confusion matrix as counts and normalized over each true class, side by side
    (scikit-learn's ``ConfusionMatrixDisplay`` draws both).

    Returns:
      The normalized matrix drawn (rows sum to 1; a class absent from the data is a row of 0).
    """
    from sklearn.metrics import ConfusionMatrixDisplay

    cm = np.asarray(confusion)
    totals = cm.sum(1, keepdims=True)
    normalized = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)
    side = 1.1 * len(cm) + 2.6
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    for ax, matrix, fmt, name in ((axes[0], cm, "d", "counts"), (axes[1], normalized, ".2f", "per true class")):
        ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(ax=ax, cmap="Blues", values_format=fmt,
                                                                         colorbar=False, xticks_rotation=30)
        ax.set_title(name, fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return normalized


def plot_attention(images: np.ndarray, maps: np.ndarray | None, titles: list[str], path: str | Path,
                   stage_name: str, masks: np.ndarray | None = None) -> None:
    """Each test image above its SLCA gate map, with a colour bar, and its SAM mask outlined.

    Arguments:
      images: ``(n, T, T, 3)`` uint8; maps: ``(n, T, T)`` ``|gate - 1|`` or None for a run
        without SLCA (one row of images then); masks: ``(n, T, T)`` in 0..1, drawn as a cyan
        outline on the image (``--focus`` runs), or None; titles: one per image (its id, true
        and predicted class).
    """
    n = max(len(images), 1)
    rows = 2 if maps is not None else 1
    fig, axes = plt.subplots(rows, n, figsize=(2.4 * n + (0.8 if maps is not None else 0), 2.6 * rows),
                             squeeze=False)
    vmax = float(maps.max()) if maps is not None and maps.size and maps.max() > 0 else 1.0
    shown = None
    for k in range(n):
        for r in range(rows):
            axes[r][k].axis("off")
        if k >= len(images):
            continue
        axes[0][k].imshow(images[k])
        if masks is not None and masks[k].max() > 0.5:
            axes[0][k].contour(masks[k], levels=[0.5], colors="cyan", linewidths=1.2)
        axes[0][k].set_title(titles[k], fontsize=7)
        if maps is not None:
            shown = axes[1][k].imshow(maps[k], cmap="inferno", vmin=0.0, vmax=vmax)
    if shown is not None:
        fig.colorbar(shown, ax=list(axes[1]), fraction=0.025, pad=0.01, label="|gate - 1|")
    title = f"test images; below: SLCA |gate - 1| at {stage_name}" if maps is not None else "test images (no SLCA)"
    if masks is not None:
        title += "; SAM mask outlined in cyan"
    fig.suptitle(title, fontsize=9)
    if maps is None:
        fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
