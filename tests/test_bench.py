"""The benchmarks run on a CPU with the tiny encoder and write the JSON their issue asks for."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, with_square_masks


@pytest.mark.slow
def test_extract_bench_writes_its_ratios(tmp_path):
    out = tmp_path / "e.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "extract.py"), "--encoder", "tiny", "--n", "4",
                          "--image-px", "128", "--batch-size", "2", "--workers", "0", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(out.read_text())
    for key in ("predictor_img_per_s", "stock_batched_img_per_s", "samcache_img_per_s", "disk_write_gb_per_s",
                "ratio_samcache_vs_predictor", "ratio_samcache_vs_stock_batched", "fraction_of_disk_write"):
        assert r[key] > 0, key
    assert r["gflop_per_image"] > 1 and r["device"].startswith("CPU")


@pytest.mark.slow
def test_train_bench_writes_its_ratios(tmp_path):
    out = tmp_path / "t.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--n", "16", "--batch-size", "4",
                          "--img-size", "32", "--steps", "2", "--online-steps", "1", "--warmup", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(out.read_text())
    for key in ("slca_cached_img_per_s", "backbone_img_per_s", "online_img_per_s",
                "ratio_slca_cached_vs_backbone", "ratio_slca_cached_vs_online"):
        assert r[key] > 0, key
    assert r["cache_mode"] == "host"


def test_lever_runner_refuses_a_folder_whose_base_ran_on_another_recipe(tiny_store, tmp_path):
    """bench/defaults.py compares each variant with the base runs in its folder: rows added on another
    base recipe (other --set values, or a default changed since) are refused, naming what differs."""
    cmd = [sys.executable, str(ROOT / "bench" / "defaults.py"), "--store", str(tiny_store), "--out", str(tmp_path),
           "--seeds", "0", "--variant", "lr_low: lr=3e-4", "--set", "backbone=resnet10t", "img_size=32", "epochs=1",
           "batch_size=4", "min_steps=0"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "recipe" in (tmp_path / "levers.yaml").read_text()
    other = subprocess.run(cmd + ["fuse=meanstd"], capture_output=True, text=True, timeout=600)
    assert other.returncode != 0 and "fuse: 'none' there, 'meanstd' now" in other.stderr, other.stderr[-2000:]
    assert "fuse: none" in (tmp_path / "runs" / "base-s0" / "config.yaml").read_text()  # nothing retrained
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # the same base: resumes, trains nothing
    assert again.returncode == 0 and "lr_low seed 0" not in again.stdout, again.stderr[-2000:]


@pytest.mark.slow
def test_stored_form_bench_compares_float16_with_int8(tiny_store, tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "stored_form.py"), "--store", str(tiny_store),
                          "--out", str(tmp_path), "--seeds", "0-1", "--device", "cpu", "--set", "epochs=1",
                          "img_size=32", "batch_size=4", "min_steps=0"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads((tmp_path / "stored_form.json").read_text())
    assert set(r["test"]) == {"float16", "int8"} and r["forms"]["int8"]["bytes"] < r["forms"]["float16"]["bytes"]
    assert 0 < r["forms"]["int8"]["error"]["mean"] < 0.02 and r["paired"]["int8"]["balanced_accuracy"]["n"] == 2
    assert len((tmp_path / "runs.csv").read_text().splitlines()) == 1 + 4
    assert "| int8 | 1.00 |" in run.stdout and "balanced_accuracy: int8 - float16" in run.stdout


def test_gate_strength_measures_how_far_trained_gates_moved(tiny_store, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from gate_strength import gate_strength

    from trainer import TrainConfig, train

    base = dict(cache=str(tiny_store), epochs=1, batch_size=4, img_size=32, device="cpu")
    train(TrainConfig(out=str(tmp_path / "slca"), lr=0.05, **base), log=lambda s: None)  # TrainConfig(...) as users write it
    moved = gate_strength(tmp_path / "slca", rows=3)
    assert list(moved) == ["stages.0", "stages.1", "stages.2", "stages.3"]  # the default backbone: TinyViT
    assert all(0 < m <= x for m, x in moved.values())  # a trained gate is no longer exactly 1
    train(TrainConfig(out=str(tmp_path / "plain"), slca=False, **base), log=lambda s: None)
    with pytest.raises(ValueError, match="without SLCA"):
        gate_strength(tmp_path / "plain")


@pytest.mark.slow
def test_device_check_smoke_runs_every_step_on_the_cpu(tmp_path):
    """The GPU check's CPU half: every step runs, tiny and untimed, so a refactor that breaks it breaks CI."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "device_check.py"), "--device", "cpu", "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=1500)
    report = json.loads((tmp_path / "device_check.json").read_text())
    names = [s["name"] for s in report["steps"]]
    assert run.returncode == 0, (report["failed"], [s.get("traceback") for s in report["steps"] if not s["ok"]])
    for expected in ("extract[tiny,flex,bfloat16]", "extract[litemedsam,stock,float16]", "masks", "train[host]",
                     "train[stream]", "torchrun", "predict", "speed.extract[tiny]", "speed.train", "speed.sweep"):
        assert expected in names, expected
    table = (tmp_path / "device_check.md").read_text()
    assert "| train[stream] | ok |" in table and report["device"].startswith("CPU")


def test_mask_quality_and_the_side_by_side_overlay_read_named_mask_sets(tiny_store, tmp_path):
    """Masks imported from files measure Dice 1 against those files; another set measures less; the
    side-by-side overlay draws both sets on the same images."""
    import shutil

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT / "bench"))
    import mask_overlay
    import mask_quality

    from sam_cache import EmbeddingStore
    from sam_cache.user_masks import import_masks

    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    with EmbeddingStore.open(store) as s:
        for k, (rel, (h, w)) in enumerate(zip(s.ids, s.orig_size)):
            m = np.zeros((int(h), int(w)), np.uint8)
            m[10 + k:60 + k, 20:90] = 255
            (tmp_path / "m" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(tmp_path / "m" / rel)
    import_masks(store, str(tmp_path / "m"), progress=False, mask_set="gt")
    with EmbeddingStore.open(store, "r+") as s:  # a second set: the same squares, shifted
        n = len(s)
        shifted = np.roll(s.mask_set("gt").read(np.arange(n)), 6, axis=-1)
        s.prepare_masks({"decoder": None, "prompt": "shifted"}, mask_set="shifted").write(
            np.arange(n), shifted, np.ones(n, np.float32), np.zeros((n, 4), np.float32))
    same = mask_quality.measure(str(store), str(tmp_path / "m"), mask_set="gt")
    other = mask_quality.measure(str(store), str(tmp_path / "m"), mask_set="shifted")
    lesion = [r for r in same["summary"] if r["class"] == "lesion classes"]
    assert lesion and all(r["dice"] == 1.0 and r["miss_rate"] == 0.0 for r in lesion)
    assert all(r["dice"] < 0.95 for r in other["summary"] if r["class"] == "lesion classes")
    assert same["masks"]["mask_set"] == "gt" and "set `gt`" in mask_quality.markdown(same)
    mask_overlay.overlay(str(store), str(tmp_path / "o.png"), per_class=1, mask_sets=["gt", "shifted"])
    assert (tmp_path / "o.png").stat().st_size > 5000


@pytest.mark.slow
def test_learned_decode_variants_start_from_what_the_learned_set_stores(tiny_store, tmp_path):
    """The bench's plain ``box`` variant decodes exactly the masks ``--prompt learned`` stored, so
    every other variant is measured against the same starting point."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    import learned_decode
    import mask_quality

    from sam_cache import EmbeddingStore
    from sam_cache.learned_prompt import HeadRecipe
    from sam_cache.masks import decode_masks

    store = with_square_masks(tiny_store, tmp_path)
    with EmbeddingStore.open(store) as s:
        masks = s.mask_set("gt").read(np.arange(len(s)))
    decode_masks(store, prompt="learned", learn_from="gt", mask_set="learned", recipe=HeadRecipe(width=8, epochs=2),
                 progress=False)
    result = learned_decode.run(str(store), "learned", "gt", "val", [1.0])
    with EmbeddingStore.open(store) as s:
        rows = s.split_indices("val")
        stored = s.mask_set("learned").read(rows)[:, 0] > 0
    want = [mask_quality.dice_iou(p, t > 0)[0] for p, t in zip(stored, masks[rows, 0]) if t.any()]
    assert len(want) == len(rows) and result["summary"]["box grow=1"]["n"] == len(want)
    np.testing.assert_allclose(result["per_image"]["box grow=1"], want)
    assert set(result["summary"]) == {f"{v} grow=1" for v in learned_decode.VARIANTS}
    assert "| box+refine grow=1 |" in learned_decode.markdown(result)
