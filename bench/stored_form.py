"""The accuracy cost of a smaller stored form: the same recipe trained on float16 and on converted copies.

    python bench/stored_form.py --store runs/isic.zarr --out runs/forms-isic --forms int8 --seeds 0-9
    # GPU, full size:
    python bench/stored_form.py --store /data/busi.zarr --out runs/forms-busi --set backbone=resnet50 img_size=224

Each form is made from the float16 store with ``samcache convert`` (no encoder), once, into
``OUT/<form>.zarr``. For every seed the same recipe (the study's CPU recipe unless ``--set``
changes it) trains on float16 and on each form, with the same subset, order and initialization,
and the test metrics are compared as paired differences (form − float16) with a 95 % t-interval.
Writes ``OUT/runs.csv`` (a rerun skips finished runs), ``OUT/stored_form.json`` and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path


warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)

import numpy as np  # noqa: E402

from sam_cache import EmbeddingStore, convert_store  # noqa: E402
from sam_cache.store import pool_to_grid  # noqa: E402
from trainer import TrainConfig, train  # noqa: E402
from trainer.config import METRIC_KEYS  # noqa: E402
from trainer.experiment import StudyConfig  # noqa: E402
from trainer.stats import mean_std, paired_difference, verdict  # noqa: E402
from trainer.recipe_args import parse_seeds, parse_sets  # noqa: E402
from trainer.records import RunLedger  # noqa: E402

FORMS = {"int8": {"dtype": "int8"}, "grid32": {"grid": 32}, "grid16": {"grid": 16},
         "grid32-int8": {"grid": 32, "dtype": "int8"}}


def embedding_error(a_path: str, b_path: str, rows: int = 64) -> dict:
    """Relative error ``||a - b|| / ||a||`` per sample over the first ``rows`` done rows: mean and max.

    For a compact grid, ``a`` is pooled to ``b``'s grid first: the error then measures the encoding
    (int8), not the pooling, which is what the accuracy rows measure.
    """
    with EmbeddingStore.open(a_path) as a, EmbeddingStore.open(b_path) as b:
        idx = np.flatnonzero(a.done & b.done)[:rows]
        err = []
        for r in idx:
            x = a.read_embeddings(int(r), int(r) + 1).astype(np.float64)
            y = b.read_embeddings(int(r), int(r) + 1).astype(np.float64)
            if y.shape != x.shape:  # a compact grid: compare with the source pooled the same way
                x = pool_to_grid(x, y.shape[-1]).numpy().astype(np.float64)
            err.append(np.linalg.norm(x - y) / np.linalg.norm(x))
    return {"rows": len(idx), "mean": float(np.mean(err)), "max": float(np.max(err))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="a float16 store with images")
    p.add_argument("--out", required=True)
    p.add_argument("--forms", default="int8", help=f"comma-separated, of {', '.join(FORMS)}")
    p.add_argument("--seeds", default="0-4", help="e.g. 0-9")
    p.add_argument("--fraction", type=float, default=1.0)
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="recipe options by slca-train's names")
    p.add_argument("--device")
    a = p.parse_args()
    recipe = {**StudyConfig().train, **parse_sets(a.set)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    forms = {"float16": {"path": a.store}}
    for name in a.forms.split(","):
        path = str(out / f"{name}.zarr")
        t0 = time.perf_counter()
        converted = convert_store(a.store, path, progress=False, **FORMS[name])
        forms[name] = {"path": path, "bytes": converted["dst_bytes"], "convert_seconds": round(time.perf_counter() - t0, 1),
                       "error": embedding_error(a.store, path)}
        forms["float16"]["bytes"] = converted["src_bytes"]
    ledger = RunLedger(out / "runs.csv", {"form": str, "seed": int})
    rows = ledger.rows
    for seed in parse_seeds(a.seeds):
        for form, info in forms.items():
            if ledger.done(form, seed):
                continue
            cfg = TrainConfig.from_dict({**recipe, "cache": info["path"], "out": str(out / "runs" / f"{form}-s{seed}"),
                                         "seed": seed, "subset_seed": seed, "device": a.device,
                                         "train_fraction": None if a.fraction >= 1 else a.fraction})
            t = time.perf_counter()
            m = train(cfg, overwrite=True, log=lambda _: None)["test"]
            ledger.record({"form": form, "seed": seed, **{k: m[k] for k in METRIC_KEYS},
                           "seconds": round(time.perf_counter() - t, 1)})
            print(f"{form:>8} seed {seed}  bal.acc {m['balanced_accuracy']:.3f}", flush=True)

    summary = {form: {k: mean_std([r[k] for r in rows if r["form"] == form]) for k in METRIC_KEYS} for form in forms}
    paired = {}
    for form in forms:
        if form == "float16":
            continue
        paired[form] = {}
        for k in ("balanced_accuracy", "auc"):
            a_ = {int(r["seed"]): float(r[k]) for r in rows if r["form"] == form and r[k] not in ("", None)}
            b_ = {int(r["seed"]): float(r[k]) for r in rows if r["form"] == "float16" and r[k] not in ("", None)}
            seeds = sorted(set(a_) & set(b_))
            paired[form][k] = paired_difference([a_[s] for s in seeds], [b_[s] for s in seeds])
    report = {"store": a.store, "forms": forms, "seeds": a.seeds, "fraction": a.fraction, "recipe": recipe,
              "test": {f: {k: {"mean": m, "std": s} for k, (m, s) in v.items()} for f, v in summary.items()},
              "paired": paired}
    (out / "stored_form.json").write_text(json.dumps(report, indent=2))
    print("| stored form | MiB per sample | accuracy | balanced accuracy | macro-F1 | AUC |")
    print("|---|---|---|---|---|---|")
    for form, info in forms.items():
        cells = " | ".join(f"{summary[form][k][0]:.3f} ± {summary[form][k][1]:.3f}" for k in METRIC_KEYS)
        print(f"| {form} | {info['bytes'] / 2**20:.2f} | {cells} |")
    for form, diffs in paired.items():
        for k, d in diffs.items():
            print(f"{k}: {form} - float16 = {d['mean']:+.3f}, 95 % interval [{d['low']:+.3f}, {d['high']:+.3f}] "
                  f"over {d['n']} seeds: {verdict(d, 0.005)}")
        err = forms[form]["error"]
        print(f"{form} embedding relative error (L2, {err['rows']} samples): mean {err['mean']:.2e}, max {err['max']:.2e}")


if __name__ == "__main__":
    main()
