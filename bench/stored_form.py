"""The accuracy cost of a smaller stored form: SLCA trained on a float16 store and on its int8 copy.

    python bench/stored_form.py --store runs/isic.zarr --out runs/int8-isic
    # GPU, full size:
    python bench/stored_form.py --store /data/busi.zarr --out runs/int8-busi --backbone resnet50 --img-size 224 --epochs 50

The int8 copy is made with ``samcache convert`` (per-sample, per-channel scales; 1 MiB a sample
instead of 2 MiB). Both stores are trained with the same recipe (the accuracy study's: ResNet-18
at 64 px, 8 epochs, early stopping after 3) for each seed, and compared on the test split. Writes
``OUT/runs.csv`` (a rerun skips finished runs), ``OUT/stored_form.json`` and prints a markdown
table. A difference smaller than the larger seed spread is reported as no difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)

import numpy as np  # noqa: E402

from sam_cache import EmbeddingStore, convert_store  # noqa: E402
from trainer import TrainConfig, train  # noqa: E402
from trainer.experiment import StudyConfig, against_spread, mean_std  # noqa: E402
from trainer.records import read_rows, write_rows  # noqa: E402
from trainer.train import METRIC_KEYS  # noqa: E402


def embedding_error(a_path: str, b_path: str, rows: int = 64) -> dict:
    """Relative error ``||a - b|| / ||a||`` per sample over the first ``rows`` done rows: mean and max."""
    with EmbeddingStore.open(a_path) as a, EmbeddingStore.open(b_path) as b:
        idx = np.flatnonzero(a.done & b.done)[:rows]
        err = []
        for r in idx:
            x = a.read_embeddings(int(r), int(r) + 1).astype(np.float64)
            y = b.read_embeddings(int(r), int(r) + 1).astype(np.float64)
            err.append(np.linalg.norm(x - y) / np.linalg.norm(x))
    return {"rows": len(idx), "mean": float(np.mean(err)), "max": float(np.max(err))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="a float16 store with images")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fraction", type=float, default=1.0)
    recipe = StudyConfig().train
    p.add_argument("--backbone", default=recipe["backbone"])
    p.add_argument("--img-size", type=int, default=recipe["img_size"])
    p.add_argument("--epochs", type=int, default=recipe["epochs"])
    p.add_argument("--patience", type=int, default=recipe["patience"])
    p.add_argument("--batch-size", type=int, default=recipe["batch_size"])
    p.add_argument("--device")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    q = str(out / "int8.zarr")
    t0 = time.perf_counter()
    converted = convert_store(a.store, q, "int8")
    convert_seconds = time.perf_counter() - t0
    forms = {"float16": a.store, "int8": q}
    rows = read_rows(out / "runs.csv")
    done = {(r["form"], int(r["seed"])) for r in rows}
    for seed in (int(s) for s in a.seeds.split(",")):
        for form, path in forms.items():
            if (form, seed) in done:
                continue
            cfg = TrainConfig(cache=path, out=str(out / "runs" / f"{form}-s{seed}"), backbone=a.backbone,
                              img_size=a.img_size, epochs=a.epochs, patience=a.patience, batch_size=a.batch_size,
                              seed=seed, subset_seed=seed, train_fraction=None if a.fraction >= 1 else a.fraction,
                              device=a.device)
            t = time.perf_counter()
            m = train(cfg, overwrite=True, log=lambda _: None)["test"]
            rows.append({"form": form, "seed": seed, **{k: m[k] for k in METRIC_KEYS},
                         "seconds": round(time.perf_counter() - t, 1)})
            write_rows(rows, out / "runs.csv")
            print(f"{form:>8} seed {seed}  bal.acc {m['balanced_accuracy']:.3f}  AUC {m['auc']:.3f}", flush=True)

    summary = {form: {k: mean_std([r[k] for r in rows if r["form"] == form]) for k in METRIC_KEYS} for form in forms}
    report = {"store": a.store, "int8_store": q, "convert_seconds": round(convert_seconds, 1),
              "bytes_per_sample": {"float16": converted["src_bytes"], "int8": converted["dst_bytes"]},
              "embedding_relative_error": embedding_error(a.store, q), "seeds": a.seeds, "fraction": a.fraction,
              "recipe": {"backbone": a.backbone, "img_size": a.img_size, "epochs": a.epochs, "patience": a.patience},
              "test": {f: {k: {"mean": m, "std": s} for k, (m, s) in v.items()} for f, v in summary.items()}}
    (out / "stored_form.json").write_text(json.dumps(report, indent=2))
    print("| stored form | MiB per sample | accuracy | balanced accuracy | macro-F1 | AUC |")
    print("|---|---|---|---|---|---|")
    for form in forms:
        cells = " | ".join(f"{summary[form][k][0]:.3f} ± {summary[form][k][1]:.3f}" for k in METRIC_KEYS)
        print(f"| {form} | {report['bytes_per_sample'][form] / 2**20:.2f} | {cells} |")
    for k in ("balanced_accuracy", "auc"):
        diff, spread, same = against_spread(*summary["int8"][k], *summary["float16"][k])
        word = "no difference" if same else ("int8 better" if diff > 0 else "int8 worse")
        print(f"{k}: int8 - float16 = {diff:+.3f}, seed spread {spread:.3f}: {word}")
    err = report["embedding_relative_error"]
    print(f"embedding relative error (L2, {err['rows']} samples): mean {err['mean']:.2e}, max {err['max']:.2e}")


if __name__ == "__main__":
    main()
