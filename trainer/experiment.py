"""The data-fraction study: does SLCA beat the same backbone without it, and at which fractions?

For one dataset: extract a store once (LiteMedSAM by default), then for every train fraction
and seed train SLCA + backbone and the backbone alone (``--no-slca``) from one shared in-memory
cache, and fit a linear probe (scikit-learn logistic regression on the globally average-pooled
embedding of the image region) on the same training subset. Validation and test splits are the
store's, fixed and stratified, identical for every method and fraction: only the training subset
shrinks (stratified, seeded, nested across fractions).

Outputs in the study folder: ``runs.csv`` (one row per method, fraction and seed; a rerun skips
rows already there), ``summary.csv`` and ``summary.md`` (mean ± std over seeds, and a verdict:
a difference between SLCA and the backbone alone smaller than the larger of their two seed
spreads is reported as no difference), and ``fraction_<metric>.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sam_cache import EmbeddingStore, extract_dataset

from .config import TrainConfig
from .data import PairedCache
from .evaluate import resolve_device
from .metrics import classification_metrics
from .records import read_rows, write_rows
from .subset import stratified_subset
from .train import METRIC_KEYS, train

__all__ = ["StudyConfig", "run_fraction_study", "summarize_study", "linear_probe", "mean_std", "against_spread"]

METHODS = ("slca", "backbone", "linear_probe")


@dataclass
class StudyConfig:
    """The protocol. CPU-sized defaults; raise ``img_size``, ``epochs`` and the backbone on a GPU."""

    fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    encoder: str = "litemedsam"
    store_image_size: int = 128
    train: dict = field(default_factory=lambda: {
        "backbone": "resnet18", "img_size": 64, "epochs": 8, "patience": 3, "batch_size": 32, "lr": 1e-3})


def _pooled(store: EmbeddingStore, rows: np.ndarray) -> np.ndarray:
    """Mean of each embedding over its valid (image) cells: ``(n, 256)`` float32."""
    out = np.empty((len(rows), 256), dtype=np.float32)
    for k, r in enumerate(rows):
        vr, vc = store.valid[r]
        out[k] = store.read_embeddings(int(r), int(r) + 1)[0, :, :vr, :vc].astype(np.float32).mean((1, 2))
    return out


def linear_probe(features: np.ndarray, labels: np.ndarray, train_pos: np.ndarray, test_pos: np.ndarray,
                 seed: int = 0) -> dict:
    """Standardized logistic regression on frozen features; test metrics as the trainer reports them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    clf.fit(features[train_pos], labels[train_pos])
    k = int(labels.max()) + 1
    probs = np.zeros((len(test_pos), k))
    probs[:, clf.classes_] = clf.predict_proba(features[test_pos])
    return classification_metrics(labels[test_pos], probs)


def run_fraction_study(dataset: str | Path | None, out: str | Path, cfg: StudyConfig, store: str | Path | None = None,
                       device: str | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run the protocol on one dataset; resume a study already in ``out``.

    Arguments:
      dataset: the dataset path (extracted into ``out/store.zarr``); or None with ``store``.
      out: the study folder.
      cfg: fractions, seeds, encoder and the fixed training recipe.
      store: use this existing store instead of extracting.
      device: default CUDA when available.
      log: where progress lines go.

    Returns:
      The summary rows (see :func:`summarize_study`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if store is None:
        store = out / "store.zarr"
        log(f"extracting {dataset} with {cfg.encoder} into {store} (resumes if present)")
        extract_dataset(dataset, store, cfg.encoder, image_size=cfg.store_image_size, batch_size=8, progress=False)
    (out / "study.json").write_text(json.dumps({"dataset": str(dataset), "store": str(store),
                                                "fractions": list(cfg.fractions), "seeds": list(cfg.seeds),
                                                "encoder": cfg.encoder, "train": cfg.train}, indent=2))
    dev = resolve_device(device)
    rows = read_rows(out / "runs.csv")
    done = {(r["method"], float(r["fraction"]), int(r["seed"])) for r in rows}

    with EmbeddingStore.open(store) as s:
        cache = PairedCache(s, np.flatnonzero(s.done), dev, "auto", embeddings=True)
        log(f"cache: {cache.describe()}")
        train_rows, test_rows = s.split_indices("train"), s.split_indices("test")
        features = _pooled(s, np.arange(len(s)))
        for fraction in cfg.fractions:
            for seed in cfg.seeds:
                subset = train_rows[stratified_subset(s.labels[train_rows], None if fraction >= 1 else fraction,
                                                      None, seed)]
                for method in METHODS:
                    if (method, float(fraction), seed) in done:
                        continue
                    t0 = time.perf_counter()
                    if method == "linear_probe":
                        m = linear_probe(features, s.labels, subset, test_rows, seed)
                        best_epoch = ""
                    else:
                        tcfg = TrainConfig.from_dict({
                            **cfg.train, "cache": str(store), "slca": method == "slca", "seed": seed,
                            "subset_seed": seed, "train_fraction": None if fraction >= 1 else fraction,
                            "device": str(dev), "out": str(out / "runs" / f"{method}-f{fraction}-s{seed}")})
                        result = train(tcfg, overwrite=True, log=lambda _: None, cache=cache)
                        m, best_epoch = result["test"], result["best_epoch"]
                    row = {"method": method, "fraction": fraction, "seed": seed, "train_samples": len(subset),
                           **{k: m[k] for k in METRIC_KEYS}, "best_epoch": best_epoch,
                           "seconds": round(time.perf_counter() - t0, 1)}
                    rows.append(row)
                    write_rows(rows, out / "runs.csv")
                    log(f"{method:>12}  fraction {fraction:<5} seed {seed}  n={len(subset):<4} "
                        f"bal.acc {m['balanced_accuracy']:.3f}  AUC {m['auc'] if m['auc'] is None else round(m['auc'], 3)}"
                        f"  {row['seconds']:.0f} s")
    return summarize_study(out)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; 0 for one value) of the values that are set; NaNs when none are."""
    v = np.array([x for x in values if x is not None and x != ""], dtype=float)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize_study(out: str | Path, plot_metric: str = "balanced_accuracy") -> list[dict]:
    """Aggregate ``runs.csv`` into ``summary.csv``, ``summary.md`` and a plot; return the summary rows."""
    out = Path(out)
    rows = read_rows(out / "runs.csv")
    fractions = sorted({float(r["fraction"]) for r in rows})
    summary = []
    for method in METHODS:
        for f in fractions:
            sel = [r for r in rows if r["method"] == method and float(r["fraction"]) == f]
            if not sel:
                continue
            entry = {"method": method, "fraction": f, "seeds": len(sel)}
            for k in METRIC_KEYS:
                entry[f"{k}_mean"], entry[f"{k}_std"] = mean_std([r[k] for r in sel])
            summary.append(entry)
    write_rows(summary, out / "summary.csv")
    (out / "summary.md").write_text(_markdown(summary, fractions))
    _plot(summary, fractions, out / f"fraction_{plot_metric}.png", plot_metric)
    return summary


def against_spread(mean_a: float, std_a: float, mean_b: float, std_b: float) -> tuple[float, float, bool]:
    """The project's reporting rule: ``(a - b, the larger seed std, whether |a - b| <= it)``.

    A difference no larger than the seed spread is reported as no difference.
    """
    diff, spread = mean_a - mean_b, max(std_a, std_b)
    return diff, spread, bool(abs(diff) <= spread)


def verdict(summary: list[dict], fraction: float, metric: str) -> str:
    """SLCA against the backbone alone at one fraction, judged against the seed spread."""
    get = {(e["method"], e["fraction"]): e for e in summary}
    a, b = get.get(("slca", fraction)), get.get(("backbone", fraction))
    if a is None or b is None:
        return "n/a"
    diff, spread, same = against_spread(a[f"{metric}_mean"], a[f"{metric}_std"], b[f"{metric}_mean"], b[f"{metric}_std"])
    if not np.isfinite(diff):
        return "n/a"
    if same:
        return f"no difference ({diff:+.3f}, spread {spread:.3f})"
    return f"SLCA {'better' if diff > 0 else 'worse'} by {abs(diff):.3f} (spread {spread:.3f})"


def _markdown(summary: list[dict], fractions: list[float]) -> str:
    lines = ["| method | fraction | seeds | accuracy | balanced accuracy | macro-F1 | AUC |", "|---|---|---|---|---|---|---|"]
    for e in summary:
        cells = [f"{e[f'{k}_mean']:.3f} ± {e[f'{k}_std']:.3f}" for k in METRIC_KEYS]
        lines.append(f"| {e['method']} | {e['fraction']:g} | {e['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", "| fraction | SLCA vs backbone alone, balanced accuracy | SLCA vs backbone alone, AUC |", "|---|---|---|"]
    for f in fractions:
        lines.append(f"| {f:g} | {verdict(summary, f, 'balanced_accuracy')} | {verdict(summary, f, 'auc')} |")
    return "\n".join(lines) + "\n"


def _plot(summary: list[dict], fractions: list[float], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        pts = [e for e in summary if e["method"] == method]
        if pts:
            ax.errorbar([e["fraction"] for e in pts], [e[f"{metric}_mean"] for e in pts],
                        yerr=[e[f"{metric}_std"] for e in pts], marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.set_xlabel("train fraction"), ax.set_ylabel(f"test {metric} (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
