"""How the learned prompt's box is decoded, compared on one split's lesions (the choice is made on val).

    python bench/learned_decode.py runs/busi.zarr --head-set learned-c3 --gt-set gt --split val --out runs/ld-val

The head kept in ``--head-set`` (a set made by ``samcache masks --prompt learned``) gives each
image's lesion map; each variant below turns that map into a prompt for the store's SAM decoder,
and its masks are measured against ``--gt-set`` (the ground truth, already in the store with
``--from-masks``) on the lesion images of ``--split``:

- ``box``: the box of the map's largest region (what ``--prompt learned`` does), grown by ``grow``;
- ``box+point``: that box and a positive point at the map's peak inside it;
- ``box+refine``: the box, then the decoder run again with its own mask logits as the mask prompt;
- ``box+multi``: the decoder's three masks for the box, keeping the one that agrees best with the
  head's map (soft Dice), not the one SAM scores highest.

Nothing is written to the store. Writes ``OUT.json`` (per-image Dice per variant) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sam_cache import EmbeddingStore  # noqa: E402
from sam_cache import learned_prompt as lp  # noqa: E402
from sam_cache.masks import create_mask_decoder, logits_to_stored_mask  # noqa: E402
from sam_cache.outputs import atomic_write  # noqa: E402

from mask_quality import MISS_DICE, dice_iou  # noqa: E402

VARIANTS = ("box", "box+point", "box+refine", "box+point+refine", "box+multi")


@torch.no_grad()
def _decode(decoder, emb, box, point, mask_in, multimask):
    pts = None if point is None else (point[None, None, :], torch.ones(1, 1, dtype=torch.int))
    sparse, dense = decoder.prompt_encoder(points=pts, boxes=box[None, None, :], masks=mask_in)
    return decoder.mask_decoder(image_embeddings=emb, image_pe=decoder.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=multimask)


@torch.no_grad()
def run(store_path: str, head_set: str, gt_set: str, split: str, grows: list[float]) -> dict:
    with EmbeddingStore.open(store_path) as store:
        hs = store.mask_set(head_set)
        recipe = lp.HeadRecipe(**hs.signature["head"])
        head = lp.load_head(hs.kept_head, recipe.width, recipe.context)
        decoder = create_mask_decoder(store.signature)
        frame, r, grid = decoder.input_size, store.image_size, store.grid
        rows = store.split_indices(split)
        truth = store.mask_set(gt_set).read(rows)[:, 0] > 0
        keep = truth.reshape(len(rows), -1).any(1)
        rows, truth = rows[keep], truth[keep]
        per = {f"{v} grow={g:g}": [] for g in grows for v in VARIANTS}
        t0 = time.perf_counter()
        for k, row in enumerate(rows):
            emb = torch.from_numpy(store.read_rows(np.array([row]))).float()
            prob = torch.sigmoid(head(emb))[0, 0]
            orig = store.orig_size[row]
            maps = prob[None].numpy()
            for g in grows:  # the head's map once per image, its box per growth
                box = torch.from_numpy(lp.maps_to_boxes(store, maps, np.array([row]), frame, g)[0])
                cells = box * grid / frame
                x0, y0, x1, y1 = (int(v) for v in cells.floor())
                sub = prob[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
                py, px = np.unravel_index(int(sub.argmax()), tuple(sub.shape))
                point = torch.tensor([(x0 + px + 0.5) * frame / grid, (y0 + py + 0.5) * frame / grid])
                for v in VARIANTS:
                    pt = point if "point" in v else None
                    logits, _ = _decode(decoder, emb, box, pt, None, "multi" in v)
                    if "refine" in v:
                        logits, _ = _decode(decoder, emb, box, pt, logits[:, :1], False)
                    if "multi" in v:
                        soft = F.interpolate(prob[None, None], size=logits.shape[-2:], mode="bilinear",
                                             align_corners=False)[0, 0]
                        hard = (logits[0] > 0).float()
                        agree = 2 * (hard * soft).sum((1, 2)) / (hard.sum((1, 2)) + soft.sum() + 1e-6)
                        pick = int(agree.argmax())
                    else:
                        pick = 0
                    mask = logits_to_stored_mask(logits[0, pick], orig, r, 0.0) > 0
                    per[f"{v} grow={g:g}"].append(dice_iou(mask, truth[k])[0])
        seconds = time.perf_counter() - t0
    summary = {name: {"n": len(d), "dice_mean": float(np.mean(d)), "dice_median": float(np.median(d)),
                      "miss_rate": float(np.mean(np.array(d) < MISS_DICE))} for name, d in per.items()}
    return {"store": str(store_path), "head_set": head_set, "gt_set": gt_set, "split": split,
            "ids": [str(store.ids[i]) for i in rows], "per_image": per, "summary": summary, "seconds": seconds}


def markdown(result: dict) -> str:
    lines = [f"Learned-prompt decoding variants, `{result['store']}`, head of `{result['head_set']}`, "
             f"{result['split']} lesions against `{result['gt_set']}` ({result['seconds']:.0f} s)", "",
             "| variant | n | Dice mean | Dice median | miss rate |", "|---|---|---|---|---|"]
    for name, s in result["summary"].items():
        lines.append(f"| {name} | {s['n']} | {s['dice_mean']:.3f} | {s['dice_median']:.3f} | {s['miss_rate']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--head-set", required=True, help="a learned mask set that keeps its head")
    ap.add_argument("--gt-set", required=True, help="the ground-truth mask set in the same store")
    ap.add_argument("--split", default="val")
    ap.add_argument("--grow", default="0.5,1,2", help="grid cells added to each side of the box, comma-separated")
    ap.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    result = run(a.store, a.head_set, a.gt_set, a.split, [float(g) for g in a.grow.split(",")])
    text = markdown(result)
    out = Path(a.out)
    atomic_write(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(result, indent=1)))
    atomic_write(out.with_suffix(".md"), lambda p: p.write_text(text))
    print(text, end="")


if __name__ == "__main__":
    main()
