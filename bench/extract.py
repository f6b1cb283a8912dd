"""Extraction speed, side by side in one process on the same image files.

    python bench/extract.py --encoder tiny --n 16 --out bench/extract-cpu.json            # CPU smoke run
    python bench/extract.py --encoder vit_h --random-weights --n 256 --batch-size 8 --out bench/extract-vith.json
    python bench/extract.py --encoder litemedsam --n 2048 --batch-size 256 --out bench/extract-lite.json

Paths, each from PNG files on disk to embeddings:

- ``predictor``: a ``SamPredictor.set_image`` loop, one image at a time (SAM ViTs and tiny);
- ``stock_batched``: decode in the main thread, the stock encoder in batches (bf16 on CUDA), no store;
- ``samcache``: :func:`sam_cache.extract_dataset` end to end into a Zarr store (workers, SDPA
  attention on CUDA, writer thread);
- ``disk_write``: zarr writing the same number of 2 MiB float16 samples, one thread, the disk's
  ceiling for float16 extraction.

The JSON holds img/s for each, the ratios, the fraction of the measured write bandwidth that
extraction reached, and the encoder's FLOP per image (counted by torch's FlopCounterMode), hence
the achieved TFLOP/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)

from sam_cache import create_encoder, extract_dataset  # noqa: E402
from sam_cache.device import device_name, sync  # noqa: E402
from sam_cache.preprocess import load_frame, normalize_frames, read_image, to_rgb_uint8  # noqa: E402


def _images(folder: Path, n: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    from PIL import Image

    paths = []
    for i in range(n):
        cls = folder / f"c{i % 3}"
        cls.mkdir(parents=True, exist_ok=True)
        p = cls / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="tiny")
    ap.add_argument("--checkpoint")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--image-px", type=int, default=512, help="side of the synthetic PNGs")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device")
    ap.add_argument("--skip-predictor", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tmp = Path(tempfile.mkdtemp(prefix="samcache-bench-"))
    result = {"bench": "extract", "date": datetime.date.today().isoformat(), "device": device_name(dev),
              "command": " ".join(sys.argv), "encoder": a.encoder, "n": a.n, "batch_size": a.batch_size}
    try:
        paths = _images(tmp / "data" / "train", a.n, a.image_px)
        enc = create_encoder(a.encoder, checkpoint=a.checkpoint, random_weights=a.random_weights)
        model, pre = enc.model.to(dev), enc.preprocessing
        amp = dev.type == "cuda"

        # FLOP per image
        from torch.utils.flop_counter import FlopCounterMode

        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            model(torch.zeros(1, 3, pre.input_size, pre.input_size, device=dev))
        result["gflop_per_image"] = fc.get_total_flops() / 1e9

        # predictor loop
        if not a.skip_predictor and a.encoder in ("tiny", "vit_b", "vit_l", "vit_h", "medsam"):
            from segment_anything import SamPredictor, sam_model_registry

            from sam_cache.encoders import build_tiny_sam

            sam = build_tiny_sam() if a.encoder == "tiny" else sam_model_registry[
                {"medsam": "vit_b"}.get(a.encoder, a.encoder)](checkpoint=None)
            sam.image_encoder.load_state_dict(enc.model.state_dict())
            predictor = SamPredictor(sam.to(dev))
            sync(dev)
            t0 = time.perf_counter()
            for p in paths:
                rgb, _ = to_rgb_uint8(read_image(p)[0])
                with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                    predictor.set_image(rgb)
            sync(dev)
            result["predictor_img_per_s"] = a.n / (time.perf_counter() - t0)

        # stock batched encoder, decode in the main thread, no store
        sync(dev)
        t0 = time.perf_counter()
        for i in range(0, a.n, a.batch_size):
            frames, sizes = zip(*(load_frame(to_rgb_uint8(read_image(p)[0])[0], pre.input_size)
                                  for p in paths[i:i + a.batch_size]))
            x = normalize_frames(torch.from_numpy(np.stack(frames)).to(dev), torch.tensor(sizes), pre)
            with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                model(x).to(torch.float16).cpu()
        sync(dev)
        result["stock_batched_img_per_s"] = a.n / (time.perf_counter() - t0)

        # samcache end to end
        r = extract_dataset(tmp / "data", tmp / "store.zarr", enc, image_size=0, batch_size=a.batch_size,
                            num_workers=a.workers, device=str(dev), progress=False)
        result["samcache_img_per_s"] = r.images_per_second

        # the disk's ceiling for 2 MiB float16 samples, one writer thread
        import zarr

        arr = zarr.create_array(str(tmp / "disk.zarr"), shape=(a.n, 256, 64, 64), dtype="float16",
                                chunks=(1, 256, 64, 64), shards=(16, 256, 64, 64), compressors=None, fill_value=0)
        block = np.random.default_rng(0).standard_normal((16, 256, 64, 64)).astype(np.float16)
        t0 = time.perf_counter()
        for i in range(0, a.n, 16):
            arr[i:i + 16] = block[: min(16, a.n - i)]
        write_s = time.perf_counter() - t0
        result["disk_write_gb_per_s"] = a.n * block[0].nbytes / write_s / 1e9
        result["disk_write_img_per_s"] = a.n / write_s

        s = result["samcache_img_per_s"]
        result["ratio_samcache_vs_stock_batched"] = s / result["stock_batched_img_per_s"]
        if "predictor_img_per_s" in result:
            result["ratio_samcache_vs_predictor"] = s / result["predictor_img_per_s"]
        result["fraction_of_disk_write"] = s / result["disk_write_img_per_s"]
        result["achieved_tflop_per_s"] = s * result["gflop_per_image"] / 1e3
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
