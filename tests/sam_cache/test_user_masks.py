"""The user's own masks (``samcache masks --from-masks``): aligned with their images, named, resumable."""

import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.samcache import app
from conftest import shared
from sam_cache import EmbeddingStore, extract_dataset
from sam_cache.errors import ConfigError
from sam_cache.user_masks import import_masks

runner = CliRunner(env={"COLUMNS": "200"})


def _dataset_of_masks(tmp_path):
    """A dataset whose images *are* real BUSI lesion masks (one cropped to 3:4, so the frame pads)."""
    masks = shared("busi_masks")
    files = sorted((masks / "benign").glob("*_mask.png"))[:2] + sorted((masks / "malignant").glob("*_mask.png"))[:2]
    data = tmp_path / "data"
    rows = ["path,label,split,mask"]
    for k, f in enumerate(files):
        im = Image.open(f).convert("L")
        if k == 1:
            im = im.crop((0, 0, 192, 256))  # 256 high, 192 wide
        cls = f.parent.name
        (data / cls).mkdir(parents=True, exist_ok=True)
        im.convert("RGB").save(data / cls / f.name)
        im.save(tmp_path / f"m{k}.png")
        rows.append(f"{cls}/{f.name},{cls},train,../m{k}.png")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    return data


def test_a_user_mask_lands_exactly_where_its_image_lands_in_the_stored_frame(tmp_path):
    data = _dataset_of_masks(tmp_path)
    store = tmp_path / "s.zarr"
    extract_dataset(data / "labels.csv", store, "tiny", image_size=64, num_workers=0, progress=False)
    r = import_masks(store, "csv:mask", progress=False)
    assert r["written"] == 4 and r["empty"] == 0
    with EmbeddingStore.open(store) as s:
        images = s.read_rows(np.arange(4), "images")
        masks = s.read_rows(np.arange(4), "masks")
        assert s.meta["masks"]["prompt"] == "file" and s.meta["masks"]["source"] == "csv:mask"
        assert tuple(s.orig_size[1]) == (256, 192)
    # the image is the mask: resized and padded by the image path, thresholded at half, it is the stored mask
    np.testing.assert_array_equal(masks[:, 0], (images[:, 0] >= 128).astype(np.uint8))
    assert masks[1, 0, :, 48:].max() == 0  # the padding of the 3:4 image holds no mask


def test_a_folder_source_missing_files_and_resume(tmp_path):
    data = _dataset_of_masks(tmp_path)
    store = tmp_path / "s.zarr"
    extract_dataset(data / "labels.csv", store, "tiny", image_size=64, num_workers=0, progress=False)
    folder = tmp_path / "masks"
    for cls in ("benign", "malignant"):
        shutil.copytree(data / cls, folder / cls)
    victim = sorted((folder / "malignant").iterdir())[0]
    victim.unlink()
    with pytest.raises(ConfigError, match=r"no mask file for 1 sample\(s\), first malignant/.* --allow-missing"):
        import_masks(store, str(folder), progress=False)
    assert not EmbeddingStore.open(store).mask_set().exists  # nothing recorded
    r = import_masks(store, str(folder), allow_missing=True, progress=False)
    assert r["written"] == 4 and r["missing"] == 1 and r["empty"] == 1
    again = runner.invoke(app, ["masks", str(store), "--from-masks", str(folder), "--allow-missing", "--no-progress"])
    assert again.exit_code == 0 and "stored 0 new masks" in again.output, again.output
    other = runner.invoke(app, ["masks", str(store), "--from-masks", "csv:mask", "--no-progress"])
    assert other.exit_code == 1 and "has masks made differently" in other.output
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "benign" / sorted(p.name for p in (folder / "benign").iterdir())[0])
    with pytest.raises(ConfigError, match=r"is 10x10, but its image .* is 256x256"):
        import_masks(store, str(folder), allow_missing=True, overwrite=True, progress=False)
