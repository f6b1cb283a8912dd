"""Hyperparameter sweeps on one cache: a grid, or an Optuna search with pruning.

The store is loaded into memory once (:class:`~trainer.data.PairedCache`) and every trial trains
from it; nothing is re-read per trial. A space file (YAML) names the method, the fixed recipe
and the swept flags::

    method: grid            # grid | optuna
    metric: balanced_accuracy   # validation metric that ranks trials
    trials: 20              # optuna only: how many trials in all
    seed: 0                 # optuna sampler seed
    base:                   # fixed TrainConfig fields
      epochs: 3
      img_size: 64
    params:                 # grid: lists of values; optuna: lists (categorical) or
      lr: [0.001, 0.0003]   #   {low: .., high: .., log: true} ranges
      window: [2, 8]

Outputs in the sweep folder: ``trials.csv`` (one row per finished trial, rewritten as trials
finish), ``trials/NNNN/`` (each trial's run folder), ``best.yaml`` (the best trial's full
recipe, which ``slca-train --config best.yaml`` reruns as is) and, for Optuna, ``optuna.db``.
An interrupted sweep resumes: finished trials are kept and not run again, and a grid trial cut off
part way continues from its last epoch (an Optuna trial, whose pruner saw its epochs, starts over).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from sam_cache.store import EmbeddingStore

from .config import METRIC_KEYS, TrainConfig, options
from .data import PairedCache
from .errors import ConfigError, TrainError
from sam_cache.outputs import atomic_write

from .records import RunLedger
from .train import resolve_device, train, train_or_resume

_LOG = logging.getLogger(__name__)  # the default of ``log``: silent unless logging is configured (timm's habit)
__all__ = ["SweepSpace", "load_space", "run_sweep"]

SWEEPABLE = frozenset(o.name for o in options() if o.sweep)  # marked in trainer/config.py, nowhere else
_SWEEP_OWNED = frozenset({"out", "cache", "overwrite", "resume"})  # set by the sweep itself, never by a space file


class SweepSpace:
    """A parsed, checked space file.

    Raises:
      ConfigError: naming the file and the problem: a bad method or metric, an option that cannot
        be swept, or a base or grid value that the config refuses (checked now, not mid-sweep).
    """

    def __init__(self, spec: dict, source: str = "<dict>"):
        self.method = spec.get("method", "grid")
        if self.method not in ("grid", "optuna"):
            raise ConfigError(f"{source}: method must be grid or optuna, got {self.method!r}")
        self.metric = spec.get("metric", "balanced_accuracy")
        if self.metric not in METRIC_KEYS:
            raise ConfigError(f"{source}: metric must be one of {METRIC_KEYS}, got {self.metric!r}")
        self.base = dict(spec.get("base") or {})
        self.params = dict(spec.get("params") or {})
        self.trials = int(spec.get("trials", 0))
        self.seed = int(spec.get("seed", 0))
        if not self.params:
            raise ConfigError(f"{source}: 'params' names no flag to sweep")
        unknown = set(self.params) - SWEEPABLE
        if unknown:
            raise ConfigError(f"{source}: cannot sweep {sorted(unknown)}; sweepable: {sorted(SWEEPABLE)}")
        owned = sorted((set(self.base) | set(self.params)) & _SWEEP_OWNED)
        if owned:
            raise ConfigError(f"{source}: a space file cannot set {', '.join(owned)}: the sweep command gives the store "
                              "(--cache) and each trial's folder (under --out), and overwrites only its own trials")
        for name, values in self.params.items():
            if self.method == "grid" and not isinstance(values, list):
                raise ConfigError(f"{source}: grid parameter {name!r} needs a list of values")
        if self.method == "optuna" and self.trials < 1:
            raise ConfigError(f"{source}: an optuna sweep needs 'trials' >= 1")
        TrainConfig.from_dict({"cache": "", "out": "", **self.base}, source=f"{source} base")  # refuse bad fields now
        if self.method == "grid":
            for params in self.grid():
                TrainConfig.from_dict({"cache": "", "out": "", **self.base, **params}, source=f"{source} params")
        else:
            for name, spec in self.params.items():
                for value in _range_values(name, spec, source):
                    TrainConfig.from_dict({"cache": "", "out": "", **self.base, name: value}, source=f"{source} params")

    def grid(self) -> list[dict]:
        names = list(self.params)
        return [dict(zip(names, combo)) for combo in itertools.product(*(self.params[n] for n in names))]


def load_space(path: str | Path) -> SweepSpace:
    """Read and check a space file. Raises ConfigError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep space {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"sweep space {path} is not valid YAML (plain values only): {str(exc).splitlines()[0]}") \
            from None
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep space {path}: expected a mapping, got {type(spec).__name__}")
    return SweepSpace(spec, str(path))


def run_sweep(cache: str | Path, space: SweepSpace, out: str | Path, device: str | None = None,
              on_trial: Callable[[dict], None] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run every trial of ``space`` on the store ``cache``; resume a sweep already in ``out``.

    Arguments:
      cache: the store.
      space: from :func:`load_space`.
      out: the sweep folder.
      device: default CUDA when available.
      on_trial: called with each finished trial's row (the CLI draws its table from these).
      log: where the one-off lines go (default: this module's logger, at INFO).

    Returns:
      ``{"best": row, "trials": rows, "best_config": path}``.

    Raises:
      TrainError, StoreError, ConfigError: as a single training run would.
    """
    log = log or _LOG.info
    out = Path(out)
    spec = {"method": space.method, "metric": space.metric, "trials": space.trials, "seed": space.seed,
            "base": space.base, "params": space.params}
    # the store, once, for all trials
    store = EmbeddingStore.open(cache)
    try:
        _claim_sweep_folder(out, spec, store)
        (out / "trials").mkdir(parents=True, exist_ok=True)
        atomic_write(out / "space.yaml", lambda p: p.write_text(yaml.safe_dump(spec, sort_keys=False)))
    except BaseException:
        store.close()
        raise
    dev = resolve_device(device)
    ledger = RunLedger(out / "trials.csv", {"trial": int})
    rows = ledger.rows
    if rows:
        log(f"resuming: {len(rows)} finished trial(s) kept from {out / 'trials.csv'}")

    configs = [TrainConfig.from_dict({"cache": str(cache), "out": "", **space.base, **p}) for p in space.grid()] \
        if space.method == "grid" else [TrainConfig.from_dict({"cache": str(cache), "out": "", **space.base})]
    needs_emb = any(c.reads_embeddings for c in configs) or "fuse" in space.params or "backbone" in space.params \
        or True in space.params.get("slca", [])
    masks = configs[0].mask_set if any(c.focus_masks for c in configs) or "focus" in space.params else None
    try:
        cache_obj = PairedCache(store, np.flatnonzero(store.done), dev, configs[0].residency, embeddings=needs_emb,
                                masks=masks)
    except BaseException:
        store.close()
        raise
    log(f"cache: {cache_obj.describe()}, shared by every trial")

    def run_one(number: int, params: dict, report=None) -> dict:
        cfg = TrainConfig.from_dict({"device": str(dev), **space.base, **params, "cache": str(cache),
                                     "out": str(out / "trials" / f"{number:04d}")})
        t0 = time.perf_counter()
        if report is None:  # a grid trial cut off part way continues; a pruned search's trial starts over
            result = train_or_resume(cfg, note=log, log=lambda s: None, cache=cache_obj)
        else:
            result = train(cfg, overwrite=True, log=lambda s: None, cache=cache_obj, on_epoch=report)
        row = {"trial": number, "status": "complete", **{k: json.dumps(v) if isinstance(v, list) else v
                                                         for k, v in params.items()},
               **{f"val_{k}": result["val_best"][k] for k in METRIC_KEYS}, "val_loss": result["val_best_loss"],
               **{f"test_{k}": result["test"][k] for k in METRIC_KEYS},
               "best_epoch": result["best_epoch"], "seconds": round(time.perf_counter() - t0, 1)}
        return row

    def finish(row: dict) -> None:
        ledger.record(row)
        if on_trial is not None:
            on_trial(row)

    try:
        if space.method == "grid":
            for number, params in enumerate(space.grid()):
                if not ledger.done(number):
                    finish(run_one(number, params))
        else:
            _optuna(space, out, rows, run_one, finish)
    finally:
        cache_obj.close()
        store.close()

    complete = [r for r in rows if r["status"] == "complete"]
    if not complete:
        raise TrainError(f"sweep {out}: no trial completed")
    best, tied = pick_best(complete, space.metric)
    best_cfg = TrainConfig.load(out / "trials" / f"{int(best['trial']):04d}" / "config.yaml")
    best_cfg.out = str(out / "best")
    best_cfg.device = None  # the machine that reruns it chooses (CUDA when there is one)
    best_cfg.save(out / "best.yaml")
    return {"best": best, "tied": tied, "trials": rows, "best_config": str(out / "best.yaml")}


def pick_best(rows: list[dict], metric: str) -> tuple[dict, list[int]]:
    """The best trial: the highest val ``metric``; a tie goes to the lower val loss (of the
    trial's best epoch), then to the lower trial number.

    Returns:
      ``(row, tied)``: ``tied`` lists the other trials with the same val ``metric`` (empty when
      the best is alone).
    """
    def value(r, key, missing):
        v = r.get(key)
        return float(v) if v not in ("", None) else missing

    top = max(value(r, f"val_{metric}", -1.0) for r in rows)
    level = [r for r in rows if value(r, f"val_{metric}", -1.0) == top]
    best = min(level, key=lambda r: (value(r, "val_loss", math.inf), int(r["trial"])))
    return best, sorted(int(r["trial"]) for r in level if r is not best)


def _range_values(name: str, spec, source: str) -> list:
    """The values of an optuna parameter worth checking now: every choice, every integer of a small
    integer range, or a float range's ends.

    Raises:
      ConfigError: a spec that is neither a list nor ``{low, high[, log]}``.
    """
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict) and {"low", "high"} <= set(spec):
        low, high = spec["low"], spec["high"]
        if isinstance(low, int) and isinstance(high, int) and not spec.get("log") and high - low <= 256:
            return list(range(low, high + 1))
        return [low, high]
    raise ConfigError(f"{source}: optuna parameter {name!r} needs a list or {{low, high[, log]}}, got {spec!r}")


def _claim_sweep_folder(out: Path, spec: dict, store: EmbeddingStore) -> None:
    """Record what the sweep in ``out`` is (``sweep.json``: the space and the store's signature), or
    check that a rerun is the same sweep: its finished trials are kept only then (an Optuna sweep
    may raise ``trials`` to search on).

    Raises:
      TrainError: ``out`` holds a sweep of another space or store (naming what differs), or files
        that are not a sweep's.
    """
    ledger = {"space": json.loads(json.dumps(spec)), "store": store.signature}
    path = out / "sweep.json"
    if not path.is_file() and (out / "trials.csv").is_file() and (out / "space.yaml").is_file():
        try:  # a sweep from before sweep.json: its space file is the record (its store was not kept)
            old = {"space": yaml.safe_load((out / "space.yaml").read_text()), "store": ledger["store"]}
        except (OSError, yaml.YAMLError) as exc:
            raise TrainError(f"sweep {out}: space.yaml cannot be read ({exc}); use a new --out") from None
    elif path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise TrainError(f"sweep {out}: {path.name} cannot be read ({exc}); use a new --out") from None
    else:
        old = None
    if old is not None:
        diffs = [f"space {k}" for k in sorted(set(old.get("space", {})) | set(ledger["space"]))
                 if old.get("space", {}).get(k) != ledger["space"].get(k) and k != "trials"]  # more trials: resume
        diffs += [f"store {k}" for k in sorted(set(old.get("store", {})) | set(ledger["store"]))
                  if old.get("store", {}).get(k) != ledger["store"].get(k)]
        if diffs:
            raise TrainError(f"sweep {out} was run with another space or store ({', '.join(diffs)} differ), and its "
                             "trials would be mixed with this one's; use a new --out, or remove the old sweep")
        if path.is_file():
            return
    if out.is_dir() and any(p.name not in _SWEEP_FILES for p in out.iterdir() if not p.name.startswith(".")):
        raise TrainError(f"--out {out} holds files that are not a samcache sweep's; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(json.dumps(ledger, indent=2)))


_SWEEP_FILES = frozenset({"trials", "trials.csv", "space.yaml", "best.yaml", "optuna.db", "sweep.json", "best"})


def _optuna(space: SweepSpace, out: Path, rows: list[dict], run_one, finish) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="slca-sweep", storage=f"sqlite:///{out / 'optuna.db'}", load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=space.seed), pruner=optuna.pruners.MedianPruner(n_warmup_steps=1),
    )
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]

    def suggest(trial, name, spec):
        if isinstance(spec, list):
            return trial.suggest_categorical(name, spec)
        if isinstance(spec, dict) and {"low", "high"} <= set(spec):
            if isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log"):
                return trial.suggest_int(name, spec["low"], spec["high"])
            return trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
        raise ConfigError(f"optuna parameter {name!r} needs a list or {{low, high[, log]}}, got {spec!r}")

    def objective(trial):
        params = {name: suggest(trial, name, spec) for name, spec in space.params.items()}

        def report(row):
            value = row[f"val_{space.metric}"]
            trial.report(-1.0 if value is None else value, row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            row = run_one(trial.number, params, report)
        except optuna.TrialPruned:
            finish({"trial": trial.number, "status": "pruned", **params})
            raise
        finish(row)
        return -1.0 if row[f"val_{space.metric}"] is None else row[f"val_{space.metric}"]

    remaining = space.trials - len(finished)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=())
