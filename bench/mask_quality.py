"""Mask quality: a store's masks against ground-truth masks, per split and class, with the miss rate.

    python bench/mask_quality.py runs/busbra.zarr --gt csv:mask --out bench/results/mask-quality-busbra-candidates
    python bench/mask_quality.py runs/busi.zarr --gt ../shared/data/busi_masks --gt-name "{stem}_mask{suffix}" --out ...
    python bench/mask_quality.py runs/busbra.zarr --gt csv:mask --oracle-boxes runs/busbra-oracle.csv --grow 5

The ground truth (``--gt``: ``csv:COLUMN`` of the dataset's CSV, or a folder mirroring the
dataset, as ``samcache masks --from-masks`` reads it) is brought into the stored frame by the same
geometry as the image (:func:`sam_cache.user_masks.mask_to_frame`). For every sample whose
store mask is done: Dice and IoU against it; per split and class, their means, and the *miss
rate*: the share of lesion images (non-empty ground truth) whose mask has Dice < 0.1, the lesion
missed outright. Images with an empty ground truth (no lesion) count apart: the share whose mask
is not empty.

``--oracle-boxes FILE`` writes, instead, the ground truth's own box grown by ``--grow`` pixels (in
original image pixels, clipped to the image), one row per lesion image, in the CSV that
``samcache masks --prompt csv --boxes FILE`` reads: the oracle prompt, the upper bound of what a
box-prompted decoder can give.

Writes ``OUT.json`` and ``OUT.md``; prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sam_cache import EmbeddingStore  # noqa: E402
from sam_cache.outputs import atomic_write  # noqa: E402
from sam_cache.user_masks import mask_paths, mask_to_frame, read_mask  # noqa: E402

MISS_DICE = 0.1


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks (both 1.0 when both are empty)."""
    inter = float(np.logical_and(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    union = total - inter
    if total == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / union


def ground_truth(store: EmbeddingStore, gt: str, gt_name: str, rows: np.ndarray) -> dict[int, np.ndarray]:
    """The ground-truth masks of ``rows``, in their original size (an empty mask where none is found)."""
    paths = mask_paths(store, gt, gt_name)
    out = {}
    for k in rows:
        p = paths[k]
        out[int(k)] = read_mask(p) > 0 if p and Path(p).is_file() else np.zeros(tuple(store.orig_size[k]), bool)
    return out


def measure(store_path: str, gt: str, gt_name: str = "{stem}{suffix}", mask_set: str = "default") -> dict:
    """Per-sample Dice and IoU of the done masks of one mask set, and their summary per split and class."""
    with EmbeddingStore.open(store_path) as s:
        ms = s.mask_set(mask_set)
        if not ms.exists:
            raise SystemExit(f"{store_path} has no mask set {mask_set!r} (it has: {', '.join(s.mask_sets) or 'none'}): "
                             "run `samcache masks` first")
        rows = np.flatnonzero(ms.done & s.done)
        truth = ground_truth(s, gt, gt_name, rows)
        masks = ms.read(rows)[:, 0].astype(bool)
        per = []
        for k, row in enumerate(rows):
            t = mask_to_frame(truth[int(row)], s.image_size).astype(bool)
            d, j = dice_iou(masks[k], t)
            per.append({"row": int(row), "id": str(s.ids[row]), "split": str(s.splits[row]),
                        "class": s.class_names[s.labels[row]], "lesion": bool(t.any()), "dice": d, "iou": j,
                        "area": float(masks[k].mean())})
        prompt = dict(ms.signature, mask_set=mask_set)
    groups = {}
    for r in per:
        for key in ((r["split"], r["class"]), (r["split"], "lesion classes" if r["lesion"] else "no lesion")):
            groups.setdefault(key, []).append(r)
    summary = []
    for (split, cls), members in sorted(groups.items()):
        lesion = [m for m in members if m["lesion"]]
        row = {"split": split, "class": cls, "n": len(members), "lesion_images": len(lesion)}
        if lesion:
            dice = np.array([m["dice"] for m in lesion])
            row.update(dice=float(dice.mean()), dice_median=float(np.median(dice)),
                       iou=float(np.mean([m["iou"] for m in lesion])), miss_rate=float((dice < MISS_DICE).mean()))
        empty = [m for m in members if not m["lesion"]]
        if empty:
            row["nonempty_mask_rate_without_lesion"] = float(np.mean([m["area"] > 0 for m in empty]))
        summary.append(row)
    return {"store": store_path, "ground_truth": gt, "masks": prompt, "samples": per, "summary": summary}


def markdown(result: dict) -> str:
    m = result["masks"]
    lines = [f"Masks of `{result['store']}`, set `{m.get('mask_set', 'default')}` (prompt `{m.get('prompt')}`, "
             f"decoder `{m.get('decoder')}`) against "
             f"`{result['ground_truth']}`; miss = Dice < {MISS_DICE}", "",
             "| split | class | n | lesion images | Dice mean | Dice median | IoU mean | miss rate | mask where no lesion |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "" if v is None else f"{v:.3f}"

    for r in result["summary"]:
        lines.append(f"| {r['split']} | {r['class']} | {r['n']} | {r['lesion_images']} | {f(r.get('dice'))} | "
                     f"{f(r.get('dice_median'))} | {f(r.get('iou'))} | {f(r.get('miss_rate'))} | "
                     f"{f(r.get('nonempty_mask_rate_without_lesion'))} |")
    return "\n".join(lines) + "\n"


def oracle_boxes(store_path: str, gt: str, gt_name: str, out: Path, grow: int) -> int:
    """Write the ground truth's boxes, grown by ``grow`` pixels, as a ``--boxes`` CSV; returns rows."""
    with EmbeddingStore.open(store_path) as s:
        rows = np.flatnonzero(s.done)
        truth = ground_truth(s, gt, gt_name, rows)
        boxes = []
        for row in rows:
            t = truth[int(row)]
            ys, xs = np.nonzero(t)
            if not len(xs):
                continue
            h, w = t.shape
            boxes.append([str(s.ids[row]), max(0, xs.min() - grow), max(0, ys.min() - grow),
                          min(w, xs.max() + 1 + grow), min(h, ys.max() + 1 + grow)])

    def write(p: Path) -> None:
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "x0", "y0", "x1", "y1"])
            w.writerows(boxes)

    atomic_write(out, write)
    return len(boxes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--gt", required=True, help="csv:COLUMN of the dataset's CSV, or a folder of masks")
    ap.add_argument("--gt-name", default="{stem}{suffix}", help="a mask's file name in a --gt folder")
    ap.add_argument("--mask-set", default="default", help="the store's mask set to measure")
    ap.add_argument("--out", type=Path, help="OUT.json and OUT.md (the measurement)")
    ap.add_argument("--oracle-boxes", type=Path, help="write the grown ground-truth boxes here instead")
    ap.add_argument("--grow", type=int, default=5, help="pixels added on each side of an oracle box")
    a = ap.parse_args()
    if a.oracle_boxes:
        n = oracle_boxes(a.store, a.gt, a.gt_name, a.oracle_boxes, a.grow)
        print(f"wrote {n} oracle boxes (grown by {a.grow} px) to {a.oracle_boxes}")
        return
    if a.out is None:
        ap.error("--out is needed to measure")
    result = measure(a.store, a.gt, a.gt_name, a.mask_set)
    atomic_write(a.out.with_suffix(".json"), lambda p: p.write_text(json.dumps(result, indent=1)))
    atomic_write(a.out.with_suffix(".md"), lambda p: p.write_text(markdown(result)))
    print(markdown(result))


if __name__ == "__main__":
    main()
