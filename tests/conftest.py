"""Shared fixtures: a small SYNTHETIC dataset and a store made from it with the tiny encoder."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def _load_make_sample():
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "data" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_sample"] = module
    spec.loader.exec_module(module)
    return module


make_sample = _load_make_sample()

# Five images per class, so that a 20 % test and val split still holds every class.
SAMPLE_PER_CLASS = 5
SPLIT_ARGS = {"val_fraction": 0.2, "test_fraction": 0.2}


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    return make_sample.make_sample(tmp_path_factory.mktemp("sample") / "sample", per_class=SAMPLE_PER_CLASS, seed=0)


@pytest.fixture(scope="session")
def tiny_store(sample_dir, tmp_path_factory) -> Path:
    """The sample set extracted once with the tiny encoder, images kept at 64 px."""
    from sam_cache import extract_dataset

    out = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    extract_dataset(sample_dir, out, "tiny", image_size=64, batch_size=4, num_workers=0, progress=False, **SPLIT_ARGS)
    return out


def shared(name: str) -> Path:
    """A real dataset from ../shared/data, or skip the test where it is not present."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not present")
    return path


def with_square_masks(tiny_store: Path, tmp_path: Path, name: str = "gt") -> Path:
    """A copy of the tiny store with a "ground truth" mask set ``name``: a square whose place
    depends on the sample (what the learned prompt's tests learn from)."""
    import shutil

    import numpy as np

    from sam_cache import EmbeddingStore

    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    with EmbeddingStore.open(store, "r+") as s:
        n = len(s)
        masks = np.zeros((n, 1, 64, 64), np.uint8)
        for k in range(n):
            masks[k, 0, 4 * (k % 5):4 * (k % 5) + 20, 30 - 2 * (k % 7):50 - 2 * (k % 7)] = 1
        ms = s.prepare_masks({"decoder": None, "prompt": "file", "source": "test squares"}, mask_set=name)
        ms.write(np.arange(n), masks, np.ones(n, np.float32), np.zeros((n, 4), np.float32))
    return store
