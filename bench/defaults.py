"""Choose recipe defaults on validation data: one lever at a time against a base, over paired seeds.

    python bench/defaults.py --store runs/busi.zarr --out runs/defaults-busi --seeds 0-2
    python bench/defaults.py --store runs/isic.zarr --out runs/defaults-isic --seeds 0-2 \\
        --variant "lr_x10: slca_lr_mult=10" --variant "balanced: class_balance=loss"

Every variant changes the base recipe in one place and trains on the same seeds (same subset,
order, crops and initialization). Only validation metrics are read: the selected epoch's, and the
last epoch's (which no selection touched). The test split is never scored here, so choosing on
these numbers does not tune on test. Writes ``OUT/levers.csv`` and prints, per variant, the
mean ± std over seeds and the paired difference to the base with a 95 % t-interval. A rerun
resumes: finished rows are kept, and a run cut off part way continues from its last epoch.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)

from sam_cache import EmbeddingStore  # noqa: E402
from trainer import TrainConfig  # noqa: E402
from trainer.train import train_or_resume  # noqa: E402
from trainer.data import PairedCache  # noqa: E402
from trainer.experiment import StudyConfig  # noqa: E402
from trainer.stats import mean_std, paired_difference  # noqa: E402
from trainer.recipe_args import parse_seeds, parse_sets  # noqa: E402
from trainer.records import RunLedger, read_rows  # noqa: E402

VARIANTS = {
    "base": {},
    "slca_lr_x10": {"slca_lr_mult": 10.0},
    "class_balanced": {"class_balance": "loss"},
    "warmup_30": {"warmup_steps": 30},
    "last_stages": {"stages": [3, 4]},
    "fuse_meanstd": {"fuse": "meanstd"},
}


def _parse(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    return name.strip(), parse_sets(rest.split())


PER_RUN = ("out", "cache", "device", "seed", "subset_seed")  # what differs between a folder's runs by design


def _recipe(cfg: TrainConfig) -> dict:
    return {k: v for k, v in cfg.flat().items() if k not in PER_RUN}


def _check_base(out: Path, want: dict) -> None:
    """Refuse to add rows to ``out`` when its base was trained on another recipe than ``want``
    (a default changed since, or other ``--set`` values): new variants would be compared with a
    base they do not share. Reads the ``recipe`` that ``levers.yaml`` records (written before the
    first run since 2026-12-07) and each ``runs/base-sN/config.yaml``; names what differs."""
    sources = [(path, _recipe(TrainConfig.from_dict(yaml.safe_load(path.read_text()), source=str(path))))
               for path in sorted((out / "runs").glob("base-s*/config.yaml"))]
    recorded = out / "levers.yaml"
    if recorded.exists():
        recipe = (yaml.safe_load(recorded.read_text()) or {}).get("recipe")
        if recipe is not None:
            sources.append((recorded, recipe))
    for path, have in sources:
        differ = sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))
        if differ:
            raise SystemExit(f"{path}: this folder's base ran on another recipe ("
                             + ", ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in differ)
                             + "); pass --set to match it, or use another --out")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0-2")
    p.add_argument("--fraction", type=float, default=1.0)
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="the base recipe, over the study's")
    p.add_argument("--variant", action="append", default=[], metavar="'NAME: opt=value ...'",
                   help="variants to try instead of the built-in levers")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    base = {**StudyConfig().train, "slca": True, **parse_sets(a.set)}
    variants = dict([_parse(v) for v in a.variant]) if a.variant else VARIANTS
    variants = {"base": {}, **variants}
    seeds = list(parse_seeds(a.seeds))
    out = Path(a.out)

    def config(name: str, seed: int) -> TrainConfig:
        return TrainConfig.from_dict({**base, **variants[name], "cache": a.store, "seed": seed, "subset_seed": seed,
                                      "device": a.device, "out": str(out / "runs" / f"{name}-s{seed}"),
                                      "train_fraction": None if a.fraction >= 1 else a.fraction})

    recipe = _recipe(config("base", 0))
    _check_base(out, recipe)
    out.mkdir(parents=True, exist_ok=True)
    record = {"base": base, "variants": variants, "recipe": recipe}
    (out / "levers.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    ledger = RunLedger(out / "levers.csv", {"variant": str, "seed": int})
    rows = ledger.rows
    dev = torch.device(a.device)
    with EmbeddingStore.open(a.store) as s, PairedCache(s, np.flatnonzero(s.done), dev, "host") as cache:
        for seed in seeds:
            for name, opts in variants.items():
                if ledger.done(name, seed):
                    continue
                t0 = time.perf_counter()
                result = train_or_resume(config(name, seed), note=print, log=lambda _: None, cache=cache)
                last = read_rows(out / "runs" / f"{name}-s{seed}" / "metrics.csv")[-1]
                ledger.record({"variant": name, "seed": seed, "val_best_balanced_accuracy": result["val_best"]["balanced_accuracy"],
                             "val_last_balanced_accuracy": float(last["val_balanced_accuracy"]),
                             "val_last_loss": float(last["val_loss"]), "best_epoch": result["best_epoch"],
                             "steps": result["steps"], "seconds": round(time.perf_counter() - t0, 1)})
                print(f"{name:>15} seed {seed}  val best {rows[-1]['val_best_balanced_accuracy']:.3f}  "
                      f"last {rows[-1]['val_last_balanced_accuracy']:.3f}", flush=True)
    print(f"| variant | changes | val bal. acc. (selected epoch) | last epoch | Δ last epoch vs base, 95 % interval |")
    print("|---|---|---|---|---|")
    by = lambda v, k: {int(r["seed"]): float(r[k]) for r in rows if r["variant"] == v}  # noqa: E731
    for name, opts in variants.items():
        b, l_ = by(name, "val_best_balanced_accuracy"), by(name, "val_last_balanced_accuracy")
        base_l = by("base", "val_last_balanced_accuracy")
        common = sorted(set(l_) & set(base_l))
        d = paired_difference([l_[s] for s in common], [base_l[s] for s in common])
        diff = "—" if name == "base" or d["n"] < 2 else f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
        mb, sb = mean_std(list(b.values()))
        ml, sl = mean_std(list(l_.values()))
        print(f"| {name} | {opts or '-'} | {mb:.3f} ± {sb:.3f} | {ml:.3f} ± {sl:.3f} | {diff} |")


if __name__ == "__main__":
    main()
