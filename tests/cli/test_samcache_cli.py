import json
import shutil

import numpy as np
import zarr
from typer.testing import CliRunner

from cli.samcache import EXIT_SKIPPED, app
from sam_cache import EmbeddingStore

runner = CliRunner(env={"COLUMNS": "200"})
SPLIT = ["--val-fraction", "0.2", "--test-fraction", "0.2"]


def test_info_json_reports_samples_shape_and_labels(tiny_store):
    result = runner.invoke(app, ["info", str(tiny_store), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["samples"] == info["done"] == 15 and info["embedding_shape"] == [256, 64, 64]
    assert sorted(info["labels"]) == [0] * 5 + [1] * 5 + [2] * 5
    assert info["class_names"] == ["synthetic-irregular", "synthetic-normal", "synthetic-smooth"]
    assert sum(info["label_counts"]["test"].values()) == 3


def test_info_table(tiny_store):
    result = runner.invoke(app, ["info", str(tiny_store)])
    assert result.exit_code == 0 and "15 of 15 done, 256x64x64 float16" in result.output


def test_verify_finds_a_damaged_row(tiny_store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    assert runner.invoke(app, ["verify", str(copy)]).exit_code == 0
    with EmbeddingStore.open(copy, mode="r+") as s:
        row = s.read_embeddings(3, 4)
        row[0, 7, 1, 1] = np.nan
        zarr.open_group(str(copy))["embeddings"][3:4] = row  # behind the store's back
        bad_id = s.ids[3]
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1
    assert f"shard 0 (rows 0-15), embeddings/c/0/0/0/0: non-finite values: samples 3 ({bad_id})" in result.output
    # written behind the store's back, the row no longer matches its checksum either
    assert f"embeddings/c/0/0/0/0: bytes that do not match their checksum (corrupted): samples 3 ({bad_id})" \
        in result.output


def test_extract_exit_status_says_something_was_skipped_and_a_file_gets_progress_lines(sample_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    (data / "synthetic-normal" / "broken.png").write_text("this is not a png")
    result = runner.invoke(app, ["extract", "--dataset", str(data), "--out", str(tmp_path / "s.zarr"), "--encoder",
                                 "tiny", "--image-size", "0", "--workers", "0", "--val-fraction",
                                 "0.2", "--test-fraction", "0.2"])
    assert result.exit_code == EXIT_SKIPPED
    assert "skipped 1 image(s)" in result.output and "broken.png" in result.output
    # the output is not a terminal: plain progress lines, from the start to the end
    assert "extract tiny: 0/16\n" in result.output and "extract tiny: 16/16 (100 %), " in result.output


def test_mismatch_is_one_clear_message(sample_dir, tiny_store):
    result = runner.invoke(app, ["extract", "--dataset", str(sample_dir), "--out", str(tiny_store), "--encoder",
                                 "tiny", "--image-size", "32", "--workers", "0", "--no-progress", *SPLIT])
    assert result.exit_code == 1
    assert "will not be mixed" in result.output and "image_size: store has 64, this run asks for 32" in result.output
    assert "Traceback" not in result.output


def test_missing_checkpoint_is_one_clear_message(sample_dir, tmp_path):
    result = runner.invoke(app, ["extract", "--dataset", str(sample_dir), "--out", str(tmp_path / "x.zarr"),
                                 "--encoder", "vit_b", "--checkpoint", str(tmp_path / "sam_vit_b.pth"), *SPLIT])
    assert result.exit_code == 1 and "sam_vit_b.pth does not exist" in result.output
    assert not (tmp_path / "x.zarr").exists()


def test_both_commands_give_the_installed_version_and_stores_record_it(tiny_store):
    import subprocess
    import sys
    from importlib.metadata import version

    from conftest import ROOT
    from sam_cache import EmbeddingStore

    for module, name in (("cli.samcache", "samcache"), ("cli.slca_train", "slca-train")):
        r = subprocess.run([sys.executable, "-m", module, "--version"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip() == f"{name} {version('samcache')}", r.stdout + r.stderr
    assert EmbeddingStore.open(tiny_store).meta["package_version"] == version("samcache")
