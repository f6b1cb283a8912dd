"""Accuracy against the train fraction: SLCA vs the same backbone alone vs a linear probe.

    python bench/accuracy.py ../shared/data/busi --out runs/study-busi
    python bench/accuracy.py ../shared/data/isic_550 --out runs/study-isic
    # GPU, full size:
    python bench/accuracy.py /data/busi --out runs/busi-r50 --backbone resnet50 --img-size 224 --epochs 50

The protocol and its outputs are described in ``trainer/experiment.py``. Defaults are sized for
a CPU (ResNet-18 at 64 px, 8 epochs with early stopping after 3 without progress). A rerun resumes.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)

from trainer.experiment import StudyConfig, run_fraction_study  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", nargs="?", help="dataset path (extracted once into OUT/store.zarr)")
    p.add_argument("--out", required=True)
    p.add_argument("--store", help="use an existing store instead of extracting")
    p.add_argument("--encoder", default="litemedsam")
    p.add_argument("--fractions", default="0.05,0.1,0.2,0.5,1.0")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pretrained", help="local backbone weights file (default: random init)")
    p.add_argument("--device")
    a = p.parse_args()
    if a.dataset is None and a.store is None:
        p.error("give a dataset path or --store")
    cfg = StudyConfig(
        fractions=tuple(float(f) for f in a.fractions.split(",")), seeds=tuple(int(s) for s in a.seeds.split(",")),
        encoder=a.encoder, store_image_size=max(128, a.img_size),
        train={"backbone": a.backbone, "img_size": a.img_size, "epochs": a.epochs, "patience": a.patience,
               "batch_size": a.batch_size, "lr": a.lr, **({"pretrained": a.pretrained} if a.pretrained else {})},
    )
    run_fraction_study(a.dataset, a.out, cfg, store=a.store, device=a.device, log=lambda s: print(s, flush=True))
    print((Path(a.out) / "summary.md").read_text())


if __name__ == "__main__":
    main()
