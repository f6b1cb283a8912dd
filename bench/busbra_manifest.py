"""Write a samcache CSV manifest for BUS-BRA with its patient-level test fold.

BUS-BRA (Gomez-Flores et al., "BUS-BRA: A Breast Ultrasound Dataset for Assessing Computer-aided
Diagnosis Systems", Medical Physics 2024; its licence asks every paper that uses it to cite that
article) ships ``bus_data.csv`` (``ID``, ``Case`` = patient, ``Pathology``, ``BBOX``...) and
``5-fold-cv.csv`` (``kFold``: the fold in which an image is test). This script joins them into one
CSV that ``samcache extract`` reads:

    path,label,case,split,mask,bbox,device

``split`` is ``test`` for the images of fold ``--fold`` (default 1) and ``train`` for the rest;
``samcache extract --group-column case`` then draws val from the train patients, whole patients
only. Paths are absolute, so the CSV may live anywhere (``runs/`` here: nothing of the dataset is
committed).

    python bench/busbra_manifest.py ../shared/data/busbra runs/busbra/labels.csv
    samcache extract --dataset runs/busbra/labels.csv --out runs/busbra.zarr --group-column case
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def write_manifest(root: Path, out: Path, fold: int = 1) -> int:
    """Write the manifest of the BUS-BRA folder ``root`` to ``out``; returns the number of rows.

    Raises:
      SystemExit: a file of the dataset is missing, or an image has no fold.
    """
    root = root.resolve()
    with open(root / "bus_data.csv", newline="") as f:
        images = list(csv.DictReader(f))
    with open(root / "5-fold-cv.csv", newline="") as f:
        folds = {r["ID"]: int(r["kFold"]) for r in csv.DictReader(f)}
    rows = []
    for r in images:
        image = root / "Images" / f"{r['ID']}.png"
        mask = root / "Masks" / f"{r['ID'].replace('bus_', 'mask_')}.png"
        if not image.is_file() or r["ID"] not in folds:
            raise SystemExit(f"{root}: {r['ID']} has no image file or no fold in 5-fold-cv.csv")
        rows.append({"path": str(image), "label": r["Pathology"], "case": r["Case"],
                     "split": "test" if folds[r["ID"]] == fold else "train",
                     "mask": str(mask) if mask.is_file() else "", "bbox": r["BBOX"], "device": r["Device"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out)
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="the BUS-BRA folder (bus_data.csv, 5-fold-cv.csv, Images/, Masks/)")
    ap.add_argument("out", type=Path, help="the CSV to write")
    ap.add_argument("--fold", type=int, default=1, choices=range(1, 6), help="the test fold of 5-fold-cv.csv")
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; remove it first (this script does not overwrite)")
    n = write_manifest(args.root, args.out, args.fold)
    print(f"wrote {n} BUS-BRA rows to {args.out} (fold {args.fold} as test)")


if __name__ == "__main__":
    main()
