"""An overlay PNG of a store's SAM masks on its images: does the mask find the lesion?

    python bench/mask_overlay.py runs/busi.zarr --out bench/results/masks-busi.png --per-class 6
    python bench/mask_overlay.py runs/busi.zarr --out bench/results/focus-overlay-busi.png --focus overlay

Draws the stored image (in the embedding's frame) with the stored mask's outline, for the first
``--per-class`` samples of each class in the test split, titled with the class and the decoder's
predicted IoU. Images that hold no picture (the store's ``suspect`` list, or a stored image that
:func:`~sam_cache.preprocess.image_problem` flags, for stores made before that check) are left
out, and counted in the title: their masks say nothing about lesions. With ``--focus overlay`` it
draws what ``slca-train --focus overlay`` feeds the classifier instead (:func:`trainer.focus.overlay`).
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sam_cache import EmbeddingStore  # noqa: E402
from sam_cache.preprocess import image_problem, resized_shape  # noqa: E402


def overlay(store_path: str, out: str, per_class: int = 6, split: str = "test", focus: str | None = None) -> None:
    """Write the overlay PNG. Raises StoreError for a store without masks."""
    with EmbeddingStore.open(store_path) as s:
        if not s.has_masks:
            from sam_cache import StoreError

            raise StoreError(f"{store_path} has no masks; run `samcache masks {store_path}` first")
        rows = s.split_indices(split)
        rows = rows[s.mask_done[rows]]
        suspect = {x["index"] for x in s.meta.get("suspect", [])}
        stored = s.read_rows(rows, "images")
        picture = np.array([r not in suspect and image_problem(im.transpose(1, 2, 0)) == "" for r, im in zip(rows, stored)],
                           dtype=bool)
        left_out, rows, stored = int((~picture).sum()), rows[picture], stored[picture]
        pos = [k for c in range(len(s.class_names)) for k in np.flatnonzero(s.labels[rows] == c)[:per_class]]
        chosen, images = [rows[k] for k in pos], stored[pos]
        masks = s.read_rows(np.array(chosen), "masks")
        iou = s.mask_iou[chosen]
        names = [s.class_names[s.labels[r]] for r in chosen]
        sizes = [resized_shape(int(h), int(w), s.image_size) for h, w in s.orig_size[chosen]]
        prompt = s.meta["masks"]["prompt"]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--out", required=True)
    p.add_argument("--per-class", type=int, default=6)
    p.add_argument("--split", default="test")
    p.add_argument("--focus", choices=["overlay"], help="draw the focus prompt instead of the mask's outline")
    a = p.parse_args()
    overlay(a.store, a.out, a.per_class, a.split, a.focus)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
