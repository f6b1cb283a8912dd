"""The study protocol: methods compared in paired runs over train fractions and seeds.

For one store, every (fraction, seed) trains each method from one shared in-memory cache:

=============  ==========================================================================
method         what is trained
=============  ==========================================================================
backbone       the backbone alone (``--no-slca``)
slca           backbone + SLCA gates
fuse           backbone + fused embedding statistics (``--fuse``)
fuse_slca      both
focus          backbone with the SAM mask as a visual prompt, in the study's ``--focus`` mode
               (``StudyConfig.focus``, default background; needs the store's default masks)
focus_slca     focus + SLCA
cache_head     no image backbone: a head on the cached embedding alone (``--backbone none``)
focus-M-SET    focus (or ``focus_slca-M-SET``) in mode ``M`` with the store's mask set ``SET``,
               e.g. ``focus-overlay-gt``, ``focus-background-learned``: one study compares
               mask sources and modes (each is paired with ``backbone``)
linear_probe   logistic regression on the per-channel mean of the embedding over the image
probe_meanstd  the same on its mean and standard deviation (what ``--fuse meanstd`` sees)
=============  ==========================================================================

Pairing: a seed fixes the training subset (stratified, nested across fractions), the data order
and crops, and the backbone's initialization, for every method alike (tests check all three).
Validation and test splits are the store's, the same for every method and fraction.

Budget: the recipe's ``min_steps`` makes small fractions train as many optimizer steps as the
full set, instead of a handful of one-step epochs; ``runs.csv`` records the steps of each run.

Statistics: ``summary.csv`` gives mean ± std over seeds per method and fraction; ``paired.csv``
gives, per fraction, the per-seed difference of two methods (e.g. SLCA − backbone) with its mean
and a 95 % t-interval, the test for "does SLCA change anything", in balanced accuracy and in AUC
(what breast ultrasound CAD papers compare), each with its verdict and its own plot.

A rerun resumes: rows already in ``runs.csv`` are kept, and a run cut off part way continues from
its last finished epoch (its ``seconds``, the run's wall time to its test scoring, then count both
parts, less what the cut-off part spent after its last saved epoch). Each finished run's folder
keeps ``best.pt`` (the test figures come from it) but not ``last.pt``, which only resuming it would
read: a study of a hundred runs would otherwise hold three copies of every model.
``study.json`` holds the resolved recipe (defaults included) and each invocation; resuming under
another recipe (a default changed since, another ``--set``) is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sam_cache import EmbeddingStore
from sam_cache.regions import pooled_features as region_features

from .config import METRIC_KEYS, TrainConfig
from .data import PairedCache
from .metrics import classification_metrics
from .records import RunLedger, read_rows, write_rows
from .stats import mean_std, paired_difference, verdict
from .subset import stratified_subset
from .train import resolve_device, train_or_resume

_LOG = logging.getLogger(__name__)  # the default of ``log``: silent unless logging is configured (timm's habit)
__all__ = ["StudyConfig", "METHODS", "FOCUS_KINDS", "PAIRS", "method_options", "study_pairs", "run_study",
           "study_recipe", "record_study", "summarize_study", "PAIRED_METRICS", "linear_probe",
           "pooled_features", "mean_std", "paired_difference"]

# method -> training options on top of the recipe (None: a linear probe, with its pooling)
METHODS: dict[str, dict | None] = {
    "backbone": {"slca": False, "fuse": "none"},
    "slca": {"slca": True, "fuse": "none"},
    "fuse": {"slca": False, "fuse": "meanstd"},
    "fuse_slca": {"slca": True, "fuse": "meanstd"},  # slca-train's default recipe until 2026-12-07
    "focus": {"slca": False, "fuse": "none", "focus": "background"},  # the mode is StudyConfig.focus's
    "focus_slca": {"slca": True, "fuse": "none", "focus": "background"},
    "cache_head": {"backbone": "none", "slca": False, "fuse": "none"},  # no image backbone: trainer/cache_head.py
    "linear_probe": None,
    "probe_meanstd": None,
}
# (a, b): the paired differences a - b reported per fraction
PAIRS = (("slca", "backbone"), ("fuse", "backbone"), ("fuse_slca", "fuse"), ("fuse_slca", "slca"),
         ("focus", "backbone"), ("focus_slca", "focus"), ("fuse", "linear_probe"), ("fuse_slca", "linear_probe"),
         ("slca", "linear_probe"), ("fuse_slca", "probe_meanstd"), ("cache_head", "backbone"),
         ("fuse_slca", "cache_head"), ("cache_head", "probe_meanstd"), ("fuse_slca", "backbone"),
         ("cache_head", "linear_probe"))


# the prefix of a named focus method -> the method whose options it takes before its focus and mask set
FOCUS_KINDS = {"focus": "focus", "focus_slca": "focus_slca", "focus_fuse_slca": "fuse_slca"}


def method_options(name: str) -> dict | None:
    """The training options of a study method (None: a linear probe): a name of ``METHODS``, or
    ``KIND-MODE-SET``: focus mode ``MODE`` with the store's mask set ``SET`` on the backbone alone
    (``focus-``), with SLCA (``focus_slca-``) or with SLCA and fusion (``focus_fuse_slca-``).

    Raises:
      ConfigError: an unknown method, focus mode or mask-set name.
    """
    from .errors import ConfigError
    from .focus import MODES, focus_mode

    if name in METHODS:
        return METHODS[name]
    kind, _, rest = name.partition("-")
    mode, _, mask_set = rest.partition("-")
    if kind not in FOCUS_KINDS or mode not in MODES or not focus_mode(mode).needs_mask or not mask_set:
        modes = ", ".join(m for m in MODES if m != "none")
        raise ConfigError(f"unknown study method {name!r}; known: {', '.join(METHODS)}, or KIND-MODE-SET with KIND "
                          f"one of {', '.join(FOCUS_KINDS)} and MODE one of {modes}")
    return {**METHODS[FOCUS_KINDS[kind]], "focus": mode, "mask_set": mask_set}


def study_pairs(methods) -> list[tuple[str, str]]:
    """The paired differences reported for these methods: ``PAIRS``, and each named focus method
    against ``backbone``; ``focus_slca-...`` also against its ``focus-...``, and
    ``focus_fuse_slca-...`` against ``fuse_slca`` (the same recipe without focus)."""
    out = list(PAIRS)
    for m in methods:
        if m not in METHODS:
            out.append((m, "backbone"))
            kind, _, rest = m.partition("-")
            if kind == "focus_slca":
                out.append((m, "focus-" + rest))
            elif kind == "focus_fuse_slca":
                out.append((m, "fuse_slca"))
    return out


def _ordered(methods) -> list[str]:
    """Methods of ``METHODS`` in its order, then named focus methods sorted."""
    return [m for m in METHODS if m in methods] + sorted(m for m in set(methods) if m not in METHODS)


@dataclass
class StudyConfig:
    """The protocol: fractions, seeds (``extra_seeds`` for chosen fractions), methods, recipe."""

    fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    extra_seeds: dict = field(default_factory=dict)  # {fraction: (more seeds,)}
    methods: tuple[str, ...] = ("backbone", "slca", "fuse", "fuse_slca", "linear_probe", "probe_meanstd")
    focus: str = "background"
    train: dict = field(default_factory=lambda: {
        "backbone": "resnet18", "img_size": 64, "epochs": 15, "min_steps": 200, "batch_size": 32, "lr": 1e-3})

    def __post_init__(self) -> None:
        for m in self.methods:
            method_options(m)

    def seeds_for(self, fraction: float) -> tuple[int, ...]:
        more = self.extra_seeds.get(fraction) or self.extra_seeds.get(str(fraction)) or ()
        return tuple(self.seeds) + tuple(s for s in more if s not in self.seeds)

    def options(self, method: str, store: str, fraction: float, seed: int, out: Path) -> TrainConfig:
        extra = dict(method_options(method))
        if method in METHODS and "focus" in extra:
            extra["focus"] = self.focus
        return TrainConfig.from_dict({**self.train, **extra, "cache": store, "seed": seed, "subset_seed": seed,
                                      "train_fraction": None if fraction >= 1 else fraction, "out": str(out)})


def pooled_features(cache: PairedCache, rows: np.ndarray, kind: str = "mean", batch: int = 64) -> np.ndarray:
    """Embedding statistics of ``rows`` over their image regions, from the loaded cache.

    The region and the statistics are :func:`sam_cache.regions.pooled_features`, the ones
    ``--fuse`` uses; nothing is read from the store again.

    Returns:
      ``(len(rows), 256)`` for ``mean``, ``(len(rows), 512)`` for ``meanstd``, float32.
    """
    out = [np.zeros((0, 256 if kind == "mean" else 512), np.float32)]
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        _, emb, _ = cache.batch(chunk, embeddings=True)
        out.append(region_features(emb, cache.store.orig_size[chunk], kind))
    return np.concatenate(out)


def linear_probe(features: np.ndarray, labels: np.ndarray, train_pos: np.ndarray, test_pos: np.ndarray,
                 seed: int = 0) -> dict:
    """Standardized logistic regression (scikit-learn defaults, C = 1) on frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    clf.fit(features[train_pos], labels[train_pos])
    k = int(labels.max()) + 1
    probs = np.zeros((len(test_pos), k))
    probs[:, clf.classes_] = clf.predict_proba(features[test_pos])
    return classification_metrics(labels[test_pos], probs)


# options that a study sets per run (method, subset, seed, paths); the rest is the study's recipe
PER_RUN_OPTIONS = ("cache", "out", "slca", "fuse", "focus", "mask_set", "train_fraction", "seed", "subset_seed",
                   "device")


def study_recipe(cfg: StudyConfig) -> dict:
    """The resolved recipe every run of ``cfg`` shares: ``{flat option name: value}``, defaults
    included, without the options the study sets per run (method, fraction, seed, paths)."""
    flat = cfg.options("backbone", "", 1.0, 0, Path(".")).flat()
    return {k: v for k, v in flat.items() if k not in PER_RUN_OPTIONS}


def record_study(out: Path, store: str | Path, cfg: StudyConfig, digest: str | None = None) -> None:
    """Write or extend ``out/study.json``: the resolved recipe once, and each invocation's store (its
    path and ``digest``, :meth:`EmbeddingStore.content_digest`), fractions, seeds and methods appended (a
    resumed study keeps the record of earlier ones).

    Raises:
      ConfigError: ``out`` holds a study run with another recipe (say, a default changed since):
        its rows would not be comparable. The message names the options that differ.
    """
    from .errors import ConfigError

    path = out / "study.json"
    recipe = json.loads(json.dumps(study_recipe(cfg)))  # JSON's view (tuples as lists)
    prev = json.loads(path.read_text()) if path.exists() else {}
    old = prev.get("recipe")
    # an option added since the study began is not a change of recipe: its default is what ran before
    diff = sorted(k for k in set(old or {}) & set(recipe) if old.get(k) != recipe.get(k))
    if old is not None and diff:
        raise ConfigError(f"{path}: this study was run with another recipe; differing options: "
                          + ", ".join(f"{k} (was {old.get(k)!r}, now {recipe.get(k)!r})" for k in diff)
                          + "; use another --out, or --set the old values")
    invocations = prev.get("invocations") or ([{k: prev[k] for k in prev if k != "recipe"}] if prev else [])
    invocations.append({"store": str(store), "store_digest": digest, "fractions": list(cfg.fractions),
                        "seeds": list(cfg.seeds),
                        "extra_seeds": {str(k): list(v) for k, v in cfg.extra_seeds.items()},
                        "methods": list(cfg.methods), "focus": cfg.focus, "train": cfg.train,
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    path.write_text(json.dumps({"recipe": {**(old or {}), **recipe}, "invocations": invocations}, indent=2))


def run_study(store: str | Path, out: str | Path, cfg: StudyConfig, device: str | None = None,
              log: Callable[[str], None] | None = None) -> list[dict]:
    """Run the protocol on one store; resume a study already in ``out``.

    Returns:
      The summary rows (see :func:`summarize_study`).
    """
    log = log or _LOG.info
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    ledger = RunLedger(out / "runs.csv", {"method": str, "fraction": float, "seed": int})
    masks = "default" if any(m in METHODS and METHODS[m] and "focus" in METHODS[m] for m in cfg.methods) else None
    named = sorted({method_options(m)["mask_set"] for m in cfg.methods if m not in METHODS})

    with EmbeddingStore.open(store) as s, contextlib.ExitStack() as stack:
        record_study(out, store, cfg, s.content_digest())  # before the cache loads: a changed recipe is refused first
        cache = stack.enter_context(PairedCache(s, np.flatnonzero(s.done), dev, "auto", embeddings=True, masks=masks))
        log(f"cache: {cache.describe()}")
        # a named mask set's methods share a cache of images and that set's masks (and embeddings for SLCA)
        by_set = {name: stack.enter_context(PairedCache(
            s, np.flatnonzero(s.done), dev, "auto", masks=name,
            embeddings=any(method_options(m)["slca"] for m in cfg.methods if m not in METHODS
                           and method_options(m)["mask_set"] == name))) for name in named}
        train_rows, test_rows = s.split_indices("train"), s.split_indices("test")
        features = {}
        for fraction in cfg.fractions:
            for seed in cfg.seeds_for(fraction):
                subset = train_rows[stratified_subset(s.labels[train_rows], None if fraction >= 1 else fraction,
                                                      None, seed)]
                for method in cfg.methods:
                    if ledger.done(method, fraction, seed):
                        continue
                    t0 = time.perf_counter()
                    if method_options(method) is None:
                        kind = "meanstd" if method == "probe_meanstd" else "mean"
                        if kind not in features:
                            features[kind] = dict(zip(cache.rows.tolist(), pooled_features(cache, cache.rows, kind)))
                        f = features[kind]
                        both = np.concatenate([subset, test_rows])
                        m = linear_probe(np.stack([f[int(r)] for r in both]), s.labels[both],
                                         np.arange(len(subset)), np.arange(len(subset), len(both)), seed)
                        best_epoch, steps, val = "", "", ""
                        seconds = time.perf_counter() - t0
                    else:
                        tcfg = cfg.options(method, str(store), fraction, seed, out / "runs" / f"{method}-f{fraction}-s{seed}")
                        shared = by_set[tcfg.mask_set] if method not in METHODS else cache
                        result = train_or_resume(tcfg, note=log, log=lambda _: None, cache=shared)
                        (Path(tcfg.out) / "last.pt").unlink(missing_ok=True)  # only a run's resume reads it
                        m, best_epoch, steps = result["test"], result["best_epoch"], result["steps"]
                        val = result["val_best"]["balanced_accuracy"]
                        seconds = result["seconds"]  # the run's own count, an earlier part before a resume included
                    row = {"method": method, "fraction": fraction, "seed": seed, "train_samples": len(subset),
                           **{k: m[k] for k in METRIC_KEYS}, "val_balanced_accuracy": val, "best_epoch": best_epoch, "steps": steps,
                           "seconds": round(seconds, 1)}
                    ledger.record(row)
                    log(f"{method:>13}  fraction {fraction:<5} seed {seed}  n={len(subset):<4} "
                        f"bal.acc {m['balanced_accuracy']:.3f}  AUC {_fmt(m['auc'])}  {row['seconds']:.0f} s")
    return summarize_study(out)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


PAIRED_METRICS = ("balanced_accuracy", "auc")  # the paired differences a study reports, each in its own table


def summarize_study(out: str | Path, metrics: tuple[str, ...] = PAIRED_METRICS) -> list[dict]:
    """Write a study's tables from its ``runs.csv``: ``summary.csv`` (mean ± std per method and
    fraction), ``paired.csv`` (the paired differences with 95 % intervals and verdicts, one row per
    pair, fraction and metric of ``metrics``), ``summary.md`` (both, a differences table per metric)
    and a plot per metric (``fraction_METRIC.png``). Returns the summary rows."""
    out = Path(out)
    rows = read_rows(out / "runs.csv")
    fractions = sorted({float(r["fraction"]) for r in rows})
    methods = _ordered({r["method"] for r in rows})
    summary = []
    for method in methods:
        for f in fractions:
            sel = [r for r in rows if r["method"] == method and float(r["fraction"]) == f]
            if not sel:
                continue
            entry = {"method": method, "fraction": f, "seeds": len(sel),
                     "steps": sel[0].get("steps", "")}
            for k in METRIC_KEYS:
                entry[f"{k}_mean"], entry[f"{k}_std"] = mean_std([r[k] for r in sel])
            entry["val_balanced_accuracy_mean"], entry["val_balanced_accuracy_std"] = mean_std(
                [r.get("val_balanced_accuracy") for r in sel])  # the selected epoch's; none for the probes
            summary.append(entry)
    paired = []
    for metric in metrics:
        for a, b in study_pairs(methods):
            for f in fractions:
                va = {int(r["seed"]): float(r[metric]) for r in rows if r["method"] == a and float(r["fraction"]) == f}
                vb = {int(r["seed"]): float(r[metric]) for r in rows if r["method"] == b and float(r["fraction"]) == f}
                seeds = sorted(set(va) & set(vb))
                if not seeds:
                    continue
                d = paired_difference([va[s] for s in seeds], [vb[s] for s in seeds])
                paired.append({"a": a, "b": b, "fraction": f, "metric": metric, **d, "verdict": verdict(d)})
    write_rows(summary, out / "summary.csv")
    write_rows(paired, out / "paired.csv")
    (out / "summary.md").write_text(_markdown(summary, paired, metrics))
    for metric in metrics:
        _plot(summary, methods, fractions, out / f"fraction_{metric}.png", metric)
    return summary


def _markdown(summary: list[dict], paired: list[dict], metrics: tuple[str, ...]) -> str:
    lines = ["| method | fraction | seeds | steps | accuracy | balanced accuracy | macro-F1 | AUC | val balanced accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        cells = [f"{e[f'{k}_mean']:.3f} ± {e[f'{k}_std']:.3f}" for k in METRIC_KEYS + ("val_balanced_accuracy",)]
        cells = [c if "nan" not in c else "—" for c in cells]
        lines.append(f"| {e['method']} | {e['fraction']:g} | {e['seeds']} | {e['steps']} | " + " | ".join(cells) + " |")
    names = {"balanced_accuracy": "balanced accuracy", "auc": "AUC", "macro_f1": "macro-F1"}
    for metric in metrics:
        lines += ["", f"| difference ({names.get(metric, metric)}) | fraction | pairs | mean | 95 % interval | verdict |",
                  "|---|---|---|---|---|---|"]
        for p in (p for p in paired if p["metric"] == metric):
            interval = "—" if not np.isfinite(p["low"]) else f"[{p['low']:+.3f}, {p['high']:+.3f}]"
            lines.append(f"| {p['a']} − {p['b']} | {p['fraction']:g} | {p['n']} | {p['mean']:+.3f} | {interval} | "
                         f"{p['verdict']} |")
    return "\n".join(lines) + "\n"


def _plot(summary: list[dict], methods: list[str], fractions: list[float], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in methods:
        pts = [e for e in summary if e["method"] == method]
        if pts:
            ax.errorbar([e["fraction"] for e in pts], [e[f"{metric}_mean"] for e in pts],
                        yerr=[e[f"{metric}_std"] for e in pts], marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.set_xlabel("train fraction"), ax.set_ylabel(f"test {metric} (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
