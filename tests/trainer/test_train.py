import csv
import importlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.slca_train import app
from sam_cache import EmbeddingStore, extract_dataset
from trainer import TrainConfig, TrainError, build_model, train
from trainer.train import train_or_resume

RUN_FILES = {"config.yaml", "metrics.csv", "metrics.json", "last.pt", "best.pt", "curves.png", "confusion.png",
             "attention.png"}
runner = CliRunner(env={"COLUMNS": "200"})


def _cfg(store, out, **kw):
    base = dict(cache=str(store), out=str(out), backbone="resnet18", epochs=2, batch_size=4, img_size=32, device="cpu")
    base.update(kw)
    return TrainConfig.from_dict(base)


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def slca_run(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "slca"
    result = runner.invoke(app, ["--cache", str(tiny_store), "--out", str(out), "--epochs", "2", "--batch-size", "4",
                                 "--img-size", "32", "--device", "cpu", "--backbone", "resnet18", "--fuse", "meanstd"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_two_epoch_run_writes_every_file(slca_run):
    out, output = slca_run
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    rows = _csv(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]  # as the console counts them
    assert {"train_loss", "val_loss", "val_balanced_accuracy", "val_auc", "img_per_s", "data_order"} <= set(rows[0])
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["n"] == 3 and set(m["test"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "auc", "confusion"}
    assert np.array(m["test"]["confusion"]).sum() == 3 and m["cache_mode"] == "host" and m["slca"] is True
    assert TrainConfig.load(out / "config.yaml").slca.enabled is True
    assert "backbone_weights" in (out / "config.yaml").read_text()
    assert "random init" in output and "SLCA on stages ['layer1', 'layer2', 'layer3', 'layer4']" in output
    # issue 25: the line counts the backbone, SLCA and the fusion head apart, and their total
    import re

    line = next(ln for ln in output.splitlines() if ln.startswith("model:"))
    counts = [float(x) * (1e6 if unit == "M" else 1e3) for x, unit in re.findall(r"([0-9.]+) ([Mk])\b", line)]
    assert len(counts) == 4 and counts[0] > counts[1] > counts[2] > 0, line
    assert abs(sum(counts[:3]) - counts[3]) <= 0.011e6, line


def test_eval_reproduces_the_test_metrics(slca_run, tiny_store):
    out, _ = slca_run
    result = runner.invoke(app, ["eval", "--checkpoint", str(out / "best.pt"), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.output)
    saved = json.loads((out / "metrics.json").read_text())["test"]
    assert again["confusion"] == saved["confusion"] and again["loss"] == pytest.approx(saved["loss"], rel=1e-5)
    table = runner.invoke(app, ["eval", "--checkpoint", str(out / "best.pt"), "--split", "val", "--device", "cpu"])
    assert table.exit_code == 0 and "val (3 samples): accuracy" in table.output


def test_no_slca_trains_the_same_backbone_on_the_same_data_order(slca_run, tiny_store, tmp_path):
    out, _ = slca_run
    result = runner.invoke(app, ["--cache", str(tiny_store), "--out", str(tmp_path / "plain"), "--epochs", "2",
                                 "--batch-size", "4", "--img-size", "32", "--device", "cpu", "--no-slca",
                                 "--backbone", "resnet18"])
    assert result.exit_code == 0, result.output
    assert "no SLCA" in result.output
    plain, slca = _csv(tmp_path / "plain" / "metrics.csv"), _csv(out / "metrics.csv")
    assert [r["data_order"] for r in plain] == [r["data_order"] for r in slca]
    # a different seed changes the order: the digest is not a constant
    other = train(_cfg(tiny_store, tmp_path / "seed1", seed=1, epochs=1), log=lambda s: None)
    assert other["test"]["n"] == 3
    assert _csv(tmp_path / "seed1" / "metrics.csv")[0]["data_order"] != slca[0]["data_order"]


@pytest.mark.parametrize("extra", [{"slca": True}, {"fuse": "meanstd"}, {"slca": True, "fuse": "mean"},
                                   {"slca": True, "slca_lr_mult": 10.0, "gate": "residual"}])
def test_paired_methods_start_from_the_same_backbone(tiny_store, tmp_path, extra):
    """Building SLCA gates or a fusion head does not shift the backbone's random initialization,
    nor the generator state that the run continues with."""
    plain, _ = build_model(_cfg(tiny_store, tmp_path, slca=False, fuse="none"), 3)
    after_plain = torch.rand(3)
    other, _ = build_model(_cfg(tiny_store, tmp_path, **extra), 3)
    after_other = torch.rand(3)
    a, b = plain.backbone.state_dict(), other.backbone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(after_plain, after_other)
    seed1, _ = build_model(_cfg(tiny_store, tmp_path, slca=False, fuse="none", seed=1), 3)
    assert not torch.equal(seed1.backbone.conv1.weight, plain.backbone.conv1.weight)


def test_step_budget_is_honoured(tiny_store, tmp_path):
    """9 train samples at batch 4 are 2 steps a pass; --min-steps 10 over 2 epochs makes 5 a epoch."""
    train(_cfg(tiny_store, tmp_path / "short"), log=lambda s: None)
    assert [int(r["step"]) for r in _csv(tmp_path / "short" / "metrics.csv")] == [2, 4]
    lines = []
    result = train(_cfg(tiny_store, tmp_path / "long", min_steps=10), log=lines.append)
    rows = _csv(tmp_path / "long" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [5, 10] and result["steps"] == 10
    assert any("5 per epoch (2.5 passes over the 9 train samples), 10 in all" in line for line in lines)
    # the budget does not change what the first steps see
    assert rows[0]["data_order"] != _csv(tmp_path / "short" / "metrics.csv")[0]["data_order"]


def test_threads_fix_the_cpu_thread_count_of_a_run_and_restore_it(tiny_store, tmp_path):
    before = torch.get_num_threads()
    seen = []
    train(_cfg(tiny_store, tmp_path / "t", epochs=1, threads=1), log=lambda s: None,
          on_epoch=lambda row: seen.append(torch.get_num_threads()))
    assert seen == [1] and torch.get_num_threads() == before
    from sam_cache.threads import cpu_threads

    with pytest.raises(ValueError, match="threads must be 0"):
        with cpu_threads(-1):
            pass


def test_figures_show_every_class_and_the_normalized_confusion(tmp_path):
    from trainer.plots import plot_confusion
    from trainer.run_report import per_class_rows

    rows, labels = np.arange(10, 19), np.array([0, 0, 0, 0, 0, 1, 1, 2, 2])
    assert per_class_rows(rows, labels, 4).tolist() == [10, 15, 17, 11]  # each class before a second of any
    assert sorted(per_class_rows(rows, labels, 20).tolist()) == rows.tolist()  # all, once each
    normalized = plot_confusion([[3, 1], [0, 0]], ["a", "b"], tmp_path / "c.png", "t")
    assert normalized.tolist() == [[0.75, 0.25], [0.0, 0.0]] and (tmp_path / "c.png").stat().st_size > 0


def test_the_python_api_logs_instead_of_printing(tiny_store, tmp_path, capsys, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="trainer.train"):
        train(_cfg(tiny_store, tmp_path / "quiet", epochs=1))
    assert capsys.readouterr().out == ""  # a library user's stdout stays clean
    assert any(m.startswith("epoch   1/1") for m in caplog.messages)


def test_warmup_cosine_is_timms_cosine_schedule_after_the_warmup():
    """Kept beside timm's CosineLRScheduler (README's table): the same cosine after the warmup;
    our warmup is one step ahead of timm's (the first step has lr/warmup, not 0)."""
    import timm.scheduler

    from trainer.schedule import warmup_cosine

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    warmup, total = 5, 50
    theirs = timm.scheduler.CosineLRScheduler(opt, t_initial=total - warmup, warmup_t=warmup, warmup_prefix=True,
                                              warmup_lr_init=0.0, lr_min=0.0, t_in_epochs=False)
    ours = warmup_cosine(warmup, total)
    for t in range(total):
        theirs.step_update(t)
        if t >= warmup:
            assert abs(opt.param_groups[0]["lr"] - 1e-3 * ours(t)) < 1e-12
        else:
            assert abs(1e-3 * ours(t) - 1e-3 * (t + 1) / warmup) < 1e-12 and opt.param_groups[0]["lr"] < 1e-3 * ours(t)


def test_fusion_model_trains_evaluates_and_reloads(tiny_store, tmp_path):
    out = tmp_path / "fuse"
    result = train(_cfg(tiny_store, out, slca=False, fuse="meanstd", lr=0.01), log=lambda s: None)
    assert result["fuse"] == "meanstd" and result["test"]["n"] == 3
    state = torch.load(out / "best.pt", weights_only=True)
    assert any(k.startswith("fuse.head.") for k in state["model"])
    assert state["model"]["fuse.head.weight"].abs().sum() > 0  # it trained
    again = runner.invoke(app, ["eval", "--checkpoint", str(out / "best.pt"), "--json", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["confusion"] == result["test"]["confusion"]


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_store, tmp_path):
    full = train(_cfg(tiny_store, tmp_path / "full"), log=lambda s: None)

    def stop_after_first(row):
        if row["epoch"] == 1:  # epochs count from 1
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_store, tmp_path / "cut"), log=lambda s: None, on_epoch=stop_after_first)
    with pytest.raises(TrainError, match="--resume"):
        train(_cfg(tiny_store, tmp_path / "cut"), log=lambda s: None)
    resumed = train(_cfg(tiny_store, tmp_path / "cut"), resume=True, log=lambda s: None)
    a, b = _csv(tmp_path / "full" / "metrics.csv"), _csv(tmp_path / "cut" / "metrics.csv")
    assert [float(r["train_loss"]) for r in a] == pytest.approx([float(r["train_loss"]) for r in b], rel=1e-5)
    assert resumed["test"]["confusion"] == full["test"]["confusion"]


def test_a_driver_continues_a_cut_off_run_and_restarts_one_it_cannot_continue(tiny_store, tmp_path, monkeypatch):
    def stop_after_first(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_store, tmp_path / "cut"), log=lambda s: None, on_epoch=stop_after_first)
    first = _csv(tmp_path / "cut" / "metrics.csv")
    # the cut-off part's wall time travels in last.pt; say it took 1000 s
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert 0 < state["elapsed"] < 1000
    torch.save({**state, "elapsed": 1000.0}, tmp_path / "cut" / "last.pt")
    notes, epochs, read = [], [], []
    module = importlib.import_module("trainer.train")  # the package's name ``train`` is the function
    real_load = module.load_checkpoint
    monkeypatch.setattr(module, "load_checkpoint", lambda path, **kw: (read.append(Path(path).name),
                                                                              real_load(path, **kw))[1])
    t0 = time.perf_counter()
    result = train_or_resume(_cfg(tiny_store, tmp_path / "cut"), note=notes.append, log=lambda s: None,
                             on_epoch=lambda row: epochs.append(row["epoch"]))
    assert epochs == [2] and notes == [f"{tmp_path / 'cut'}: resuming after epoch 1 of 2"]
    assert read == ["last.pt", "best.pt"]  # last.pt is read once, to check it and to resume from it
    rows = _csv(tmp_path / "cut" / "metrics.csv")
    assert rows[0] == first[0] and len(rows) == 2 and result["epochs_run"] == 2
    assert 1000 < result["seconds"] <= 1000 + time.perf_counter() - t0 + 0.1  # both parts, rounded to 0.1 s
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["seconds"] == result["seconds"]

    # another recipe in the same folder cannot continue that run: it starts again, and says why
    notes, epochs = [], []
    train_or_resume(_cfg(tiny_store, tmp_path / "cut", lr=0.01), note=notes.append, log=lambda s: None,
                    on_epoch=lambda row: epochs.append(row["epoch"]))
    assert epochs == [1, 2] and len(notes) == 1 and "starting again" in notes[0] and "in lr" in notes[0]
    assert float(_csv(tmp_path / "cut" / "metrics.csv")[0]["lr"]) != float(first[0]["lr"])


def test_a_run_that_stopped_early_and_was_cut_off_before_scoring_trains_no_more(tiny_store, tmp_path):
    def stop_after_second(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_store, tmp_path / "r", epochs=5, patience=1), log=lambda s: None, on_epoch=stop_after_second)
    # its last.pt says epoch 2 did not beat epoch 1: the run had met --patience 1 and stopped there
    state = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    torch.save({**state, "best": {"epoch": 0, "score": [2.0, 0.0]}}, tmp_path / "r" / "last.pt")
    notes, epochs, lines = [], [], []
    result = train_or_resume(_cfg(tiny_store, tmp_path / "r", epochs=5, patience=1), note=notes.append,
                             log=lines.append, on_epoch=lambda row: epochs.append(row["epoch"]))
    assert epochs == [] and result["epochs_run"] == 2 and len(_csv(tmp_path / "r" / "metrics.csv")) == 2
    assert notes == [f"{tmp_path / 'r'}: it had stopped early (after epoch 2 of 5); scoring its best.pt"]
    assert any(ln.startswith("early stop: it had stopped after epoch 2") for ln in lines)


def test_nan_loss_is_a_clear_error(tiny_store, tmp_path):
    bad = tmp_path / "nan.zarr"
    shutil.copytree(tiny_store, bad)
    with EmbeddingStore.open(bad, "r+") as s:  # NaNs written through the store: checksums agree with them
        rows = s.read_embeddings(0, len(s))
        rows[:] = np.nan
        s.write_rows(0, rows, s.orig_size, s.valid, s.window, s.read_images(0, len(s)))
    with pytest.raises(TrainError, match=r"loss is not finite in epoch 1, by step 2: lower --lr, or check the store"):
        train(_cfg(bad, tmp_path / "r"), log=lambda s: None)


def test_a_corrupted_shard_stops_training_by_name(tiny_store, tmp_path):
    from sam_cache import StoreError

    bad = tmp_path / "flipped.zarr"
    shutil.copytree(tiny_store, bad)
    shard = bad / "embeddings" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"embeddings of 1 sample\(s\) do not match their checksums .*embeddings/c/0/0/0"):
        train(_cfg(bad, tmp_path / "r"), log=lambda s: None)


def test_labels_out_of_range_are_refused(tiny_store, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(tiny_store, bad)
    import zarr

    labels = zarr.open_array(str(bad / "labels"), mode="r+")
    labels[4] = 7
    with pytest.raises(TrainError, match=r"labels of samples \[4\] are outside 0..2"):
        train(_cfg(bad, tmp_path / "r"), log=lambda s: None)


def test_missing_split_and_missing_images_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", train_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
             train_labels=np.array([0, 1, 0, 1]), test_images=rng.integers(0, 255, (2, 28, 28), dtype=np.uint8),
             test_labels=np.array([0, 1]))
    extract_dataset(tmp_path / "d.npz", tmp_path / "s.zarr", "tiny", image_size=32, num_workers=0, progress=False)
    import zarr

    splits = zarr.open_array(str(tmp_path / "s.zarr" / "splits"), mode="r+")
    assert (splits[:] == 1).any()  # a dataset without val gets one drawn from train at extraction
    splits[:] = np.where(splits[:] == 1, 0, splits[:])  # a store made without: refused by name
    with pytest.raises(TrainError, match="has no such split in split 'val'"):
        train(_cfg(tmp_path / "s.zarr", tmp_path / "r"), log=lambda s: None)
    extract_dataset(tmp_path / "d.npz", tmp_path / "noimg.zarr", "tiny", image_size=0, num_workers=0, progress=False)
    zarr.open_array(str(tmp_path / "noimg.zarr" / "splits"), mode="r+")[1] = 1  # a val split, so the images check is reached
    with pytest.raises(TrainError, match="keeps no images; extract it again with --image-size"):
        train(_cfg(tmp_path / "noimg.zarr", tmp_path / "r2"), log=lambda s: None)


def test_cli_errors_are_one_line(tiny_store, tmp_path):
    result = runner.invoke(app, ["--cache", str(tmp_path / "none.zarr"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "store" in result.output and "does not exist" in result.output
    result = runner.invoke(app, ["--cache", str(tiny_store), "--out", str(tmp_path / "r"), "--window", "5"])
    assert result.exit_code == 1 and "window must divide 64" in result.output


def test_a_run_folder_of_samcache_0_2_still_evaluates_and_resumes(tiny_store, tmp_path):
    """Old run folders load: checkpoints without the fields added since 0.2 (masks_signature,
    weights) and with 0-based epochs in their history are read through RunCheckpoint."""
    from trainer.checkpoint import RESUME_KEYS, RunCheckpoint, load_checkpoint

    out = tmp_path / "old"
    train(_cfg(tiny_store, out, epochs=1), log=lambda s: None)
    for name in ("best.pt", "last.pt"):  # what 0.2 wrote: no masks_signature, no weights, epochs from 0
        state = torch.load(out / name, weights_only=True)
        state = {k: v for k, v in state.items() if k not in ("masks_signature", "weights")}
        if "history" in state:
            state["history"] = [{**h, "epoch": h["epoch"] - 1} for h in state["history"]]
        torch.save(state, out / name)
    old = load_checkpoint(out / "best.pt")
    assert isinstance(old, RunCheckpoint) and old.weights is None and old.masks_signature is None
    assert not old.resumable and load_checkpoint(out / "last.pt").resumable
    assert set(old.to_dict(resume=False)) & set(RESUME_KEYS) == set()
    result = runner.invoke(app, ["eval", "--checkpoint", str(out / "best.pt"), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    resumed = train(_cfg(tiny_store, out, epochs=2), resume=True, log=lambda s: None)
    assert resumed["epochs_run"] == 2
    assert [int(r["epoch"]) for r in _csv(out / "metrics.csv")] == [1, 2]  # renumbered from 1, as the console counts
