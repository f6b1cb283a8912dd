import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, SPLIT_ARGS
from sam_cache import EmbeddingStore, StoreMismatchError, extract_dataset
from sam_cache.encoders import build_tiny_sam

KW = dict(batch_size=4, num_workers=0, progress=False, **SPLIT_ARGS)


def _rows(path) -> np.ndarray:
    with EmbeddingStore.open(path) as s:
        return s.read_embeddings(0, len(s)).astype(np.float32)


def test_batched_embedding_equals_sam_predictor(tmp_path):
    """The whole pipeline (decode, resize, batch, normalize, pad, encode, store) against SamPredictor."""
    from segment_anything import SamPredictor

    rng = np.random.default_rng(1)
    sizes = {"a": (300, 500), "b": (640, 480), "c": (1024, 1024)}
    for cls, (h, w) in sizes.items():
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "data" / "train" / cls / "x.png")
    extract_dataset(tmp_path / "data", tmp_path / "s.zarr", "tiny", dtype="float32", batch_size=3, num_workers=0,
                    progress=False)
    predictor = SamPredictor(build_tiny_sam())
    with EmbeddingStore.open(tmp_path / "s.zarr") as store:
        assert store.done.all()
        for i, sample_id in enumerate(store.ids):
            predictor.set_image(np.asarray(Image.open(tmp_path / "data" / sample_id)))
            expected = predictor.features[0].numpy()
            got = store.read_embeddings(i, i + 1)[0]
            rel = np.abs(got - expected).max() / np.abs(expected).max()
            assert rel < 1e-5, f"{sample_id}: relative error {rel:.2e}"
            h, w = sizes[sample_id.split("/")[1]]
            assert tuple(store.orig_size[i]) == (h, w)
            assert tuple(store.valid[i]) == (int(np.ceil(h / max(h, w) * 64)), int(np.ceil(w / max(h, w) * 64)))


def test_zarr_and_hdf5_hold_the_same_store(sample_dir, tiny_store, tmp_path):
    extract_dataset(sample_dir, tmp_path / "s.h5", "tiny", image_size=64, **KW)
    with EmbeddingStore.open(tmp_path / "s.h5") as h5, EmbeddingStore.open(tiny_store) as zr:
        assert h5.format == "hdf5" and zr.format == "zarr"
        assert h5.signature == zr.signature and h5.class_names == zr.class_names
        assert (h5.ids == zr.ids).all() and (h5.labels == zr.labels).all() and (h5.splits == zr.splits).all()
        assert (h5.read_images(0, len(h5)) == zr.read_images(0, len(zr))).all()
    np.testing.assert_array_equal(_rows(tmp_path / "s.h5"), _rows(tiny_store))


def test_store_layout_and_signature(tiny_store):
    import zarr

    with EmbeddingStore.open(tiny_store) as s:
        assert s.embeddings_shape == (15, 256, 64, 64) and s.read_embeddings(0, 1).dtype == np.float16
        assert s.meta["schema_version"] == 2 and s.meta["encoder"] == "tiny" and s.meta["random_weights"]
        assert s.meta["preprocessing"]["input_size"] == 1024 and len(s.meta["manifest_sha256"]) == 64
        assert [s.meta["split_names"][k] for k in zarr.open_group(str(tiny_store))["splits"][:]] == list(s.splits)  # the codes' names, stored
        assert s.read_images(0, len(s)).shape == (15, 3, 64, 64)
        # the stored image is in the embedding's frame: image at the top left, zero padding after
        for i in range(len(s)):
            h, w = s.orig_size[i]
            rows = int(h / max(h, w) * 64 + 0.5)
            img = s.read_images(i, i + 1)[0]
            assert img[:, :rows].max() > 0 and (rows == 64 or img[:, rows:].max() == 0)
    arr = zarr.open_array(str(tiny_store / "embeddings"), mode="r")
    assert arr.chunks == (1, 256, 64, 64) and arr.shards == (15, 256, 64, 64)


def test_signature_mismatch_is_refused_and_nothing_is_lost(sample_dir, tiny_store, tmp_path):
    before = _rows(tiny_store)
    with pytest.raises(StoreMismatchError) as err:
        extract_dataset(sample_dir, tiny_store, "tiny", image_size=64, dtype="float32", **KW)
    assert "dtype: store has 'float16', this run asks for 'float32'" in str(err.value)
    with pytest.raises(StoreMismatchError, match="preprocessing.window"):
        extract_dataset(sample_dir, tiny_store, "tiny", image_size=64, window="minmax", **KW)
    with pytest.raises(StoreMismatchError, match="manifest_sha256"):
        extract_dataset(sample_dir, tiny_store, "tiny", image_size=64, seed=5, val_fraction=0.2, test_fraction=0.2,
                        batch_size=4, num_workers=0, progress=False)
    np.testing.assert_array_equal(_rows(tiny_store), before)
    with EmbeddingStore.open(tiny_store) as s:
        assert s.done.all()


def test_rerun_resumes_without_work(sample_dir, tiny_store):
    result = extract_dataset(sample_dir, tiny_store, "tiny", image_size=64, **KW)
    assert result.written == 0 and result.already_done == 15


def test_corrupt_file_is_skipped_reported_and_retried(sample_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    victim = sorted((data / "synthetic-smooth").iterdir())[0]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 3])  # truncated PNG
    result = extract_dataset(data, tmp_path / "s.zarr", "tiny", image_size=0, **KW)
    assert [s["source"] for s in result.skipped] == [str(victim)] and "decode" in result.skipped[0]["error"]
    with EmbeddingStore.open(tmp_path / "s.zarr") as s:
        assert s.done.sum() == 14 and s.meta["skipped"][0]["id"] == f"synthetic-smooth/{victim.name}"
        kept = s.read_embeddings(0, 15)[s.done]
    victim.write_bytes(good)  # the user repairs the file; the next run fills exactly that row
    again = extract_dataset(data, tmp_path / "s.zarr", "tiny", image_size=0, **KW)
    assert again.written == 1 and again.skipped == []
    with EmbeddingStore.open(tmp_path / "s.zarr") as s:
        assert s.done.all() and s.meta["skipped"] == []
        np.testing.assert_array_equal(s.read_embeddings(0, 15)[~np.isin(np.arange(15), [s.ids.tolist().index(
            f"synthetic-smooth/{victim.name}")])], kept)


def _cli(*args):
    return [sys.executable, "-m", "cli.samcache", "extract", *map(str, args)]


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(sample_dir, tiny_store, tmp_path):
    out = tmp_path / "killed.zarr"
    args = ["--dataset", sample_dir, "--out", out, "--encoder", "tiny", "--image-size", "64", "--batch-size", "2",
            "--workers", "0", "--val-fraction", "0.2", "--test-fraction", "0.2", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(_cli(*args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            with EmbeddingStore.open(out) as s:
                done = int(s.done.sum())
        except Exception:
            done = 0  # not created yet
        if done >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with EmbeddingStore.open(out) as s:
        killed_at = int(s.done.sum())
    assert 2 <= killed_at < 15
    resumed = subprocess.run(_cli(*args), cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({killed_at} already done, 15 in all)" in " ".join(resumed.stdout.split())
    np.testing.assert_array_equal(_rows(out), _rows(tiny_store))
    with EmbeddingStore.open(out) as a, EmbeddingStore.open(tiny_store) as b:
        assert a.done.all()
        assert (a.read_images(0, len(a)) == b.read_images(0, len(b))).all()
        assert (a.valid == b.valid).all() and (a.orig_size == b.orig_size).all()


def test_int8_store_is_half_the_size_and_close_to_float16(sample_dir, tiny_store, tmp_path):
    import zarr

    from sam_cache import verify_store

    extract_dataset(sample_dir, tmp_path / "q.zarr", "tiny", image_size=64, dtype="int8", **KW)
    with EmbeddingStore.open(tmp_path / "q.zarr") as q, EmbeddingStore.open(tiny_store) as f:
        assert zarr.open_group(str(tmp_path / "q.zarr"))["embeddings"].dtype == np.int8 and q.meta["dtype"] == "int8"
        a, b = q.read_embeddings(0, 15), f.read_embeddings(0, 15).astype(np.float32)
        scales = np.asarray(zarr.open_array(str(tmp_path / "q.zarr" / "scales"), mode="r")[:])
    bound = scales[:, :, None, None] / 2 + np.abs(b) * 2**-10 + 1e-6  # int8 rounding + float16 rounding
    assert (np.abs(a - b) <= bound).all()
    assert np.abs(a - b).max() / np.abs(b).max() < 0.01
    size = lambda p: sum(x.stat().st_size for x in (p / "embeddings").rglob("*") if x.is_file())  # noqa: E731
    assert size(tmp_path / "q.zarr") < 0.55 * size(tiny_store)
    assert verify_store(tmp_path / "q.zarr") == []


def test_images_without_a_picture_are_stored_and_named(sample_dir, tmp_path):
    """Stripes (every column one colour, as in 102 of ISIC-550's files) decode fine: only the check names them."""
    import shutil

    from typer.testing import CliRunner

    from cli.samcache import app
    from sam_cache.preprocess import image_problem

    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    files = sorted((data / "synthetic-smooth").iterdir())
    stripes = np.repeat(np.random.default_rng(0).integers(0, 255, (1, 40, 3), dtype=np.uint8), 30, axis=0)
    Image.fromarray(stripes).save(files[0])
    Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(files[1])
    assert image_problem(stripes) == "every column is one colour (vertical stripes)"
    assert image_problem(stripes.transpose(1, 0, 2)) == "every row is one colour (horizontal stripes)"
    assert image_problem(np.asarray(Image.open(files[2]).convert("RGB"))) == ""
    out = tmp_path / "s.zarr"
    result = extract_dataset(data, out, "tiny", image_size=0, **KW)
    assert result.written == 15 and result.skipped == []  # stored all the same
    assert [(s["source"], s["problem"]) for s in result.suspect] == [
        (str(files[0]), "every column is one colour (vertical stripes)"), (str(files[1]), "one colour everywhere")]
    with EmbeddingStore.open(out, mode="r+") as s:  # a resumed run keeps the report of the rows it skips
        s.add_suspect([], redone=np.array([result.suspect[1]["index"]]))
    runner = CliRunner(env={"COLUMNS": "200"})
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "1 image(s) with no picture" in info.output
    again = runner.invoke(app, ["extract", "--dataset", str(data), "--out", str(out), "--encoder", "tiny",
                                "--image-size", "0", "--workers", "0", "--overwrite", "--no-progress",
                                *[a for k, v in SPLIT_ARGS.items() for a in (f"--{k.replace('_', '-')}", str(v))]])
    assert again.exit_code == 0, again.output
    assert "2 stored image(s) hold no picture" in again.output and str(files[0]) in " ".join(again.output.split())
