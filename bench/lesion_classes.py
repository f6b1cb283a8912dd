"""A study's runs scored again on the lesion classes only: does focus help beyond telling "no lesion"?

    python bench/lesion_classes.py runs/study-busi-focus --classes benign,malignant --out bench/results/x.md

Why: ground-truth masks of images without a lesion (BUSI's ``normal``) are empty, so under
``--focus`` the classifier is told the class of those images by the mask itself. Scoring each
trained model (its ``best.pt``, chosen on validation as in the study) on the test images of the
lesion classes only, with its probabilities renormalised over those classes, removes that cue
and keeps what the mask says about the lesion. Paired differences against ``backbone`` and their
95 % t-intervals are computed as in the study (:func:`trainer.stats.paired_difference`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sam_cache import EmbeddingStore  # noqa: E402
from sam_cache.outputs import atomic_write  # noqa: E402
from trainer.data import PairedCache  # noqa: E402
from trainer.evaluate import load_run_model  # noqa: E402
from trainer.stats import paired_difference, verdict  # noqa: E402
from trainer.metrics import classification_metrics  # noqa: E402
from trainer.step import BatchPipeline, predict  # noqa: E402

RUN = re.compile(r"(?P<method>.+)-f(?P<fraction>[0-9.]+)-s(?P<seed>\d+)$")


def score(run: Path, classes: list[str]) -> float:
    """Balanced accuracy of ``run/best.pt`` on the test images of ``classes``, renormalised over them."""
    model, cfg, state = load_run_model(run / "best.pt", "cpu")
    keep = [state.class_names.index(c) for c in classes]
    with EmbeddingStore.open(cfg.cache) as s:
        rows = s.split_indices("test")
        rows = rows[np.isin(s.labels[rows], keep)]
        with PairedCache(s, rows, next(model.parameters()).device, "host", embeddings=model.needs_embeddings,
                         masks=cfg.focus_masks) as c:
            y, p, _ = predict(model, BatchPipeline(model, cfg, next(model.parameters()).device), c, rows,
                              cfg.batch_size, False)
    p = np.asarray(p)[:, keep]
    y = np.searchsorted(keep, np.asarray(y)) if keep == sorted(keep) else np.array([keep.index(v) for v in y])
    return classification_metrics(y, p / p.sum(1, keepdims=True))["balanced_accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--classes", required=True, help="comma-separated lesion classes")
    ap.add_argument("--out", type=Path, required=True, help="the markdown table to write")
    a = ap.parse_args()
    classes = a.classes.split(",")
    scores: dict[tuple[str, float], dict[int, float]] = {}
    for run in sorted((a.study / "runs").iterdir()):
        m = RUN.match(run.name)
        if m and (run / "best.pt").is_file():
            scores.setdefault((m["method"], float(m["fraction"])), {})[int(m["seed"])] = score(run, classes)
            print(f"{run.name}: {scores[(m['method'], float(m['fraction']))][int(m['seed'])]:.3f}", flush=True)
    lines = [f"Test balanced accuracy on {', '.join(classes)} only (`{a.study}`, each run's best.pt)", "",
             "| method | fraction | seeds | balanced accuracy | − backbone | 95 % interval | verdict |",
             "|---|---|---|---|---|---|---|"]
    for (method, f), by_seed in sorted(scores.items(), key=lambda kv: (kv[0][1], kv[0][0] != "backbone", kv[0][0])):
        v = np.array(list(by_seed.values()))
        cells = f"| {method} | {f:g} | {len(v)} | {v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f} |"
        base = scores.get(("backbone", f), {})
        seeds = sorted(set(base) & set(by_seed))
        if method != "backbone" and seeds:
            d = paired_difference([by_seed[s] for s in seeds], [base[s] for s in seeds])
            interval = "—" if not np.isfinite(d["low"]) else f"[{d['low']:+.3f}, {d['high']:+.3f}]"
            cells += f" {d['mean']:+.3f} | {interval} | {verdict(d)} |"
        else:
            cells += " | | |"
        lines.append(cells)
    text = "\n".join(lines) + "\n"
    atomic_write(a.out, lambda p: p.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
