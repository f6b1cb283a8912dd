"""Extraction speed of several encoders side by side, and what each store costs on disk.

    python bench/encoder_speed.py --encoders litemedsam,sam2.1_hiera_t,medsam2 --n 8 --rounds 2 \\
        --out bench/results/encoder-speed-cpu.json

Each round runs :func:`sam_cache.extract_dataset` end to end (decode, resize, encode, write a
float16 Zarr store) for every encoder in turn on the same PNG files, so that a load that drifts
during the run falls on all of them alike; the JSON keeps every round's images a second, the median
per encoder, each median's ratio to the first encoder's, and each store's bytes on disk per sample,
array by array (the SAM 2 stores' ``high_res_*`` levels included). Encoders without a packaged
checkpoint run with random weights, which cost the same time as real ones.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)

from sam_cache import create_encoder, extract_dataset  # noqa: E402
from sam_cache.device import device_name  # noqa: E402

PACKAGED = {"litemedsam"}  # the one encoder whose real weights ship with a package here


def _pictures(folder: Path, n: int, px: int) -> Path:
    """``n`` noise PNGs of ``px`` x ``px * 3 // 4`` pixels (ultrasound-like aspect), in three classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        cls = folder / f"c{i % 3}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (px * 3 // 4, px, 3), dtype=np.uint8)).save(cls / f"{i:04d}.png")
    return folder


def _bytes_per_sample(store: Path, n: int) -> dict[str, float]:
    out = {}
    for array in sorted(p for p in store.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in array.rglob("*") if f.is_file())
        out[array.name] = size / n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default="litemedsam,sam2.1_hiera_t")
    ap.add_argument("--n", type=int, default=8, help="images per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--image-px", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    names = a.encoders.split(",")
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = {"bench": "encoder_speed", "date": datetime.date.today().isoformat(), "device": device_name(dev),
              "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "command": " ".join(sys.argv), "n": a.n, "rounds": a.rounds, "batch_size": a.batch_size,
              "image_px": [a.image_px * 3 // 4, a.image_px], "encoders": {}}
    tmp = Path(tempfile.mkdtemp(prefix="samcache-speed-"))
    try:
        data = _pictures(tmp / "data" / "train", a.n, a.image_px).parent
        encoders = {name: create_encoder(name, random_weights=name not in PACKAGED) for name in names}
        for name in names:
            result["encoders"][name] = {"random_weights": encoders[name].random_weights,
                                        "input": encoders[name].preprocessing.input_size, "img_per_s": []}
        for r in range(a.rounds):
            for name in names:
                out = tmp / f"{name}-{r}.zarr"
                run = extract_dataset(data, out, encoders[name], image_size=224, batch_size=a.batch_size,
                                      num_workers=a.workers, device=str(dev), progress=False)
                entry = result["encoders"][name]
                entry["img_per_s"].append(run.images_per_second)
                entry["bytes_per_sample"] = _bytes_per_sample(out, a.n)
                shutil.rmtree(out)
                print(f"round {r}: {name} {run.images_per_second:.3f} img/s", flush=True)
        base = float(np.median(result["encoders"][names[0]]["img_per_s"]))
        for name in names:
            entry = result["encoders"][name]
            entry["median_img_per_s"] = float(np.median(entry["img_per_s"]))
            entry[f"ratio_to_{names[0]}"] = entry["median_img_per_s"] / base
            entry["mib_per_sample"] = sum(entry["bytes_per_sample"].values()) / 2**20
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
