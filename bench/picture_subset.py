"""Scores of a finished study on the test images that hold a picture, beside its scores on all of them.

    python bench/picture_subset.py runs/isic.zarr --runs runs/study-isic runs/study-isic-focus \\
        --fraction 1.0 --methods backbone,slca,fuse_slca --exclude bench/results/isic-550-stripes.txt \\
        --out bench/results/isic-picture-subset-f1.0.md

ISIC-550's files ISIC_0000000 to ISIC_0000149 are vertical stripes, not dermoscopy: 102 exactly
(every column one colour; ``samcache extract`` names such files,
:func:`sam_cache.preprocess.image_problem`), 48 with JPEG noise on the stripes, found by looking
(``--exclude`` lists them all). A study trained and tested with them; this asks whether its
conclusions hold on the test images that are real pictures. Nothing
is retrained: each run's ``best.pt`` predicts the test split again, by the trainer's own batch
pipeline, and is scored on all test rows and on the rows without a problem (found from the
dataset's files, so stores made before the check work too). The linear probes are fitted again
on the run's train subset (the study's stratified subset of the same seed) and scored the same way.
Prints, and writes with ``--out``, one markdown table plus the paired differences against the
backbone alone and the linear probe.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)

from sam_cache import EmbeddingStore  # noqa: E402
from sam_cache.preprocess import image_problem, read_image, to_rgb_uint8  # noqa: E402
from trainer import load_run_model  # noqa: E402
from trainer.data import PairedCache  # noqa: E402
from trainer.experiment import linear_probe, pooled_features  # noqa: E402
from trainer.stats import mean_std, paired_difference, verdict  # noqa: E402
from trainer.metrics import classification_metrics  # noqa: E402
from trainer.step import BatchPipeline, predict  # noqa: E402
from trainer.subset import stratified_subset  # noqa: E402


def picture_rows(store: EmbeddingStore, exclude: set[str] = frozenset()) -> np.ndarray:
    """A boolean per store row: True where the dataset's file holds a picture and its id is not in ``exclude``."""
    root = Path(store.meta["dataset"]["root"])
    base = root.parent if root.is_file() else root
    ok = np.array([sample_id not in exclude for sample_id in store.ids], bool)
    for k, sample_id in enumerate(store.ids):
        if not ok[k]:
            continue
        array, window = read_image(base / sample_id)
        ok[k] = image_problem(to_rgb_uint8(array, "auto", window)[0]) == ""
    return ok


@torch.no_grad()
def run_scores(run: Path, store: EmbeddingStore, rows: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """Balanced accuracy of a run's ``best.pt`` on ``rows`` and on ``rows[keep]``."""
    model, cfg, _ = load_run_model(run / "best.pt", "cpu")
    with PairedCache(store, rows, torch.device("cpu"), "host", embeddings=model.needs_embeddings,
                     masks=cfg.focus_masks) as cache:
        y, p, _ = predict(model, BatchPipeline(model, cfg, torch.device("cpu")), cache, rows, 64)
    return (classification_metrics(y, p)["balanced_accuracy"],
            classification_metrics(y[keep], p[keep])["balanced_accuracy"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("--runs", nargs="+", required=True, help="study folders whose runs/ hold the run folders")
    ap.add_argument("--fraction", type=float, default=1.0)
    ap.add_argument("--methods", default="backbone,slca,fuse_slca")
    ap.add_argument("--exclude", help="a text file of sample ids (one a line, # comments) to count as no picture")
    ap.add_argument("--out")
    a = ap.parse_args()
    exclude = set()
    if a.exclude:
        exclude = {ln.strip() for ln in Path(a.exclude).read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    methods = a.methods.split(",")
    scores: dict[str, dict[int, tuple[float, float]]] = {m: {} for m in methods + ["linear_probe", "probe_meanstd"]}
    with EmbeddingStore.open(a.store) as s:
        good = picture_rows(s, exclude)
        test, train = s.split_indices("test"), s.split_indices("train")
        keep = good[test]
        for study in a.runs:
            for run in sorted((Path(study) / "runs").glob(f"*-f{a.fraction}-s*")):
                method, seed = run.name.rsplit("-f", 1)[0], int(run.name.rsplit("-s", 1)[1])
                if method in methods and (run / "best.pt").is_file():
                    scores[method][seed] = run_scores(run, s, test, keep)
        seeds = sorted({seed for m in methods for seed in scores[m]})
        with PairedCache(s, np.concatenate([train, test]), torch.device("cpu"), "host", embeddings=True) as cache:
            for kind, name in (("mean", "linear_probe"), ("meanstd", "probe_meanstd")):
                f = dict(zip(cache.rows.tolist(), pooled_features(cache, cache.rows, kind)))
                for seed in seeds:
                    sub = train[stratified_subset(s.labels[train], None if a.fraction >= 1 else a.fraction, None, seed)]
                    both = np.concatenate([sub, test])
                    x, y = np.stack([f[int(r)] for r in both]), s.labels[both]
                    fit, at = np.arange(len(sub)), np.arange(len(sub), len(both))
                    scores[name][seed] = (linear_probe(x, y, fit, at, seed)["balanced_accuracy"],
                                          linear_probe(x, y, fit, at[keep], seed)["balanced_accuracy"])
    lines = [f"Store {a.store}, fraction {a.fraction}: test {len(test)} images, {int(keep.sum())} with a picture "
             f"({int((~keep).sum())} without). Balanced accuracy, mean ± std over seeds.", "",
             "| method | seeds | all test images | test images with a picture |", "|---|---|---|---|"]
    for m, per_seed in scores.items():
        if per_seed:
            full, clean = mean_std([v[0] for v in per_seed.values()]), mean_std([v[1] for v in per_seed.values()])
            lines.append(f"| {m} | {len(per_seed)} | {full[0]:.3f} ± {full[1]:.3f} | {clean[0]:.3f} ± {clean[1]:.3f} |")
    lines += ["", "| difference | pairs | all: mean [95 % interval] | with a picture: mean [95 % interval] | verdict (with a picture) |",
              "|---|---|---|---|---|"]
    for m in methods:
        for ref in ("backbone", "linear_probe"):
            common = sorted(set(scores[m]) & set(scores[ref]))
            if m == ref or len(common) < 2:
                continue
            d = [paired_difference([scores[m][k][i] for k in common], [scores[ref][k][i] for k in common]) for i in (0, 1)]
            lines.append(f"| {m} − {ref} | {len(common)} | {d[0]['mean']:+.3f} [{d[0]['low']:+.3f}, {d[0]['high']:+.3f}] "
                         f"| {d[1]['mean']:+.3f} [{d[1]['low']:+.3f}, {d[1]['high']:+.3f}] | {verdict(d[1])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
