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
        assert np.array_equal(d.read_images(0, len(d)), s.read_images(0, len(s)))
        a = s.read_embeddings(0, len(s)).astype(np.float32)
        b = d.read_embeddings(0, len(d)).astype(np.float32)
        peak = np.abs(a).max(axis=(2, 3), keepdims=True)  # per sample and channel
        assert np.all(np.abs(a - b) <= tol * peak + 1e-6)
        assert not np.array_equal(a, b)  # it really was re-encoded
    assert verify_store(dst) == []


def test_convert_resumes_and_refuses_a_foreign_destination(tiny_store, tmp_path):
    dst = tmp_path / "q.zarr"
    convert_store(tiny_store, dst, "int8", progress=False)
    import zarr

    zarr.open_array(str(dst / "done"), mode="r+")[-4:] = False  # as if killed before the last rows were marked
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


def test_a_compact_grid_is_a_quarter_of_the_bytes_and_extraction_gives_the_same_rows(sample_dir, tiny_store, tmp_path):
    import torch.nn.functional as F

    from conftest import SPLIT_ARGS
    from sam_cache import extract_dataset

    r = convert_store(tiny_store, tmp_path / "g.zarr", grid=32, progress=False)
    assert r["dst_bytes"] == 256 * 32 * 32 * 2 == r["src_bytes"] // 4
    extract_dataset(sample_dir, tmp_path / "x.zarr", "tiny", image_size=64, batch_size=4, num_workers=0,
                    progress=False, grid=32, **SPLIT_ARGS)
    with EmbeddingStore.open(tiny_store) as full, EmbeddingStore.open(tmp_path / "g.zarr") as g, \
            EmbeddingStore.open(tmp_path / "x.zarr") as x:
        assert g.embed_shape == x.embed_shape == (256, 32, 32) and g.signature["grid"] == 32
        pooled = F.avg_pool2d(__import__("torch").from_numpy(full.read_rows(np.arange(15)).astype(np.float32)), 2).numpy()
        assert np.abs(g.read_rows(np.arange(15)) - pooled).max() <= 2e-3 * np.abs(pooled).max()
        # pooled on the device from float32, or from the float16 store: equal to float16 rounding
        assert np.abs(x.read_rows(np.arange(15)) - g.read_rows(np.arange(15))).max() <= 4e-3 * np.abs(pooled).max()
    with pytest.raises(Exception, match="finer"):
        convert_store(tmp_path / "g.zarr", tmp_path / "h.zarr", grid=64, progress=False)


def test_training_reads_a_compact_store(tiny_store, tmp_path):
    from trainer import TrainConfig, train

    convert_store(tiny_store, tmp_path / "g.zarr", grid=32, progress=False)
    for extra in ({"slca": True}, {"slca": False, "fuse": "meanstd"}):
        result = train(TrainConfig.from_dict({"cache": str(tmp_path / "g.zarr"), "out": str(tmp_path / str(len(extra))),
                                              "epochs": 1, "batch_size": 4, "img_size": 32, "device": "cpu", **extra}),
                       log=lambda s: None)
        assert result["test"]["n"] == 3
