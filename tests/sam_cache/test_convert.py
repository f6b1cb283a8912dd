import numpy as np
import pytest
from typer.testing import CliRunner

from cli.samcache import app
from sam_cache import EmbeddingStore, StoreMismatchError, convert_store, verify_store

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.mark.parametrize("dtype,dst_name,tol", [("int8", "q.zarr", 1 / 254), ("bfloat16", "b.h5", 2 ** -8)])
def test_converted_store_equals_the_source_within_the_forms_rounding(tiny_store, tmp_path, dtype, dst_name, tol):
    dst = tmp_path / dst_name
    r = convert_store(tiny_store, dst, dtype, progress=False)
    with EmbeddingStore.open(tiny_store) as s, EmbeddingStore.open(dst) as d:
        assert r["rows"] == r["done"] == int(s.done.sum()) == int(d.done.sum())
        assert d.signature == {**s.signature, "dtype": dtype}
        assert d.meta["converted_from"]["dtype"] == "float16"
        assert np.array_equal(d.labels, s.labels) and np.array_equal(d.splits, s.splits) and list(d.ids) == list(s.ids)
        assert np.array_equal(d.valid, s.valid) and np.array_equal(d.orig_size, s.orig_size)
        assert np.array_equal(np.asarray(d.images[:]), np.asarray(s.images[:]))
        a = s.read_embeddings(0, len(s)).astype(np.float32)
        b = d.read_embeddings(0, len(d)).astype(np.float32)
        peak = np.abs(a).max(axis=(2, 3), keepdims=True)  # per sample and channel
        assert np.all(np.abs(a - b) <= tol * peak + 1e-6)
        assert not np.array_equal(a, b)  # it really was re-encoded
    assert verify_store(dst) == []


def test_convert_resumes_and_refuses_a_foreign_destination(tiny_store, tmp_path):
    dst = tmp_path / "q.zarr"
    convert_store(tiny_store, dst, "int8", progress=False)
    with EmbeddingStore.open(dst, "r+") as d:  # as if killed before the last rows were marked
        d.done[-4:] = False
        d._b["done"][:] = d.done
    again = convert_store(tiny_store, dst, "int8", progress=False)
    assert again["rows"] == 4 and again["done"] == 15
    with pytest.raises(StoreMismatchError, match="dtype"):
        convert_store(tiny_store, dst, "float32", progress=False)
    with EmbeddingStore.open(dst) as d:
        assert d.meta["dtype"] == "int8" and d.done.all()  # the refused call touched nothing


def test_convert_cli(tiny_store, tmp_path):
    result = runner.invoke(app, ["convert", str(tiny_store), "--out", str(tmp_path / "q.zarr"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "converted 15 rows" in result.output and "2.00 -> 1.00 MiB" in result.output
    same = runner.invoke(app, ["convert", str(tiny_store), "--out", str(tiny_store)])
    assert same.exit_code != 0 and "is the source itself" in same.output
