"""A store written by an old samcache (schema 1, commit bf7cb66) still opens, reads and converts."""

import tarfile
from pathlib import Path

import numpy as np
import pytest

from sam_cache import EmbeddingStore, convert_store, summarize_store, verify_store

FIXTURE = Path(__file__).parent.parent / "data" / "schema1_store.tar.gz"


@pytest.fixture
def old_store(tmp_path) -> Path:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "schema1.zarr"


def test_a_schema_1_store_opens_and_reads(old_store):
    with EmbeddingStore.open(old_store) as s:
        assert s.meta["schema_version"] == 1 and not s.has_checksums
        assert len(s) == 3 and s.done.all() and s.dtype == "int8" and s.grid == 64
        assert list(s.ids) == ["test/a/2.png", "train/a/0.png", "train/b/1.png"]
        assert list(s.splits) == ["test", "train", "train"] and s.class_names == ["a", "b"]
        assert s.labels.tolist() == [0, 0, 1]
        emb = s.read_rows(np.arange(3))  # no checksums to check: read as it is
        assert emb.shape == (3, 256, 64, 64) and emb.dtype == np.float32 and np.isfinite(emb).all() and emb.any()
        images = s.read_rows(np.arange(3), "images")
        assert images.shape == (3, 3, 16, 16) and images.any()
        assert s.signature["grid"] == 64  # the field that schema 1 did not record reads as its only value
    summary = summarize_store(old_store)
    assert summary["done"] == 3 and summary["package_version"] == "0.1.0" and summary["checksums"] is False
    assert summary["content_digest"] is None  # no checksums to digest
    problems = verify_store(old_store)
    assert len(problems) == 1 and "schema 1 and no checksums" in problems[0]


def test_a_schema_1_store_converts_to_a_checked_one(old_store, tmp_path):
    convert_store(old_store, tmp_path / "new.zarr", dtype="float16", progress=False)
    assert verify_store(tmp_path / "new.zarr") == []
    with EmbeddingStore.open(old_store) as a, EmbeddingStore.open(tmp_path / "new.zarr") as b:
        assert b.meta["schema_version"] == 2 and b.has_checksums and list(b.ids) == list(a.ids)
        np.testing.assert_allclose(b.read_rows(np.arange(3)), a.read_rows(np.arange(3)), rtol=1e-2, atol=1e-3)
        assert (b.read_rows(np.arange(3), "images") == a.read_rows(np.arange(3), "images")).all()
