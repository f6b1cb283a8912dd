"""The study: methods in paired runs against the train fraction, with paired differences and intervals.

    python bench/accuracy.py --store runs/busi.zarr --out runs/study-busi
    python bench/accuracy.py --store runs/isic.zarr --out runs/study-isic --extra-seeds "0.1:5-9;1.0:5-9"
    python bench/accuracy.py --store runs/busi.zarr --out runs/study-busi-focus --methods backbone,focus,focus_slca \\
        --set focus=crop
    # studies run side by side (one per core) on the same store and recipe, joined into one
    python bench/accuracy.py --merge runs/study-busi runs/study-busi-focus --out runs/study-busi-all
    # GPU, full size: a pretrained backbone at 224 px
    python bench/accuracy.py --store /data/busi.zarr --out runs/busi-r50 --set backbone=resnet50 img_size=224 pretrained=true

The protocol, the methods and the outputs are described in ``trainer/experiment.py``. ``--set``
overrides the recipe by the same option names ``slca-train`` takes (flat names, e.g.
``slca_lr_mult=10``); its defaults are sized for a CPU. A rerun resumes.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import yaml

warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)

from trainer.errors import ConfigError  # noqa: E402
from trainer.experiment import METHODS, StudyConfig, merge_studies, run_study  # noqa: E402


def _seed_list(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += range(int(a), int(b) + 1)
        elif part.strip():
            out.append(int(part))
    return tuple(out)


def main() -> None:
    base = StudyConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", help="a store made by samcache extract (with images)")
    p.add_argument("--out", required=True)
    p.add_argument("--fractions", default=",".join(f"{f:g}" for f in base.fractions))
    p.add_argument("--seeds", default=",".join(map(str, base.seeds)), help="e.g. 0-4")
    p.add_argument("--extra-seeds", default="", help="more seeds at some fractions, e.g. '0.1:5-9;1.0:5-9'")
    p.add_argument("--methods", default=",".join(base.methods),
                   help=f"of {', '.join(METHODS)}, or focus-MODE-SET (e.g. focus-overlay-gt: a mask set of the store)")
    p.add_argument("--focus", default=base.focus, help="the focus mode of the focus methods")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                   help="recipe options by slca-train's names (YAML values), over the CPU defaults")
    p.add_argument("--device")
    p.add_argument("--merge", nargs="+", metavar="STUDY", help="join these study folders into --out (no training)")
    a = p.parse_args()
    if a.merge:
        try:
            merge_studies(a.merge, a.out)
        except ConfigError as e:
            p.exit(2, f"accuracy.py: {e}\n")
        print((Path(a.out) / "summary.md").read_text())
        return
    if not a.store:
        p.error("--store is required (or --merge)")
    recipe = dict(base.train)
    for item in a.set:
        name, _, value = item.partition("=")
        recipe[name.replace("-", "_")] = yaml.safe_load(value)
    extra = {}
    for part in filter(None, a.extra_seeds.split(";")):
        f, _, seeds = part.partition(":")
        extra[float(f)] = _seed_list(seeds)
    cfg = StudyConfig(fractions=tuple(float(f) for f in a.fractions.split(",")), seeds=_seed_list(a.seeds),
                      extra_seeds=extra, methods=tuple(a.methods.split(",")), focus=a.focus, train=recipe)
    run_study(a.store, a.out, cfg, device=a.device, log=lambda s: print(s, flush=True))
    print((Path(a.out) / "summary.md").read_text())


if __name__ == "__main__":
    main()
