"""torchrun extraction on CPU with gloo, and stores at fsspec URLs."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SPLIT_ARGS
from sam_cache import EmbeddingStore, extract_dataset, summarize_store
from sam_cache.distributed import rank_row_mask


def _torchrun(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "cli.samcache", "extract", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_rank_row_mask_deals_blocks_round_robin():
    a, b = rank_row_mask(10, 4, 0, 2), rank_row_mask(10, 4, 1, 2)
    assert np.flatnonzero(a).tolist() == [0, 1, 2, 3, 8, 9] and np.flatnonzero(b).tolist() == [4, 5, 6, 7]
    assert rank_row_mask(10, 4, 0, 1).all()


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume_per_rank(sample_dir, tiny_store, tmp_path):
    out = tmp_path / "ddp.zarr"
    args = ["--dataset", sample_dir, "--out", out, "--encoder", "tiny", "--image-size", "64", "--batch-size", "2",
            "--workers", "0", "--shard-size", "2", "--block-size", "4", "--no-progress",
            "--val-fraction", "0.2", "--test-fraction", "0.2"]
    run = _torchrun(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    with EmbeddingStore.open(out) as a, EmbeddingStore.open(tiny_store) as b:
        assert a.done.all() and a.block_size == 4 and a.signature == b.signature
        np.testing.assert_array_equal(a.read_embeddings(0, 15), b.read_embeddings(0, 15))
        assert (a.read_images(0, len(a)) == b.read_images(0, len(b))).all()
        assert (a.valid == b.valid).all() and (a.orig_size == b.orig_size).all() and (a.labels == b.labels).all()
    # forget rows owned by each rank; a rerun fills exactly those, each rank its own
    import zarr

    zarr.open_array(str(out / "done"), mode="r+")[[1, 5, 13]] = False  # as a tool outside samcache could
    again = _torchrun(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stored 3 new embeddings" in " ".join(again.stdout.split()) and "12 already done" in again.stdout
    with EmbeddingStore.open(out) as a, EmbeddingStore.open(tiny_store) as b:
        assert a.done.all()
        np.testing.assert_array_equal(a.read_embeddings(0, 15), b.read_embeddings(0, 15))


def test_store_at_an_fsspec_url(sample_dir, tiny_store, tmp_path):
    url = f"file://{tmp_path}/url.zarr"
    extract_dataset(sample_dir, url, "tiny", image_size=64, batch_size=4, num_workers=0, progress=False, **SPLIT_ARGS)
    assert EmbeddingStore.exists(url) and (tmp_path / "url.zarr" / "zarr.json").exists()
    with EmbeddingStore.open(url) as a, EmbeddingStore.open(tiny_store) as b:
        np.testing.assert_array_equal(a.read_embeddings(0, 15), b.read_embeddings(0, 15))
    assert summarize_store(url)["done"] == 15
    again = extract_dataset(sample_dir, url, "tiny", image_size=64, num_workers=0, progress=False, **SPLIT_ARGS)
    assert again.written == 0
    extract_dataset(sample_dir, url, "tiny", image_size=64, num_workers=0, progress=False, overwrite=True,
                    **SPLIT_ARGS)
    assert summarize_store(url)["done"] == 15


def test_distributed_refuses_hdf5(sample_dir, tmp_path, monkeypatch):
    from sam_cache import StoreError
    from sam_cache import distributed

    monkeypatch.setattr(distributed, "context", lambda device_type="cpu": distributed.DistContext(0, 2))
    with pytest.raises(StoreError, match="distributed extraction needs a Zarr store"):
        extract_dataset(sample_dir, tmp_path / "x.h5", "tiny", num_workers=0, progress=False, **SPLIT_ARGS)
