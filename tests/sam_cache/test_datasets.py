import numpy as np
import pytest
from PIL import Image

from conftest import shared
from sam_cache.datasets import DatasetError, open_dataset


def _png(path, value=0, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)


def test_split_folders_are_kept(tmp_path):
    for split in ("train", "val", "test"):
        for cls in ("b", "a"):
            _png(tmp_path / split / cls / f"{split}{cls}.png")
    m = open_dataset(tmp_path)
    assert m.class_names == ["a", "b"] and m.split_info == {"source": "given"}
    assert sorted(m.splits) == ["test"] * 2 + ["train"] * 2 + ["val"] * 2
    assert {r.id: r.label for r in m.records}["train/b/trainb.png"] == 1


def test_class_folders_get_a_seeded_stratified_split(sample_dir):
    a = open_dataset(sample_dir, seed=3, val_fraction=0.2, test_fraction=0.2)
    b = open_dataset(sample_dir, seed=3, val_fraction=0.2, test_fraction=0.2)
    c = open_dataset(sample_dir, seed=4, val_fraction=0.2, test_fraction=0.2)
    assert a.splits == b.splits and a.sha256() == b.sha256()
    assert a.splits != c.splits and a.sha256() != c.sha256()
    assert a.split_info == {"source": "stratified", "seed": 3, "val_fraction": 0.2, "test_fraction": 0.2}
    for split in ("train", "val", "test"):  # every class in every split
        assert set(a.labels[np.array(a.splits) == split]) == {0, 1, 2}
    assert all(name.startswith("synthetic-") for name in a.class_names)


def test_csv_manifest(tmp_path):
    for i in range(4):
        _png(tmp_path / "img" / f"{i}.png", value=i)
    (tmp_path / "m.csv").write_text("path,label,split\nimg/0.png,cat,train\nimg/1.png,dog,train\n"
                                    "img/2.png,cat,test\nimg/3.png,dog,val\n")
    m = open_dataset(tmp_path / "m.csv")
    assert m.class_names == ["cat", "dog"] and m.labels.tolist() == [0, 1, 0, 1]
    assert m.splits == ["train", "train", "test", "val"]
    assert m.read(2)[0].max() == 2


def test_csv_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "m.csv").write_text("file,class\nx.png,1\n")
    with pytest.raises(DatasetError, match=r"m\.csv: needs columns 'path' and 'label'"):
        open_dataset(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("path,label\nmissing.png,1\n")
    with pytest.raises(DatasetError, match=r"m\.csv, line 2: image .*missing\.png does not exist"):
        open_dataset(tmp_path / "m.csv")


def test_npz_with_column_labels(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1)
    np.savez(tmp_path / "d.npz", **arrays)
    m = open_dataset(tmp_path / "d.npz")
    assert len(m) == 12 and m.class_names == ["0", "1", "2"]
    assert m.splits.count("val") == 3
    assert (m.read(7)[0] == arrays["val_images"][1]).all()


def test_empty_and_missing(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nothing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        open_dataset(tmp_path / "empty")


def test_real_sets_from_shared():
    busi = open_dataset(shared("busi"))
    assert len(busi) == 780 and busi.class_names == ["benign", "malignant", "normal"]
    assert np.bincount(busi.labels).tolist() == [437, 210, 133]
    isic = open_dataset(shared("isic_550"))
    assert len(isic) == 550 and isic.class_names == ["benign", "malignant"]
    bmnist = open_dataset(shared("breastmnist/breastmnist.npz"))
    assert len(bmnist) == 780 and bmnist.splits.count("test") == 156
