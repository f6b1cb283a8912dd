import numpy as np
import pytest
import torch
from PIL import Image

from sam_cache.preprocess import (
    ImageDecodeError,
    Preprocessing,
    load_frame,
    normalize_frames,
    read_image,
    resized_shape,
    to_rgb_uint8,
    valid_grid,
    window_to_uint8,
)


def test_grey_is_repeated_to_three_channels(tmp_path):
    grey = (np.arange(20 * 30) % 256).astype(np.uint8).reshape(20, 30)
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgb, window = to_rgb_uint8(read_image(tmp_path / "g.png")[0])
    assert rgb.shape == (20, 30, 3) and window is None
    assert (rgb[..., 0] == grey).all() and (rgb[..., 2] == grey).all()


def test_rgba_drops_alpha(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 255, (8, 9, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb, _ = to_rgb_uint8(read_image(tmp_path / "a.png")[0])
    assert (rgb == rgba[..., :3]).all()


def test_16bit_png_is_windowed_on_purpose(tmp_path):
    deep = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    array, dicom = read_image(tmp_path / "d.png")
    assert array.dtype != np.uint8  # the decoder kept the depth; windowing is our step
    rgb, window = to_rgb_uint8(array, "auto", dicom)
    assert window == (1000.0, 3000.0)
    assert rgb.min() == 0 and rgb.max() == 255
    fixed, window = to_rgb_uint8(array, "0,4000", dicom)
    assert window == (0.0, 4000.0)
    assert fixed.max() == window_to_uint8(np.array([3000.0]), (0, 4000))[0]


def test_dicom_uses_its_window(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    pixels = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 4
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.WindowCenter, ds.WindowWidth = 2000, 1000
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    array, dicom_window = read_image(tmp_path / "x.dcm")
    rgb, window = to_rgb_uint8(array, "auto", dicom_window)
    assert window == (1500.0, 2500.0)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255


def test_truncated_and_fake_images_raise(tmp_path):
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("cut.png", "text.png"):
        with pytest.raises(ImageDecodeError):
            read_image(tmp_path / name)


def test_bad_window_is_refused():
    with pytest.raises(ValueError, match="HI must be greater"):
        Preprocessing(1024, (0, 0, 0), (1, 1, 1), window="5,1")


def test_frame_geometry_matches_segment_anything():
    from segment_anything.utils.transforms import ResizeLongestSide

    for h, w in [(300, 500), (1024, 1024), (77, 31)]:
        assert resized_shape(h, w, 1024) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)
    rgb = np.full((300, 500, 3), 200, np.uint8)
    frame, size = load_frame(rgb, 1024)
    assert frame.shape == (3, 1024, 1024) and size == (614, 1024)
    assert frame[:, 614:].max() == 0 and frame[:, :614].min() == 200
    assert valid_grid(*size, 1024) == (39, 64)


def test_normalize_pads_with_zero_after_normalizing():
    pre = Preprocessing(8, (10.0, 20.0, 30.0), (2.0, 4.0, 5.0))
    frames = torch.full((1, 3, 8, 8), 40, dtype=torch.uint8)
    x = normalize_frames(frames, torch.tensor([[5, 6]]), pre)
    assert torch.allclose(x[0, :, :5, :6], torch.tensor([15.0, 5.0, 2.0]).view(3, 1, 1).expand(3, 5, 6))
    assert (x[0, :, 5:, :] == 0).all() and (x[0, :, :, 6:] == 0).all()


def test_minmax_intensity_stretches_inside_the_image_only():
    pre = Preprocessing(8, (0.0, 0.0, 0.0), (255.0, 255.0, 255.0), intensity="minmax")
    frames = torch.zeros((2, 3, 8, 8), dtype=torch.uint8)
    frames[0, :, :4, :6] = torch.arange(50, 74).view(4, 6).to(torch.uint8)  # 50..73, padding 0
    frames[1, :, :8, :8] = 7  # flat image: no division by zero
    x = normalize_frames(frames, torch.tensor([[4, 6], [8, 8]]), pre)
    assert x[0, :, :4, :6].min() == 0 and x[0, :, :4, :6].max() == pytest.approx(1.0)
    assert (x[0, :, 4:] == 0).all() and torch.isfinite(x).all() and (x[1] == 0).all()


def test_bad_intensity_is_refused_and_the_version_is_signed():
    with pytest.raises(ValueError, match="intensity"):
        Preprocessing(8, (0, 0, 0), (1, 1, 1), intensity="zscore")
    d = Preprocessing(8, (0, 0, 0), (1, 1, 1)).to_dict()
    assert d["intensity"] == "fixed" and d["version"] >= 2


def test_dicom_luts_are_pydicom_s_and_monochrome1_is_inverted_after_the_window(tmp_path):
    pytest.importorskip("pydicom", reason="DICOM support is the optional extra samcache[dicom]")
    from pydicom import dcmread
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from test_datasets import _dicom

    pixels = (np.arange(32 * 32).reshape(32, 32) * 3).astype(np.uint16)
    tags = dict(RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=500, WindowWidth=1200)
    _dicom(tmp_path / "m2.dcm", pixels, **tags)
    _dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1", **tags)
    grey, window = read_image(tmp_path / "m2.dcm")
    ds = dcmread(tmp_path / "m2.dcm")
    ref = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    lo, hi = apply_voi_lut(np.array([-1e12, 1e12]), ds)
    assert window == (-100.0, 1100.0)
    assert (grey == window_to_uint8(ref, (lo, hi))).all()
    inverted, _ = read_image(tmp_path / "m1.dcm")
    assert (inverted == 255 - grey).all()  # the window first, then the inversion
    fixed, w = read_image(tmp_path / "m2.dcm", window="0,2000")  # a window on modality values (HU-like)
    assert w == (0.0, 2000.0) and (fixed == window_to_uint8(apply_modality_lut(ds.pixel_array, ds), w)).all()


def test_unusual_images_are_decode_errors_not_crashes(tmp_path):
    from sam_cache.preprocess import MAX_PIXELS, load_frame

    Image.fromarray(np.zeros((1, 4000), np.uint8)).save(tmp_path / "strip.png")
    rgb, _ = to_rgb_uint8(read_image(tmp_path / "strip.png")[0])
    frame, size = load_frame(rgb, 256)
    assert size == (1, 256) and frame.shape == (3, 256, 256)
    side = int(MAX_PIXELS ** 0.5) + 1
    Image.new("L", (side, side)).save(tmp_path / "huge.png")
    with pytest.raises(ImageDecodeError, match="larger than the limit"):
        read_image(tmp_path / "huge.png")
