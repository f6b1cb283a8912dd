"""An overlay PNG of a store's SAM masks on its images: does the mask find the lesion?

    python bench/mask_overlay.py runs/busi.zarr --out bench/results/masks-busi.png --per-class 6
    python bench/mask_overlay.py runs/busi.zarr --out bench/results/focus-overlay-busi.png --focus overlay
    python bench/mask_overlay.py runs/busi.zarr --out bench/results/mask-sources-busi.png --mask-sets gt,candidates,learned

Draws the stored image (in the embedding's frame) with the stored mask's outline, for the first
``--per-class`` samples of each class in the test split, titled with the class and the decoder's
predicted IoU. Images that hold no picture (the store's ``suspect`` list, or a stored image that
:func:`~sam_cache.preprocess.image_problem` flags, for stores made before that check) are left
out, and counted in the title: their masks say nothing about lesions. With ``--focus overlay`` it
draws what ``slca-train --focus overlay`` feeds the classifier instead (:func:`trainer.focus.overlay`).

With several ``--mask-sets`` (the first one the reference, e.g. the ground truth), each row is one
test image and each column one set, titled with that set's Dice against the first: the same
images, side by side, for every mask source.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sam_cache import EmbeddingStore  # noqa: E402
from sam_cache.preprocess import image_problem, resized_shape  # noqa: E402


def overlay(store_path: str, out: str, per_class: int = 6, split: str = "test", focus: str | None = None,
            mask_sets: list[str] | None = None) -> None:
    """Write the overlay PNG. Raises StoreError for a store without one of the mask sets."""
    mask_sets = mask_sets or ["default"]
    with EmbeddingStore.open(store_path) as s:
        for name in mask_sets:
            if not s.mask_set(name).exists:
                from sam_cache import StoreError

                raise StoreError(f"{store_path} has no mask set {name!r}; run `samcache masks {store_path} "
                                 f"--mask-set {name}` first")
        rows = s.split_indices(split)
        for name in mask_sets:
            rows = rows[s.mask_set(name).done[rows]]
        suspect = {x["index"] for x in s.meta.get("suspect", [])}
        stored = s.read_rows(rows, "images")
        picture = np.array([r not in suspect and image_problem(im.transpose(1, 2, 0)) == "" for r, im in zip(rows, stored)],
                           dtype=bool)
        left_out, rows, stored = int((~picture).sum()), rows[picture], stored[picture]
        pos = [k for c in range(len(s.class_names)) for k in np.flatnonzero(s.labels[rows] == c)[:per_class]]
        chosen, images = [rows[k] for k in pos], stored[pos]
        every = [s.mask_set(name).read(np.array(chosen)) for name in mask_sets]
        masks = every[0]
        iou = s.mask_set(mask_sets[0]).iou[chosen]
        names = [s.class_names[s.labels[r]] for r in chosen]
        sizes = [resized_shape(int(h), int(w), s.image_size) for h, w in s.orig_size[chosen]]
        prompts = [s.mask_set(name).signature["prompt"] for name in mask_sets]
        prompt = prompts[0]
    if len(mask_sets) > 1:
        _side_by_side(store_path, out, images, every, mask_sets, prompts, names, sizes, split, left_out)
        return
    cols = per_class
    rows_n = int(np.ceil(len(chosen) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(2.2 * cols, 2.4 * rows_n), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, ax in enumerate(axes.flat[: len(chosen)]):
        h, w = sizes[k]
        if focus == "overlay":
            import torch

            from trainer.focus import overlay as tint

            seen = tint(torch.from_numpy(images[k][None]).float(), torch.from_numpy(masks[k][None]).float())
            ax.imshow(seen[0].clamp(0, 255).byte().numpy().transpose(1, 2, 0)[:h, :w])
        else:
            ax.imshow(images[k].transpose(1, 2, 0)[:h, :w])
            if masks[k, 0].any():
                ax.contour(masks[k, 0][:h, :w], levels=[0.5], colors="cyan", linewidths=1.2)
        ax.set_title(f"{names[k]}  IoU~{iou[k]:.2f}", fontsize=7)
    note = f"; {left_out} {split} images with no picture left out" if left_out else ""
    what = "what --focus overlay shows the classifier" if focus == "overlay" else "masks"
    fig.suptitle(f"{what} ({prompt} prompt), {store_path}{note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _side_by_side(store_path, out, images, every, mask_sets, prompts, names, sizes, split, left_out) -> None:
    """One row per image, one column per mask set, each titled with its Dice against the first set."""
    n, m = len(images), len(mask_sets)
    fig, axes = plt.subplots(n, m, figsize=(2.3 * m, 2.3 * n), squeeze=False)
    for k in range(n):
        h, w = sizes[k]
        ref = every[0][k, 0].astype(bool)
        for j in range(m):
            ax = axes[k, j]
            ax.axis("off")
            ax.imshow(images[k].transpose(1, 2, 0)[:h, :w])
            mask = every[j][k, 0].astype(bool)
            if mask.any():
                ax.contour(mask[:h, :w], levels=[0.5], colors="cyan" if j == 0 else "orange", linewidths=1.2)
            total = ref.sum() + mask.sum()
            dice = 2 * np.logical_and(ref, mask).sum() / total if total else 1.0
            head = f"{mask_sets[j]} ({prompts[j]})" if k == 0 else mask_sets[j]
            ax.set_title(f"{head}\n{names[k]}" if j == 0 else f"{head}\nDice {dice:.2f}", fontsize=7)
    note = f"; {left_out} {split} images with no picture left out" if left_out else ""
    fig.suptitle(f"mask sources on the same {split} images, {store_path}{note}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.3 * n)))  # room for the title above the first row
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--out", required=True)
    p.add_argument("--per-class", type=int, default=6)
    p.add_argument("--split", default="test")
    p.add_argument("--focus", choices=["overlay"], help="draw the focus prompt instead of the mask's outline")
    p.add_argument("--mask-sets", default="default", help="comma-separated mask sets; several: side by side, "
                                                          "against the first")
    a = p.parse_args()
    overlay(a.store, a.out, a.per_class, a.split, a.focus, a.mask_sets.split(","))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
