"""Decoding and the SAM frame: how an image file becomes an encoder input.

The SAM frame (segment-anything's ``ResizeLongestSide`` + ``Sam.preprocess``):

1. decode to an ``HxWx3`` uint8 RGB array; grey images are repeated to three channels, an alpha
   channel is dropped;
2. images deeper than 8 bits (16-bit PNG/TIFF, DICOM, float arrays) are *windowed* to 8 bits on
   purpose: the window ``(lo, hi)`` is chosen by :class:`Preprocessing.window` and returned so
   that the store can record it per sample;
3. resize the longest side to the encoder's input size with PIL's bilinear filter (exactly what
   ``ResizeLongestSide.apply_image`` does);
4. with ``intensity="minmax"`` (``medsam``, ``litemedsam``), stretch each resized image from its
   own minimum..maximum over all three channels to the full 0..255 range, as MedSAM's and
   LiteMedSAM's reference inference scripts do (``(x - x.min()) / clip(x.max() - x.min(), 1e-8)``
   on the resized image); ``"fixed"`` (SAM ViTs) keeps the decoded values;
5. normalize with the encoder's pixel mean and std, then zero-pad at the bottom and right to a
   square of the input size.

Steps 1-3 run in DataLoader workers on uint8 data (:func:`load_frame`); steps 4-5 run on the device
(:func:`normalize_frames`), so host-to-device copies move uint8, a quarter of float32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, SamcacheError

__all__ = [
    "Preprocessing",
    "ImageDecodeError",
    "read_image",
    "window_to_uint8",
    "resized_shape",
    "resize_longest_side",
    "pad_to_square",
    "load_frame",
    "normalize_frames",
    "valid_grid",
]

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
UNIT_SCALE_MEAN = (0.0, 0.0, 0.0)
UNIT_SCALE_STD = (255.0, 255.0, 255.0)

# Raised whenever the same Preprocessing fields would give a different encoder input, so that a
# store written by an older samcache is refused instead of silently mixed. 2: the intensity field.
PREPROCESSING_VERSION = 2
INTENSITIES = ("fixed", "minmax")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
# Larger images are skipped as unreadable: 100 megapixels (a 10000x10000 scan) is about 300 MB of RGB
# before resizing, per decoding worker. PIL's own bomb check, which we replace, stops at 179 megapixels.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = None  # our limit above applies instead, and names the file


class ImageDecodeError(SamcacheError):
    """An image file could not be decoded: corrupt, truncated or of an unsupported kind."""


@dataclass(frozen=True)
class Preprocessing:
    """Everything that decides the encoder input for a given image. Part of a store's signature.

    Arguments:
      input_size (int): the square side the encoder takes (1024 for SAM, 256 for LiteMedSAM).
      pixel_mean (tuple): per-channel mean subtracted from 0..255 pixel values.
      pixel_std (tuple): per-channel divisor applied after the mean.
      window (str): how images deeper than 8 bits reach 8 bits. ``"auto"``: the DICOM
        WindowCenter/WindowWidth when the file has them, else the image's own min..max;
        ``"minmax"``: always the image's min..max; ``"LO,HI"``: a fixed window, e.g. ``"0,4095"``.
        8-bit images are never windowed.
      intensity (str): ``"fixed"``: pixel values as decoded; ``"minmax"``: each resized image
        stretched from its own min..max to 0..255 before the mean and std (MedSAM's reference).
    """

    input_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    window: str = "auto"
    intensity: str = "fixed"

    def __post_init__(self) -> None:
        parse_window(self.window)  # refuse a bad window early, not in a worker
        if self.intensity not in INTENSITIES:
            raise ConfigError(f"intensity must be one of {INTENSITIES}, got {self.intensity!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pixel_mean"] = [float(v) for v in self.pixel_mean]
        d["pixel_std"] = [float(v) for v in self.pixel_std]
        d["resize"] = "longest_side_pil_bilinear"
        d["pad"] = "bottom_right_zero_after_normalize"
        d["version"] = PREPROCESSING_VERSION
        return d


def parse_window(window: str) -> tuple[float, float] | str:
    """Return ``"auto"``, ``"minmax"`` or a ``(lo, hi)`` pair; refuse anything else."""
    if window in ("auto", "minmax"):
        return window
    try:
        lo, hi = (float(v) for v in window.split(","))
    except ValueError:
        raise ConfigError(f"--window must be 'auto', 'minmax' or 'LO,HI', got {window!r}") from None
    if not hi > lo:
        raise ConfigError(f"--window {window!r}: HI must be greater than LO")
    return lo, hi


def window_to_uint8(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto 0..255 (clipping outside) and return uint8."""
    lo, hi = window
    scaled = (array.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _choose_window(array: np.ndarray, window: str, dicom_window: tuple[float, float] | None):
    parsed = parse_window(window)
    if isinstance(parsed, tuple):
        return parsed
    if parsed == "auto" and dicom_window is not None:
        return dicom_window
    finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
    if finite.size == 0:
        raise ImageDecodeError("image has no finite pixel values")
    return float(finite.min()), float(finite.max())


def _read_dicom(path: Path, window: str = "auto", frame: int | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A DICOM frame as 8-bit grey, windowed the way DICOM says, with pydicom's own LUT functions.

    The Modality LUT (or rescale slope and intercept) is applied with ``apply_modality_lut``. Then
    ``window``: ``auto`` applies the file's VOI LUT (a LUT sequence, or WindowCenter/WindowWidth
    with its VOI LUT function) with ``apply_voi_lut`` and maps its output range onto 0..255; an
    8-bit file without one (modality values within 0..255) is kept as it is, as 8-bit images always
    are (no window recorded); a deeper file without one, and ``minmax``, use the frame's own min..max; ``LO,HI`` a fixed window on the
    modality values. MONOCHROME1 (inverted grey) is inverted *after* the window, as the standard
    says. Returns ``(uint8 HxW, (lo, hi) applied in modality units)``.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pragma: no cover - depends on the optional extra
        raise ImageDecodeError("reading DICOM needs pydicom: pip install 'samcache[dicom]'") from None
    try:
        ds = pydicom.dcmread(str(path))
        raw = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad files
        raise ImageDecodeError(f"not a readable DICOM file: {exc}") from exc
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        if frame is None:
            raise ImageDecodeError(f"has {frames} frames; read it through a dataset, which makes one sample per frame")
        raw = raw[frame]
    if raw.ndim != 2:
        raise ImageDecodeError(f"DICOM pixel data of shape {raw.shape} is not one grey frame")
    values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    eight_bit = int(getattr(ds, "BitsStored", 16) or 16) <= 8 and values.min() >= 0 and values.max() <= 255
    if window == "auto" and not has_voi and eight_bit:  # an 8-bit image without a window: as it is, like a PNG
        grey, applied = values.astype(np.uint8), None
    elif window == "auto" and has_voi:
        out = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        ends = np.asarray(apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0), dtype=np.float64)
        grey = window_to_uint8(out, (float(ends.min()), float(ends.max())))
        applied = _voi_window(ds)
    else:
        applied = _choose_window(values, "minmax" if window == "auto" else window, None)
        grey = window_to_uint8(values, applied)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        grey = 255 - grey  # inverted grey: invert after the window
    return grey, applied


def _voi_window(ds) -> tuple[float, float] | None:
    """The first linear VOI window as (lo, hi), for the store's record; None for a LUT sequence."""
    import pydicom

    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = ds.WindowCenter, ds.WindowWidth
    center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
    width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    return center - width / 2.0, center + width / 2.0


def dicom_frames(path: str | Path) -> int:
    """How many frames a DICOM file holds (its header only is read); 1 when it cannot tell."""
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        return int(getattr(ds, "NumberOfFrames", 1) or 1)
    except Exception:  # an unreadable file is reported when its pixels are read
        return 1


def read_image(path: str | Path, window: str = "auto", frame: int | None = None
               ) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Decode an image file to an array.

    Arguments:
      path: a PNG, JPEG, BMP, TIFF or DICOM (``.dcm``) file.
      window: how a DICOM file reaches 8 bits (see :class:`Preprocessing`); other files keep
        their bit depth and are windowed by :func:`to_rgb_uint8`.
      frame: the frame of a multi-frame DICOM.

    Returns:
      ``(array, dicom_window)``: the array is ``HxW`` or ``HxWxC``, in the file's own dtype, or
      uint8 for DICOM; ``dicom_window`` is the (lo, hi) that windowed a DICOM file, or None.

    Raises:
      ImageDecodeError: the file is corrupt, truncated, empty, larger than :data:`MAX_PIXELS`,
        or not an image.
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return _read_dicom(path, window, frame)
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageDecodeError(f"image of {im.width}x{im.height} pixels is larger than the limit of "
                                       f"{MAX_PIXELS:,} pixels")
            im.load()  # force a full decode so that truncation is caught here
            im = ImageOps.exif_transpose(im)  # EXIF Orientation, as every viewer applies it
            if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
            array = np.asarray(im)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    return array, None


def to_rgb_uint8(
    array: np.ndarray, window: str = "auto", dicom_window: tuple[float, float] | None = None
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Bring a decoded array to ``HxWx3`` uint8 RGB, windowing deep images on purpose.

    Returns ``(rgb, applied_window)``; ``applied_window`` is None for 8-bit input.

    Raises:
      ImageDecodeError: the array is not 2-D grey or ``HxWx{1,2,3,4}``, or is empty.
    """
    if array.ndim == 3 and array.shape[2] in (2, 4):  # grey+alpha or RGBA: drop alpha
        array = array[..., : array.shape[2] - 1]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3) or array.size == 0:
        raise ImageDecodeError(f"unsupported image array of shape {array.shape}")
    applied = dicom_window if array.dtype == np.uint8 else None  # a DICOM file comes windowed already
    if array.dtype != np.uint8:
        applied = _choose_window(array, window, dicom_window)
        array = window_to_uint8(array, applied)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array), applied


def image_problem(rgb: np.ndarray) -> str:
    """Why an ``HxWx3`` uint8 image carries no picture, or ``""``: one colour everywhere, or every
    column (row) one colour from top to bottom (left to right), the stripes a broken resize or
    export leaves. Such images decode and encode fine, so only this check finds them."""
    if rgb.shape[0] > 1 and rgb.shape[1] > 1:
        columns = bool((rgb == rgb[:1]).all())
        rows = bool((rgb == rgb[:, :1]).all())
        if columns and rows:
            return "one colour everywhere"
        if columns:
            return "every column is one colour (vertical stripes)"
        if rows:
            return "every row is one colour (horizontal stripes)"
    return ""


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """The ``(h, w)`` after scaling the longest side to ``long_side``; segment-anything's rule."""
    scale = long_side * 1.0 / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))  # a 4000x1 strip keeps 1 row


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize an ``HxWx3`` uint8 image so that its longest side is ``long_side`` (PIL bilinear)."""
    h, w = resized_shape(image.shape[0], image.shape[1], long_side)
    if (h, w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def pad_to_square(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad an ``hxwxC`` image at the bottom and right to ``size x size``."""
    h, w = image.shape[:2]
    if h > size or w > size:
        raise ValueError(f"image {h}x{w} is larger than the {size}x{size} frame")
    out = np.zeros((size, size) + image.shape[2:], dtype=image.dtype)
    out[:h, :w] = image
    return out


def valid_grid(height: int, width: int, input_size: int, grid: int = 64) -> tuple[int, int]:
    """Rows and columns of the ``grid x grid`` embedding that see image, not padding."""
    return math.ceil(height * grid / input_size), math.ceil(width * grid / input_size)


def load_frame(rgb: np.ndarray, input_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize to the encoder frame and pad; return a ``3xSxS`` uint8 array and the resized (h, w)."""
    resized = resize_longest_side(rgb, input_size)
    return pad_to_square(resized, input_size).transpose(2, 0, 1).copy(), resized.shape[:2]


def normalize_frames(frames: torch.Tensor, sizes: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """Normalize a batch of padded uint8 frames exactly like ``Sam.preprocess``.

    Arguments:
      frames: ``Bx3xSxS`` uint8, the resized image at the top left, zeros elsewhere.
      sizes: ``Bx2`` integer (h, w) of the resized image inside each frame.
      pre: the encoder's preprocessing.

    Returns:
      ``Bx3xSxS`` float32 on the frames' device: ``(x - mean) / std`` inside the image, 0 in
      the padding (SAM pads *after* normalizing). With ``pre.intensity == "minmax"``, ``x`` is
      first stretched per image from its own min..max (inside the image, all channels) to 0..255.
    """
    device = frames.device
    mean = torch.tensor(pre.pixel_mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.pixel_std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = frames.shape[-1]
    ar = torch.arange(s, device=device)
    sizes = sizes.to(device)
    inside = (ar.view(1, s, 1) < sizes[:, 0].view(-1, 1, 1)) & (ar.view(1, 1, s) < sizes[:, 1].view(-1, 1, 1))
    inside = inside.unsqueeze(1)
    x = frames.float()
    if pre.intensity == "minmax":
        lo = torch.where(inside, x, torch.full((), 255.0, device=device)).amin(dim=(1, 2, 3), keepdim=True)
        hi = torch.where(inside, x, torch.zeros((), device=device)).amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8) * 255.0
    x = (x - mean) / std
    return torch.where(inside, x, torch.zeros((), device=device))
