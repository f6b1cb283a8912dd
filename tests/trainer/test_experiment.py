import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch

from trainer.errors import ConfigError
from trainer.experiment import StudyConfig, pooled_features, run_study
from trainer.study_merge import merge_studies
from trainer.stats import paired_difference, verdict
from trainer.records import write_rows

RECIPE = {"backbone": "resnet10t", "img_size": 32, "epochs": 1, "min_steps": 4, "batch_size": 4}


@pytest.mark.slow  # about 20 s: a whole study with resume
def test_study_end_to_end_with_paired_differences_and_resume(tiny_store, tmp_path):
    cfg = StudyConfig(fractions=(0.5, 1.0), seeds=(0, 1), extra_seeds={1.0: (2,)},
                      methods=("backbone", "slca", "fuse", "linear_probe"), train=RECIPE)
    logged = []
    summary = run_study(tiny_store, tmp_path, cfg, device="cpu", log=logged.append)
    with open(tmp_path / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 4 * 2 + 4 * 3  # methods x seeds, the full fraction with an extra seed
    assert {r["method"] for r in runs} == {"backbone", "slca", "fuse", "linear_probe"}
    # only the training subset shrinks: 9 train rows, stratified -> 6 at half (2 per class), 9 at full
    assert {r["fraction"]: r["train_samples"] for r in runs} == {"0.5": "6", "1.0": "9"}
    # the step budget: 6 samples at batch 4 are 1 step a pass, 9 are 2; --min-steps 4 makes both 4
    assert {r["steps"] for r in runs if r["method"] != "linear_probe"} == {"4"}
    # the selected epoch's validation score is kept for choosing on validation data; probes have none
    assert all(0 <= float(r["val_balanced_accuracy"]) <= 1 for r in runs if r["method"] != "linear_probe")
    assert all(r["val_balanced_accuracy"] == "" for r in runs if r["method"] == "linear_probe")
    assert len(summary) == 4 * 2
    with open(tmp_path / "paired.csv") as f:
        paired = {(r["a"], r["b"], r["fraction"], r["metric"]): r for r in csv.DictReader(f)}
    by_seed = {(r["method"], r["seed"]): r for r in runs if r["fraction"] == "1.0"}
    for metric in ("balanced_accuracy", "auc"):  # each metric's difference is its own runs' difference
        full = paired[("slca", "backbone", "1.0", metric)]
        want = np.mean([float(by_seed["slca", s][metric]) - float(by_seed["backbone", s][metric]) for s in "012"])
        assert full["n"] == "3" and float(full["mean"]) == pytest.approx(want)
        assert float(full["low"]) <= float(full["mean"]) <= float(full["high"])
    table = (tmp_path / "summary.md").read_text()
    assert "| slca | 0.5 | 2 | 4 |" in table and "| slca − backbone | 1 | 3 |" in table
    assert "| difference (balanced accuracy) |" in table and "| difference (AUC) |" in table
    assert (tmp_path / "fraction_balanced_accuracy.png").stat().st_size > 1000
    assert (tmp_path / "fraction_auc.png").stat().st_size > 1000
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 3 * 5  # the trained methods; each keeps best.pt, not the resume-only last.pt
    assert all((d / "best.pt").is_file() and not (d / "last.pt").exists() for d in run_dirs)
    again = run_study(tiny_store, tmp_path, cfg, device="cpu", log=logged.append)
    assert len(again) == len(summary) and sum("seed" in line for line in logged) == 20  # nothing rerun
    record = json.loads((tmp_path / "study.json").read_text())
    assert len(record["invocations"]) == 2
    assert record["recipe"]["class_balance"] == "loss" and record["recipe"]["lr"] == 1e-3  # defaults resolved
    # resuming under another recipe would mix incomparable rows: refused before anything runs
    changed = StudyConfig(fractions=(1.0,), seeds=(0,), methods=("backbone",), train={**RECIPE, "lr": 0.01})
    with pytest.raises(ConfigError, match=r"study.json.*lr \(was 0.001, now 0.01\)"):
        run_study(tiny_store, tmp_path, changed, device="cpu", log=logged.append)
    assert len(json.loads((tmp_path / "study.json").read_text())["invocations"]) == 2

    # a study run in two halves (two processes side by side) merges back into the same summary
    for half, keep in (("a", {"backbone", "linear_probe"}), ("b", {"slca", "fuse"})):
        (tmp_path / half).mkdir()
        shutil.copytree(tmp_path / "runs", tmp_path / half / "runs")
        shutil.copy(tmp_path / "study.json", tmp_path / half / "study.json")
        write_rows([r for r in runs if r["method"] in keep], tmp_path / half / "runs.csv")
    merged = merge_studies([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    assert len(merged) == len(summary)
    for name in ("summary.md", "paired.csv"):
        assert (tmp_path / "merged" / name).read_text() == (tmp_path / name).read_text()
    # its record keeps the recipe once, and a merge of merges lists the first sources, flat
    merge_studies([tmp_path / "merged", tmp_path / "a"], tmp_path / "merged3")
    kept = json.loads((tmp_path / "merged3" / "study.json").read_text())
    assert [m["study"] for m in kept["merged_from"]] == [str(tmp_path / h) for h in "ab"]
    assert kept["recipe"]["lr"] == 1e-3 and not any("recipe" in m for m in kept["merged_from"])
    assert all(len(m["invocations"]) == 2 for m in kept["merged_from"])
    # a merge may be written again, a study's own rows are never replaced by one
    merge_studies([tmp_path / "a", tmp_path / "b"], tmp_path / "merged3")
    before = (tmp_path / "a" / "runs.csv").read_text()
    with pytest.raises(ConfigError, match=r"--out .*a holds a study \(runs.csv\) that is not a merge"):
        merge_studies([tmp_path / "a", tmp_path / "b"], tmp_path / "a")
    assert (tmp_path / "a" / "runs.csv").read_text() == before
    # a run trained with another recipe is refused, by name
    cfg_file = next((tmp_path / "b" / "runs").glob("slca-*/config.yaml"))
    cfg_file.write_text(cfg_file.read_text().replace("lr: 0.001", "lr: 0.002"))
    with pytest.raises(ConfigError, match=r"different recipes: lr \(0.001 vs 0.002\)"):
        merge_studies([tmp_path / "a", tmp_path / "b"], tmp_path / "merged2")


def test_paired_difference_is_a_t_interval():
    d = paired_difference([0.70, 0.72, 0.68, 0.75], [0.60, 0.65, 0.66, 0.70])
    diffs = np.array([0.10, 0.07, 0.02, 0.05])
    half = 3.182446305284263 * diffs.std(ddof=1) / math.sqrt(4)  # t(0.975, 3)
    assert d["n"] == 4 and d["mean"] == pytest.approx(diffs.mean())
    assert (d["low"], d["high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert verdict(d) == "better"
    assert verdict(paired_difference([0.5, 0.51, 0.49], [0.5, 0.5, 0.5])) == "no effect (within ±0.05)"
    assert verdict(paired_difference([0.5, 0.8, 0.2], [0.5, 0.5, 0.5])) == "not resolved"
    assert verdict(paired_difference([0.5], [0.4])) == "n/a"


def test_probe_features_are_the_region_mean_of_the_embedding(tiny_store):
    """The probe pools the image's region of the 64x64 grid (the sample images are 3:4, so part of
    the grid is padding): close to the mean over the valid cells, and far from the padded mean."""
    from sam_cache import EmbeddingStore
    from trainer.data import PairedCache

    with EmbeddingStore.open(tiny_store) as s, PairedCache(s, np.arange(len(s)), torch.device("cpu"), "host") as c:
        rows = np.array([0, 1])
        f = pooled_features(c, rows, "mean")
        emb = s.read_rows(rows).astype(np.float32)
        valid = np.stack([emb[k, :, :vr, :vc].mean((1, 2)) for k, (vr, vc) in enumerate(s.valid[rows])])
        padded = emb.mean((2, 3))
        assert f.shape == (2, 256)
        assert np.abs(f - valid).mean() < 0.25 * np.abs(f - padded).mean()
        assert pooled_features(c, rows, "meanstd").shape == (2, 512)


def test_a_study_compares_focus_with_each_named_mask_set(tiny_store, tmp_path):
    import yaml

    from sam_cache import EmbeddingStore
    from trainer.experiment import method_options, study_pairs

    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    with EmbeddingStore.open(store, "r+") as s:
        n = len(s)
        for name, value in (("gt", 1), ("other", 0)):
            masks = np.zeros((n, 1, 64, 64), np.uint8)
            masks[:, :, 8:40, 8:40] = value
            ms = s.prepare_masks({"decoder": None, "prompt": "file", "source": name}, mask_set=name)
            ms.write(np.arange(n), masks, np.ones(n, np.float32), np.zeros((n, 4), np.float32))
    assert method_options("focus-overlay-gt") == {"slca": False, "fuse": "none", "focus": "overlay", "mask_set": "gt"}
    assert method_options("focus_fuse_slca-overlay-learned-c3") == {"slca": True, "fuse": "meanstd", "focus": "overlay",
                                                                    "mask_set": "learned-c3"}
    assert ("focus_fuse_slca-crop-gt", "fuse_slca") in study_pairs(["fuse_slca", "focus_fuse_slca-crop-gt"])
    for bad in ("focus-nope-gt", "focus-overlay", "focus-none-gt", "slca-overlay-gt", "fuse_slca-overlay-gt"):
        with pytest.raises(ConfigError, match="unknown study method"):
            method_options(bad)
    cfg = StudyConfig(fractions=(1.0,), seeds=(0, 1), methods=("backbone", "focus-overlay-gt", "focus-crop-other"),
                      train=RECIPE)
    run_study(store, tmp_path / "study", cfg, device="cpu", log=lambda _: None)
    for method, mask_set, focus in (("focus-overlay-gt", "gt", "overlay"), ("focus-crop-other", "other", "crop")):
        saved = yaml.safe_load((tmp_path / "study" / "runs" / f"{method}-f1.0-s0" / "config.yaml").read_text())
        assert saved["mask_set"] == mask_set and saved["focus"] == focus
    with open(tmp_path / "study" / "paired.csv") as f:
        pairs = {(r["a"], r["b"]) for r in csv.DictReader(f)}
    assert {("focus-overlay-gt", "backbone"), ("focus-crop-other", "backbone")} <= pairs


def test_a_merge_pairs_studies_by_the_store_s_content_not_its_path(tiny_store, tmp_path):
    from sam_cache import EmbeddingStore, summarize_store

    probe = StudyConfig(fractions=(1.0,), seeds=(0,), methods=("linear_probe",), train=RECIPE)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    digest = summarize_store(tiny_store)["content_digest"]
    assert len(digest) == 16 and summarize_store(copy)["content_digest"] == digest
    run_study(tiny_store, tmp_path / "a", probe, device="cpu", log=lambda s: None)
    run_study(copy, tmp_path / "b", StudyConfig(fractions=(1.0,), seeds=(1,), methods=("linear_probe",),
                                                train=RECIPE), device="cpu", log=lambda s: None)
    assert json.loads((tmp_path / "a" / "study.json").read_text())["invocations"][0]["store_digest"] == digest
    # the same rows at another path: one store, so the seeds pair
    assert len(merge_studies([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")) == 1
    # the copy extracted again with other bytes in one row: another store, whatever its path
    with EmbeddingStore.open(copy, "r+") as s:
        rows = s.read_embeddings(0, 1)
        s.write_rows(0, rows + 1, s.orig_size[:1], s.valid[:1], s.window[:1], s.read_images(0, 1))
    assert summarize_store(copy)["content_digest"] != digest
    run_study(copy, tmp_path / "c", StudyConfig(fractions=(1.0,), seeds=(2,), methods=("linear_probe",),
                                                train=RECIPE), device="cpu", log=lambda s: None)
    with pytest.raises(ConfigError, match=r"hold different rows \(content digests .*was a store extracted again"):
        merge_studies([tmp_path / "a", tmp_path / "c"], tmp_path / "ac")
    # a study that recorded no digest (made before digests) is checked by path, as before
    old = json.loads((tmp_path / "b" / "study.json").read_text())
    old["invocations"][0].pop("store_digest")
    (tmp_path / "b" / "study.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="run on different stores"):
        merge_studies([tmp_path / "a", tmp_path / "b"], tmp_path / "ab2")
    # ... and at the same path it merges, but says that only the path was checked
    assert json.loads((tmp_path / "ab" / "study.json").read_text())["store_check"] == "content digest"
    run_study(tiny_store, tmp_path / "d", StudyConfig(fractions=(1.0,), seeds=(3,), methods=("linear_probe",),
                                                      train=RECIPE), device="cpu", log=lambda s: None)
    bare = json.loads((tmp_path / "d" / "study.json").read_text())
    bare["invocations"][0].pop("store_digest")
    (tmp_path / "d" / "study.json").write_text(json.dumps(bare))
    said = []
    merge_studies([tmp_path / "a", tmp_path / "d"], tmp_path / "ad", note=said.append)
    assert len(said) == 1 and said[0].startswith(f"no content digest of the store recorded in {tmp_path / 'd'}, so")
    assert json.loads((tmp_path / "ad" / "study.json").read_text())["store_check"] == "path"


def test_a_merge_of_no_study_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="no study to merge"):
        merge_studies([], tmp_path / "m")
    assert not (tmp_path / "m").exists()
