"""`slca-train study`: the paired study as a command, its parsers, and bench/accuracy.py as a thin wrapper."""

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from cli.slca_train import app
from conftest import ROOT
from trainer.errors import ConfigError
from trainer.recipe_args import parse_extra_seeds, parse_seeds, parse_sets

runner = CliRunner(env={"COLUMNS": "200"})


def test_the_shared_parsers():
    assert parse_seeds("0-2,5,1") == (0, 1, 2, 5)
    assert parse_extra_seeds("0.1:5-6;1.0:7") == {0.1: (5, 6), 1.0: (7,)}
    assert parse_sets(["lr=1e-3", "img-size=96", "focus=crop"]) == {"lr": "1e-3", "img_size": 96, "focus": "crop"}
    for bad, call in (("3-1", parse_seeds), ("x", parse_seeds), ("", parse_seeds), ("0.1", parse_extra_seeds),
                      (["lr"], parse_sets)):
        with pytest.raises(ConfigError):
            call(bad)


def test_study_runs_from_the_command_and_resumes(tiny_store, tmp_path):
    args = ["study", "--cache", str(tiny_store), "--out", str(tmp_path / "s"), "--fractions", "1", "--seeds", "0",
            "--methods", "backbone,slca", "--device", "cpu", "--set", "backbone=resnet10t", "--set", "img_size=32",
            "--set", "epochs=1", "--set", "min_steps=2", "--set", "batch_size=4", "--set", "lr=1e-3"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "seed 0" in r.output and "| slca − backbone | 1 | 1 |" in r.output  # trained, then the summary table
    record = json.loads((tmp_path / "s" / "study.json").read_text())
    assert record["recipe"]["lr"] == 1e-3 and record["recipe"]["backbone"] == "resnet10t"
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "seed 0" not in again.output  # nothing trained twice
    bad = runner.invoke(app, ["study", "--cache", str(tiny_store), "--out", str(tmp_path / "b"), "--seeds", "4-1"])
    assert bad.exit_code != 0 and "runs backwards" in bad.output


def test_bench_accuracy_is_a_wrapper_of_the_command():
    spec = importlib.util.spec_from_file_location("accuracy", ROOT / "bench" / "accuracy.py")
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    assert accuracy.translate(["--store", "a.zarr", "--out", "o", "--set", "focus=crop", "img_size=96"]) == [
        "study", "--cache", "a.zarr", "--out", "o", "--set", "focus=crop", "--set", "img_size=96"]
    assert accuracy.translate(["--merge", "a", "b", "--out", "c"]) == ["study", "--merge", "a", "--merge", "b",
                                                                         "--out", "c"]
