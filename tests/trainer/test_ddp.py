"""slca-train under torchrun: 2 CPU processes with gloo against one process on the same data."""

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# LayerNorm only (no BatchNorm), so that 2 ranks x 2 samples is the same step as 1 process x 4
SMALL_SWIN = json.dumps({"window_size": 4, "embed_dim": 24, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]})


def _args(store, out, batch):
    return ["-m", "cli.slca_train", "--cache", str(store), "--out", str(out), "--epochs", "1", "--batch-size",
            str(batch), "--img-size", "64", "--device", "cpu", "--backbone", "swinv2_tiny_window8_256",
            "--backbone-kwargs", SMALL_SWIN, "--lr", "3e-4", "--fuse", "none"]  # fusion standardizes with
    # BatchNorm, per rank like any BatchNorm; the class-balanced loss (a default) is exact under DDP


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_rank_ddp_matches_one_process(tiny_store, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, *_args(tiny_store, tmp_path / "one", 4)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          *_args(tiny_store, tmp_path / "two", 2)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("distributed: 2 ranks, 2 per rank, global batch 4") == 1  # rank 0 alone speaks
    one, two = _csv(tmp_path / "one" / "metrics.csv"), _csv(tmp_path / "two" / "metrics.csv")
    assert one[0]["data_order"] == two[0]["data_order"]  # same samples and crops per global step
    for key in ("train_loss", "val_loss"):
        assert float(two[0][key]) == pytest.approx(float(one[0][key]), rel=1e-3, abs=1e-4)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m2["test"]["n"] == m1["test"]["n"] == 3  # gathered from both ranks
    assert m2["test"]["loss"] == pytest.approx(m1["test"]["loss"], rel=1e-3)
    assert m2["test"]["confusion"] == m1["test"]["confusion"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
