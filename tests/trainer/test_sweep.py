import csv

import pytest
import yaml
from typer.testing import CliRunner

from cli.slca_train import app
from sam_cache.store import EmbeddingStore
from trainer import ConfigError, TrainConfig
from trainer.sweep import SweepSpace, load_space, run_sweep

runner = CliRunner(env={"COLUMNS": "200"})
BASE = {"epochs": 1, "img_size": 32, "batch_size": 4, "residency": "host"}


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_grid_sweep_of_eight_trials_reads_the_store_once_and_resumes(tiny_store, tmp_path, monkeypatch):
    space = SweepSpace({"method": "grid", "base": BASE,
                        "params": {"lr": [1e-3, 3e-4], "window": [2, 8], "pool": ["avg", "max"]}})
    reads = []
    original = EmbeddingStore.read_rows
    monkeypatch.setattr(EmbeddingStore, "read_rows", lambda self, idx, name="embeddings": reads.append(name)
                        or original(self, idx, name))
    seen = []
    result = run_sweep(tiny_store, space, tmp_path / "sweep", device="cpu", on_trial=seen.append, log=lambda s: None)
    assert len(seen) == 8 and sorted(reads) == ["embeddings", "images"]  # one load, shared by all trials
    rows = _rows(tmp_path / "sweep" / "trials.csv")
    assert len(rows) == 8 and {(r["lr"], r["window"], r["pool"]) for r in rows} == {
        (lr, w, p) for lr in ("0.001", "0.0003") for w in ("2", "8") for p in ("avg", "max")}
    best = TrainConfig.load(result["best_config"])
    assert best.out.endswith("best") and best.epochs == 1
    assert str(best.slca.window) == str(result["best"]["window"])

    # interrupt: forget the last three trials; the rerun runs exactly those
    with open(tmp_path / "sweep" / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:5])
    again, said = [], []
    run_sweep(tiny_store, space, tmp_path / "sweep", device="cpu", on_trial=again.append, log=said.append)
    assert [r["trial"] for r in again] == [5, 6, 7]
    # their folders hold finished runs (cut off before the ledger row): scored again, not retrained
    assert sum("it had finished (1 of 1 epochs); scoring its best.pt" in line for line in said) == 3
    assert len(_rows(tmp_path / "sweep" / "trials.csv")) == 8


def test_best_config_reruns_as_is(tiny_store, tmp_path):
    space = SweepSpace({"base": BASE, "params": {"window": [4, 16]}})
    result = run_sweep(tiny_store, space, tmp_path / "s", device="cpu", log=lambda s: None)
    out = runner.invoke(app, ["--config", result["best_config"], "--device", "cpu"])
    assert out.exit_code == 0, out.output
    rerun = yaml.safe_load((tmp_path / "s" / "best" / "config.yaml").read_text())
    assert rerun["slca"]["window"] == int(result["best"]["window"]) and rerun["epochs"] == 1
    assert yaml.safe_load((tmp_path / "s" / "best.yaml").read_text())["device"] is None  # the rerunning machine chooses


def test_a_tie_on_the_val_metric_goes_to_the_lower_val_loss_then_the_lower_trial():
    from trainer.sweep import pick_best

    rows = [{"trial": 0, "val_auc": 0.9, "val_loss": 0.7}, {"trial": 1, "val_auc": 0.8, "val_loss": 0.1},
            {"trial": 2, "val_auc": "0.9", "val_loss": "0.5"}, {"trial": 3, "val_auc": 0.9, "val_loss": 0.5}]
    best, tied = pick_best(rows, "auc")
    assert best["trial"] == 2 and tied == [0, 3]
    assert pick_best(rows[:2], "auc") == (rows[0], [])
    assert pick_best([{"trial": 4, "val_auc": 0.5}, {"trial": 5, "val_auc": 0.5, "val_loss": 9.0}], "auc")[0]["trial"] == 5


def test_optuna_sweep_with_pruning_resumes(tiny_store, tmp_path):
    pytest.importorskip("optuna")
    spec = {"method": "optuna", "trials": 3, "base": {**BASE, "epochs": 2},
            "params": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "window": [2, 4]}}
    run_sweep(tiny_store, SweepSpace(spec), tmp_path / "o", device="cpu", log=lambda s: None)
    assert len(_rows(tmp_path / "o" / "trials.csv")) == 3
    spec["trials"] = 4
    run_sweep(tiny_store, SweepSpace(spec), tmp_path / "o", device="cpu", log=lambda s: None)
    rows = _rows(tmp_path / "o" / "trials.csv")
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"complete", "pruned"}


def test_cli_sweep_prints_a_table(tiny_store, tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"base": BASE, "params": {"pool": ["avg", "max"]}}))
    out = runner.invoke(app, ["sweep", "--cache", str(tiny_store), "--space", str(tmp_path / "space.yaml"),
                              "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert "grid sweep on" in out.output and "val_balanced_accuracy" in out.output
    assert "rerun it with: slca-train --config" in out.output


def test_bad_space_files_are_named(tmp_path):
    (tmp_path / "s.yaml").write_text("method: random\nparams: {lr: [1]}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: method must be grid or optuna"):
        load_space(tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match=r"cannot sweep \['cache'\]"):
        SweepSpace({"params": {"cache": ["x"]}})
    with pytest.raises(ConfigError, match="unknown training options: nonsense"):
        SweepSpace({"base": {"nonsense": 1}, "params": {"lr": [1]}})
    # values are checked when the space is read, not in the middle of a sweep
    with pytest.raises(ConfigError, match=r"params: pool must be one of avg, max, avgmax; got 'median'"):
        SweepSpace({"params": {"pool": ["avg", "median"]}})
    with pytest.raises(ConfigError, match=r"base: lr must be a number; got 'fast'"):
        SweepSpace({"base": {"lr": "fast"}, "params": {"window": [4]}})


def test_sweepable_names_come_from_the_config():
    from trainer.config import options
    from trainer.sweep import SWEEPABLE

    assert {"lr", "window", "slca", "slca_lr_mult", "fuse", "focus", "min_steps"} <= SWEEPABLE
    assert SWEEPABLE == {o.name for o in options() if o.sweep} and "cache" not in SWEEPABLE


def test_example_space_is_valid():
    from conftest import ROOT

    assert load_space(ROOT / "examples" / "sweep_sample.yaml").grid().__len__() == 8
    assert load_space(ROOT / "examples" / "sweep_optuna.yaml").method == "optuna"
