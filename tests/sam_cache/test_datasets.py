import numpy as np
import pytest
from PIL import Image

from conftest import shared
from sam_cache.readers import DatasetError, DatasetOptions, open_dataset


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
    with pytest.raises(DatasetError, match=r"m\.csv: needs the column\(s\) 'path', 'label'"):
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


def _csv(tmp_path, text, n=6):
    for i in range(n):
        _png(tmp_path / "images" / f"{i}.png", value=i)
    (tmp_path / "m.csv").write_bytes(text.encode("utf-8"))
    return tmp_path / "m.csv"


def test_numeric_labels_are_one_class_whatever_their_spelling(tmp_path):
    rows = "".join(f"images/{i}.png,{lab},{sp}\n" for i, (lab, sp) in
                   enumerate([("1", "train"), ("1.0", "train"), ("0", "train"), ("0.0", "val"), ("1", "test"), ("0", "test")]))
    m = open_dataset(_csv(tmp_path, "path,label,split\n" + rows))
    assert m.class_names == ["0", "1"] and m.labels.tolist() == [1, 1, 0, 0, 1, 0]
    mixed = "path,label\nimages/0.png,1\nimages/1.png,1.0\nimages/2.png,one\n"
    with pytest.raises(DatasetError, match=r"m\.csv: labels mix numbers \(1, 1\.0\) and words \(one\)"):
        open_dataset(_csv(tmp_path, mixed))


def test_one_image_listed_twice_is_refused_by_name(tmp_path):
    text = "path,label\n./images/0.png,a\nimages/0.png,b\nimages/1.png,a\n"
    with pytest.raises(DatasetError, match=r"'images/0\.png' appears twice|same file"):
        open_dataset(_csv(tmp_path, text))


def test_csv_with_a_bom_empty_cells_and_short_rows(tmp_path):
    ok = "\ufeffpath,label\n" + "".join(f"images/{i}.png,{'ab'[i % 2]}\n" for i in range(6))
    assert len(open_dataset(_csv(tmp_path, ok), val_fraction=0.2, test_fraction=0.34)) == 6
    with pytest.raises(DatasetError, match=r"m\.csv, line 3: the 'label' cell is empty"):
        open_dataset(_csv(tmp_path, "path,label\nimages/0.png,a\nimages/1.png,\n"))
    with pytest.raises(DatasetError, match=r"m\.csv, line 3: the row has 1 cells where the header has 2"):
        open_dataset(_csv(tmp_path, "path,label\nimages/0.png,a\nimages/1.png\n"))


def test_csv_columns_are_chosen_by_options(tmp_path):
    text = "file,diagnosis,fold\n" + "".join(f"images/{i}.png,{'xy'[i % 2]},{['train', 'val', 'test'][i % 3]}\n"
                                               for i in range(6))
    m = open_dataset(_csv(tmp_path, text), options=DatasetOptions(path_column="file", label_column="diagnosis",
                                                                  split_column="fold"))
    assert m.class_names == ["x", "y"] and m.splits[:3] == ["train", "val", "test"]


def _npz(tmp_path, labels, **extra):
    n = len(labels)
    np.savez(tmp_path / "d.npz", train_images=np.zeros((n, 8, 8), np.uint8), train_labels=labels,
             test_images=np.zeros((2, 8, 8), np.uint8), test_labels=np.array([0, 1]), **extra)
    return tmp_path / "d.npz"


def test_npz_labels_must_be_single_integer_classes(tmp_path):
    with pytest.raises(DatasetError, match=r"d\.npz: train_labels holds non-integer values \(0\.5"):
        open_dataset(_npz(tmp_path, np.array([0.5, 1.0, 0.0, 1.0])))
    assert open_dataset(_npz(tmp_path, np.array([0.0, 1.0, 0.0, 1.0]))).class_names == ["0", "1"]
    with pytest.raises(DatasetError, match=r"d\.npz: train_labels holds text"):
        open_dataset(_npz(tmp_path, np.array(["a", "b", "a", "b"])))
    with pytest.raises(DatasetError, match=r"d\.npz: train_labels has shape \(4, 14\): multi-label data"):
        open_dataset(_npz(tmp_path, np.zeros((4, 14), np.int64)))


def test_npz_class_names_name_the_classes(tmp_path):
    m = open_dataset(_npz(tmp_path, np.array([0, 1, 0, 1]), class_names=np.array(["malignant", "benign"])))
    assert m.class_names == ["malignant", "benign"]
    assert [m.class_names[r.label] for r in m.records][:2] == ["malignant", "benign"]


def test_a_small_dataset_keeps_every_class_in_val_and_test(tmp_path):
    for c in ("a", "b", "c"):
        for i in range(4):
            _png(tmp_path / c / f"{i}.png", value=i)
    m = open_dataset(tmp_path)  # 12 images, 3 classes, the default fractions
    for split in ("train", "val", "test"):
        assert set(m.labels[np.array(m.splits) == split]) == {0, 1, 2}
    _png(tmp_path / "d" / "0.png")
    _png(tmp_path / "d" / "1.png")
    with pytest.raises(DatasetError, match=r"fewer than 3 images.*--val-fraction 0"):
        open_dataset(tmp_path)


def test_train_and_test_folders_without_val_get_a_recorded_val(tmp_path):
    for split, n in (("Training", 10), ("Testing", 4)):
        for c in ("x", "y"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png", value=i)
    m = open_dataset(tmp_path, seed=1, val_fraction=0.2)
    assert m.split_info == {"source": "given", "val": "drawn from train", "seed": 1, "val_fraction": 0.2}
    val = np.array(m.splits) == "val"
    assert set(m.labels[val]) == {0, 1} and m.splits.count("test") == 8 and 4 <= val.sum() <= 8
    assert all(r.id.startswith("Training/") for r in m.records if r.split == "val")


def test_unlabelled_images_are_read_for_prediction_only(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", value=i)
    with pytest.raises(DatasetError, match="have no labels"):
        open_dataset(tmp_path)
    m = open_dataset(tmp_path, options=DatasetOptions(require_labels=False))
    assert m.class_names == [] and m.labels.tolist() == [-1, -1, -1] and set(m.splits) == {"test"}


def test_nifti_volumes_become_slices(tmp_path):
    nibabel = pytest.importorskip("nibabel", reason="NIfTI support is the optional extra samcache[nifti]")
    vol = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    for c in ("a", "b"):
        for i in range(3):
            (tmp_path / c).mkdir(parents=True, exist_ok=True)
            nibabel.save(nibabel.Nifti1Image(vol + i, np.eye(4)), str(tmp_path / c / f"v{i}.nii.gz"))
    m = open_dataset(tmp_path, options=DatasetOptions(nifti_slices="every:2"), val_fraction=0.2, test_fraction=0.2)
    assert len(m) == 6 * 2 and m.records[0].id == "a/v0.nii.gz#z0000" and m.records[1].id == "a/v0.nii.gz#z0002"
    slice2 = m.read(1)[0]
    assert slice2.shape == (6, 5) and (slice2 == vol[:, :, 2]).all()
    middle = open_dataset(tmp_path, options=DatasetOptions(nifti_slices="middle"), val_fraction=0.2, test_fraction=0.2)
    assert {r.id.split("#")[1] for r in middle.records} == {"z0002"}


def test_nifti_slices_of_one_volume_share_a_split_and_volumes_are_reoriented(tmp_path):
    nibabel = pytest.importorskip("nibabel", reason="NIfTI support is the optional extra samcache[nifti]")
    vol = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(6):
            nibabel.save(nibabel.Nifti1Image(vol + i, np.eye(4)), str(tmp_path / c / f"v{i}.nii.gz"))
    m = open_dataset(tmp_path, val_fraction=0.2, test_fraction=0.2)
    split_of = {}
    for r in m.records:
        split_of.setdefault(r.file, set()).add(r.split)
    assert all(len(s) == 1 for s in split_of.values()) and set().union(*split_of.values()) == {"train", "val", "test"}
    assert m.split_info["groups"].startswith("file") and m.split_info["nifti_orientation"].startswith("RAS")
    # a volume stored left-right flipped (x axis pointing left, LPS-like) is read in RAS: slices match the RAS one
    flipped = tmp_path / "flipped"
    (flipped / "train" / "a").mkdir(parents=True)
    (flipped / "test" / "a").mkdir(parents=True)
    nibabel.save(nibabel.Nifti1Image(vol[::-1].copy(), np.diag([-1.0, 1, 1, 1])),
                 str(flipped / "train" / "a" / "f.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(vol, np.eye(4)), str(flipped / "test" / "a" / "r.nii.gz"))
    two = open_dataset(flipped, options=DatasetOptions(nifti_slices="middle"), val_fraction=0.0)
    assert [r.split for r in two.records] == ["test", "train"]
    r, f = (two.read(k)[0] for k in range(2))
    assert np.array_equal(f, r) and np.array_equal(r, vol[:, :, 3])


def _dicom(path, pixels, photometric="MONOCHROME2", frames=1, bits=16, **tags):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _multi_frame_folder(root, files_per_class: int, frames: int, side: int) -> None:
    """Classes a and b, each with multi-frame DICOM files whose frame k is all 100 * (k + 1)."""
    pytest.importorskip("pydicom", reason="DICOM support is the optional extra samcache[dicom]")
    pixels = np.stack([np.full((side, side), 100 * (k + 1)) for k in range(frames)])
    for c in ("a", "b"):
        for i in range(files_per_class):
            _dicom(root / c / f"{i}.dcm", pixels, frames=frames)


def test_multi_frame_dicom_gives_one_sample_per_frame(tmp_path):
    _multi_frame_folder(tmp_path, 3, 3, 16)
    m = open_dataset(tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert len(m) == 18 and m.records[1].id == "a/0.dcm#f0001"
    from sam_cache.preprocess import window_to_uint8

    grey, window = m.read(1, "0,400")
    assert grey.dtype == np.uint8 and window == (0.0, 400.0)
    assert grey[0, 0] == window_to_uint8(np.array([200.0]), (0.0, 400.0))[0]  # the second frame's value


def test_frames_of_one_dicom_never_cross_splits(tmp_path):
    _multi_frame_folder(tmp_path, 6, 4, 8)
    for seed in range(3):
        m = open_dataset(tmp_path, seed=seed, val_fraction=0.2, test_fraction=0.2)
        split_of = {}
        for r in m.records:
            split_of.setdefault(r.file, set()).add(r.split)
        assert len(split_of) == 12 and all(len(s) == 1 for s in split_of.values())
        assert {"train", "test"} <= set(m.splits)


def test_an_8_bit_dicom_without_a_window_is_kept_as_it_is(tmp_path):
    pytest.importorskip("pydicom", reason="DICOM support is the optional extra samcache[dicom]")
    from sam_cache.preprocess import read_image

    pixels = np.tile(np.arange(1, 255, 16, dtype=np.uint8), (16, 1))[:, :16]
    _dicom(tmp_path / "e.dcm", pixels, bits=8)
    grey, window = read_image(tmp_path / "e.dcm")
    assert window is None and np.array_equal(np.asarray(grey)[..., 0] if np.asarray(grey).ndim == 3 else grey, pixels)
    _dicom(tmp_path / "w.dcm", pixels, bits=8, WindowCenter=128, WindowWidth=64)  # a window in the file: applied
    assert read_image(tmp_path / "w.dcm")[1] == (96.0, 160.0)


def _grouped_csv(tmp_path, n_patients=30, per_patient=3, split=None):
    """``n_patients`` patients with ``per_patient`` images each, the class a property of the patient."""
    rows = ["path,label,case" + (",fold" if split else "")]
    for p in range(n_patients):
        for k in range(per_patient):
            f = tmp_path / "images" / f"{p}-{k}.png"
            _png(f, value=p)
            rows.append(f"images/{p}-{k}.png,{'ab'[p % 3 == 0]},{p}" + (f",{split(p, k)}" if split else ""))
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.csv"


def _patients_per_split(m):
    where = {}
    for r in m.records:
        where.setdefault(r.id.split("/")[1].split("-")[0], set()).add(r.split)
    return where


def test_group_column_keeps_every_patient_in_one_drawn_split(tmp_path):
    csv_path = _grouped_csv(tmp_path)
    m = open_dataset(csv_path, seed=1, options=DatasetOptions(group_column="case"))
    where = _patients_per_split(m)
    assert all(len(s) == 1 for s in where.values()), {p: s for p, s in where.items() if len(s) > 1}
    assert {s for v in where.values() for s in v} == {"train", "val", "test"}
    assert m.split_info["group_column"] == "case"
    for split in ("train", "val", "test"):  # stratified: both classes in every split
        assert set(m.labels[np.array(m.splits) == split]) == {0, 1}
    # the same draw without groups splits patients across splits: the test above can fail
    plain = _patients_per_split(open_dataset(csv_path, seed=1))
    assert any(len(s) > 1 for s in plain.values())
    # reproducible from the seed, different with another
    again = open_dataset(csv_path, seed=1, options=DatasetOptions(group_column="case"))
    other = open_dataset(csv_path, seed=2, options=DatasetOptions(group_column="case"))
    assert again.splits == m.splits and other.splits != m.splits


def test_group_column_draws_val_from_a_given_train_split_by_patient(tmp_path):
    csv_path = _grouped_csv(tmp_path, split=lambda p, k: "test" if p < 6 else "train")
    m = open_dataset(csv_path, val_fraction=0.2, options=DatasetOptions(group_column="case", split_column="fold"))
    where = _patients_per_split(m)
    assert all(len(s) == 1 for s in where.values())
    assert all(where[str(p)] == {"test"} for p in range(6))  # the file's test split is honoured
    assert any(s == {"val"} for s in where.values())


def test_a_split_column_that_puts_one_patient_in_two_splits_is_refused(tmp_path):
    csv_path = _grouped_csv(tmp_path, split=lambda p, k: "test" if (p, k) == (4, 2) else "train")
    with pytest.raises(DatasetError, match=r"case '4' is in two splits \('images/4-0\.png' in train, "
                                           r"'images/4-2\.png' in test\)"):
        open_dataset(csv_path, options=DatasetOptions(group_column="case", split_column="fold"))
    with pytest.raises(DatasetError, match=r"needs the column\(s\) 'patient'"):
        open_dataset(csv_path, options=DatasetOptions(group_column="patient"))
    with pytest.raises(DatasetError, match="--group-column needs a CSV dataset"):
        open_dataset(tmp_path / "images", options=DatasetOptions(group_column="case"))


def test_datasets_that_would_change_meaning_silently_are_refused(tmp_path):
    """Issue 21.9: an empty class folder vanished; a hidden folder became a class; duplicate class names merged."""
    for cls in ("a", "b"):
        for i in range(3):
            _png(tmp_path / "flat" / cls / f"{i}.png")
    (tmp_path / "flat" / "c").mkdir()
    (tmp_path / "flat" / "c" / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(DatasetError, match=r"class folder c holds no image that samcache reads \(only \.gif files\)"):
        open_dataset(tmp_path / "flat")
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(3):
                _png(tmp_path / "split" / split / cls / f"{i}.png")
    for i in range(4):
        _png(tmp_path / "split" / "train" / ".ipynb_checkpoints" / f"{i}.png")
    m = open_dataset(tmp_path / "split")
    assert m.class_names == ["a", "b"] and len(m) == 12
    np.savez(tmp_path / "d.npz", train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.array([0, 1, 2]),
             class_names=np.array(["benign", "benign", "malignant"]))
    with pytest.raises(DatasetError, match=r"class_names names 'benign' more than once"):
        open_dataset(tmp_path / "d.npz")
    np.savez(tmp_path / "o.npz", train_images=np.array([np.zeros((8, 8)), np.zeros((4, 4))], dtype=object),
             train_labels=np.array([0, 1]), allow_pickle=True)
    with pytest.raises(DatasetError, match="train_images holds Python objects"):
        open_dataset(tmp_path / "o.npz")


def test_the_manifest_hash_does_not_depend_on_how_the_path_is_written(sample_dir, monkeypatch):
    """Issue 21.13: a rerun with the dataset as an absolute path was told to --overwrite its done rows."""
    a = open_dataset(sample_dir, seed=3)
    monkeypatch.chdir(sample_dir.parent)
    b = open_dataset(sample_dir.name, seed=3)
    c = open_dataset(f"./{sample_dir.name}/", seed=3)
    assert a.sha256() == b.sha256() == c.sha256()
    assert a.legacy_sha256() != b.legacy_sha256()  # what 0.2.0 recorded depended on the spelling


def test_exif_orientation_is_applied_as_viewers_do(tmp_path):
    """Issue 21.9: a JPEG with Orientation=6 was stored rotated."""
    from sam_cache.preprocess import read_image

    im = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8)[None, :], (20, 1)))  # 20 x 40, wide
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    im.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    array, _ = read_image(tmp_path / "r.jpg")
    assert array.shape[:2] == (40, 20)  # upright: tall
