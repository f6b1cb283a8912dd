"""Training speed, three modes side by side in one run, timing the trainer's own step.

    python bench/train.py --out bench/train-cpu.json                                   # CPU smoke run
    python bench/train.py --backbone resnet50 --img-size 224 --batch-size 256 --encoder vit_h \\
        --n 2048 --steps 50 --online-steps 5 --out bench/train-r50.json                 # GPU

Every mode runs :class:`trainer.step.BatchPipeline` and :func:`trainer.step.train_step`, the
functions ``slca-train`` runs (bf16 autocast and channels_last on CUDA), and syncs with the device
only at the end of the timed steps, as the trainer does between log intervals:

- ``slca_cached``: SLCA + backbone, embeddings from the cache (GPU memory when they fit);
- ``backbone``: the same backbone alone (``--no-slca``), same batches and crops;
- ``online``: SLCA + backbone with the frozen encoder run on every batch instead of the cache.

A store of ``--n`` random embeddings and images is synthesized unless ``--store`` names a real
one. The JSON holds img/s per mode, the cache residency, and the ratios ``slca_cached / backbone``
(target >= 0.9) and ``slca_cached / online`` (target >= 30).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)

from sam_cache import EmbeddingStore, create_encoder  # noqa: E402
from sam_cache.device import device_name, sync  # noqa: E402
from sam_cache.readers import DatasetManifest, Record  # noqa: E402
from sam_cache.preprocess import normalize_frames  # noqa: E402
from trainer import TrainConfig, build_model  # noqa: E402
from trainer.data import PairedCache  # noqa: E402
from trainer.step import BatchPipeline, train_step  # noqa: E402


def synthetic_store(path: Path, n: int, image_size: int, signature: dict, splits: bool = False) -> Path:
    """A store of ``n`` random embeddings and images (3 classes), every row done; all in train, or
    with ``splits`` every tenth row in test and the next in val (what a training run needs)."""
    def split(i: int) -> str:
        return {0: "test", 1: "val"}.get(i % 10, "train") if splits else "train"

    records = [Record(f"s{i:06d}", i % 3, split(i), f"synthetic:{i}") for i in range(n)]
    manifest = DatasetManifest("synthetic", "folder", records, ["a", "b", "c"], {"source": "given"})
    rng = np.random.default_rng(0)
    sig = dict(signature, dtype="float16", manifest_sha256=manifest.sha256(), image_size=image_size)
    with EmbeddingStore.create(path, manifest.row_schema(), sig, image_size=image_size) as store:
        for i in range(0, n, 64):
            k = min(64, n - i)
            store.write_rows(i, rng.standard_normal((k, 256, 64, 64), dtype=np.float32),
                             np.full((k, 2), 512, np.int32), np.full((k, 2), 64, np.int32),
                             np.full((k, 2), np.nan, np.float32),
                             rng.integers(0, 256, (k, 3, image_size, image_size), dtype=np.uint8))
            store.mark_done(np.arange(i, i + k))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--encoder", default="tiny", help="the encoder of the online mode")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--online-steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = create_encoder(a.encoder, random_weights=a.encoder not in ("tiny", "litemedsam"))
    tmp = Path(tempfile.mkdtemp(prefix="samcache-train-bench-"))
    store_path = a.store or synthetic_store(tmp / "store.zarr", a.n, max(a.img_size, 64), encoder.signature())
    result = {"bench": "train", "date": datetime.date.today().isoformat(), "device": device_name(dev),
              "command": " ".join(sys.argv), "backbone": a.backbone, "img_size": a.img_size,
              "batch_size": a.batch_size, "encoder_online": a.encoder, "step": "trainer.step.train_step"}
    amp = dev.type == "cuda"
    enc_model = encoder.model.to(dev)
    pre = encoder.preprocessing
    with EmbeddingStore.open(store_path) as store, \
            PairedCache(store, np.flatnonzero(store.done), dev, "auto", embeddings=True) as cache:
        rows = cache.rows
        result["cache_mode"] = cache.mode

        def run(mode: str, steps: int) -> float:
            cfg = TrainConfig.from_dict({"cache": str(store_path), "out": "", "backbone": a.backbone,
                                         "img_size": a.img_size, "slca": mode != "backbone", "device": str(dev)})
            model, _ = build_model(cfg, len(store.class_names))
            model = model.to(dev)
            if amp:
                model = model.to(memory_format=torch.channels_last)
            pipeline = BatchPipeline(model, cfg, dev)
            opt = torch.optim.AdamW(model.param_groups(1e-4, 0.05))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
            loss_fn = partial(F.cross_entropy)
            rng = np.random.default_rng(0)
            model.train()
            t0 = None
            for step in range(a.warmup + steps):
                if step == a.warmup:
                    sync(dev)
                    t0 = time.perf_counter()
                batch = np.sort(rng.choice(rows, a.batch_size, replace=False))
                boxes, flips = pipeline.boxes(cache, batch, rng)
                if mode == "online":  # the frozen encoder on this batch's images, in its own frame
                    img, _, y = cache.batch(batch, embeddings=False)
                    frames = F.interpolate(img.float(), size=(pre.input_size,) * 2, mode="bilinear", align_corners=False)
                    sizes = torch.full((len(batch), 2), pre.input_size)
                    with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                        emb = enc_model(normalize_frames(frames.round().clamp(0, 255).byte(), sizes, pre))
                    x, e, y = pipeline.views(img, emb, y, boxes, flips)
                else:
                    x, e, y = pipeline(cache, batch, boxes, flips)
                train_step(model, x, e, y, opt, sched, loss_fn, amp)
            sync(dev)
            return steps * a.batch_size / (time.perf_counter() - t0)

        for mode, steps in (("slca_cached", a.steps), ("backbone", a.steps), ("online", a.online_steps)):
            result[f"{mode}_img_per_s"] = run(mode, steps)
    result["ratio_slca_cached_vs_backbone"] = result["slca_cached_img_per_s"] / result["backbone_img_per_s"]
    result["ratio_slca_cached_vs_online"] = result["slca_cached_img_per_s"] / result["online_img_per_s"]
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
