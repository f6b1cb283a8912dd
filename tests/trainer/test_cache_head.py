"""The cache-only head (``--backbone none --head attention``): trains, evaluates, predicts, resumes;
its embedding view moves with the crop."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.slca_train import app
from trainer import TrainConfig, train
from trainer.cache_head import HEAD_GRID, AttentionHead
from trainer.data import AugmentConfig, paired_views, sample_boxes
from trainer.errors import ConfigError

runner = CliRunner(env={"COLUMNS": "200"})


def _cfg(store, out, **kw):
    return TrainConfig.from_dict({"cache": str(store), "out": str(out), "backbone": "none", "epochs": 2,
                                  "batch_size": 4, "img_size": 32, "device": "cpu", **kw})


def test_the_cache_only_head_trains_evaluates_predicts_and_resumes(tiny_store, sample_dir, tmp_path):
    logged = []
    full = train(_cfg(tiny_store, tmp_path / "full"), log=logged.append)
    assert any("no backbone, cache-only head attention" in line for line in logged), logged
    state = torch.load(tmp_path / "full" / "best.pt", weights_only=True)
    assert all(k.startswith("head.") for k in state["model"])  # no image backbone, no SLCA, no fusion
    saved = TrainConfig.load(tmp_path / "full" / "config.yaml")
    assert saved.slca.enabled is False and saved.fuse == "none"
    ev = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "full" / "best.pt"), "--json", "--device", "cpu"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.output)["confusion"] == full["test"]["confusion"]
    new = tmp_path / "new"
    new.mkdir()
    for i, f in enumerate(sorted((sample_dir / "synthetic-smooth").iterdir())[:2]):
        shutil.copy(f, new / f"scan{i}.png")
    pr = runner.invoke(app, ["predict", "--checkpoint", str(tmp_path / "full" / "best.pt"), "--data", str(new),
                             "--out", str(tmp_path / "p.csv"), "--device", "cpu"])
    assert pr.exit_code == 0 and "wrote 2 predictions" in pr.output, pr.output
    with open(tmp_path / "p.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    ex = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "full" / "best.pt"), "--out",
                             str(tmp_path / "x.pth")])
    assert ex.exit_code == 1 and "no timm backbone to export" in ex.output

    def stop_after_first(row):
        if row["epoch"] == 1:  # epochs count from 1
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_store, tmp_path / "cut"), log=lambda s: None, on_epoch=stop_after_first)
    resumed = train(_cfg(tiny_store, tmp_path / "cut"), resume=True, log=lambda s: None)
    assert resumed["test"]["confusion"] == full["test"]["confusion"]
    with pytest.raises(ConfigError, match="--backbone none reads only the cached embedding"):
        _cfg(tiny_store, tmp_path / "x", focus="overlay")


def test_the_heads_embedding_view_follows_the_crop_and_flip():
    """A bright square in the image and in one embedding channel stay on the same cells of the
    head's grid through random crops and flips, and the head's attention can find it."""
    img = torch.zeros(1, 3, 64, 64)
    img[:, :, 8:24, 36:52] = 255
    emb = torch.zeros(1, 256, 64, 64)
    emb[:, 7, 8:24, 36:52] = 1.0
    regions = np.array([[0, 0, 64, 64]])
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(40):
        boxes, flips = sample_boxes(regions, AugmentConfig(hflip=True, crop_scale_min=0.4), rng)
        x, e = paired_views(img, emb, boxes, flips, 32, HEAD_GRID)
        assert e.shape == (1, 256, HEAD_GRID, HEAD_GRID)
        image_cells = torch.nn.functional.adaptive_avg_pool2d((x[:, :1] > 127).float(), HEAD_GRID)[0, 0] > 0.5
        emb_cells = e[0, 7] > 0.5
        if image_cells.sum() < 2:
            continue
        agree = (image_cells == emb_cells).float().mean().item()
        assert agree > 0.95, f"box {boxes[0]}, flip {flips[0]}: {agree:.2f}"
        checked += 1
    assert checked > 15
    head = AttentionHead(3)
    with torch.no_grad():
        head.score[2].weight.zero_()
        head.score[2].bias.zero_()
        w = head.attention(e)
    assert torch.allclose(w.sum((1, 2)), torch.ones(1)) and w.shape == (1, HEAD_GRID, HEAD_GRID)


def test_the_cache_only_head_is_a_study_method_paired_with_the_backbone(tiny_store, tmp_path):
    from trainer.experiment import StudyConfig, run_study
    from trainer.study_merge import merge_studies

    recipe = {"backbone": "resnet10t", "img_size": 32, "epochs": 1, "min_steps": 2, "batch_size": 4}
    cfg = StudyConfig(fractions=(1.0,), seeds=(0, 1), methods=("backbone", "cache_head"), train=recipe)
    run_study(tiny_store, tmp_path / "s", cfg, device="cpu", log=lambda _: None)
    saved = TrainConfig.load(tmp_path / "s" / "runs" / "cache_head-f1.0-s0" / "config.yaml")
    assert saved.backbone == "none"
    with open(tmp_path / "s" / "paired.csv") as f:
        assert ("cache_head", "backbone") in {(r["a"], r["b"]) for r in csv.DictReader(f)}
    merge_studies([tmp_path / "s"], tmp_path / "m")  # its backbone is its own, not another recipe
