"""The one place that knows a store's bytes: encoding, decoding, pooling and the CRC-32 of rows.

The embedding store calls these; nothing else writes or reads stored bytes.
"""

from __future__ import annotations

import zlib

import numpy as np

from .schema import EMBED_SHAPE, StoreError, check_dtype

__all__ = ["NUMPY_DTYPES", "quantize_int8", "bytes_per_row", "pool_to_grid", "encode_embeddings", "decode_embeddings",
           "embedding_crc", "image_crc", "high_res_dtype", "high_res_crc", "row_checksums"]

NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int8": "int8",
                "bfloat16": "uint16"}  # numpy has no bfloat16: the store keeps its raw bits


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample, per-channel symmetric int8: ``(q, scale)`` with ``x ~ q * scale[..., None, None]``.

    The stored form is 1 MiB a sample instead of float16's 2 MiB; the rounding error of each value
    is at most half its channel's scale (max |x| / 254).
    """
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=(2, 3)) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[:, :, None, None]), -127, 127).astype(np.int8)
    return q, scale


def bytes_per_row(dtype: str, grid: int = 64) -> int:
    """Stored bytes of one embedding in ``dtype`` on a ``grid x grid`` grid (int8 counts its scales)."""
    itemsize = np.dtype(NUMPY_DTYPES[check_dtype(dtype)]).itemsize
    return EMBED_SHAPE[0] * grid * grid * itemsize + (EMBED_SHAPE[0] * 4 if dtype == "int8" else 0)


def pool_to_grid(x, grid: int):
    """Average-pool ``(n, 256, 64, 64)`` embeddings (numpy or torch) to ``grid x grid`` (torch out)."""
    import torch
    import torch.nn.functional as F

    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.shape[-1] == grid:
        return t
    if t.shape[-1] % grid:
        raise StoreError(f"cannot pool a {t.shape[-1]}x{t.shape[-1]} grid to {grid}x{grid}")
    return F.avg_pool2d(t.float(), t.shape[-1] // grid)


def encode_embeddings(x, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Float embeddings (numpy or torch) as the store keeps them in ``dtype``: ``(raw, scales)``.

    ``raw`` is float16/float32, the raw bits of bfloat16 as uint16, or int8 with ``scales``
    (otherwise None). Refuses integer input: the store would silently keep nonsense.
    """
    import torch

    check_dtype(dtype)
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if not t.is_floating_point():
        raise StoreError(f"embeddings must be floating point, got {t.dtype}")
    t = t.detach().cpu()
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).contiguous().view(torch.uint16).numpy(), None
    if dtype == "int8":
        return quantize_int8(t.float().numpy())
    return t.to(getattr(torch, dtype)).contiguous().numpy(), None


def decode_embeddings(raw: np.ndarray, dtype: str, scales: np.ndarray | None = None) -> np.ndarray:
    """Stored rows back to floats: float16/float32 as they are, bfloat16 bits and int8 (times its
    ``scales``) widened to float32. The inverse of :func:`encode_embeddings`."""
    if dtype == "int8":
        return raw.astype(np.float32) * np.asarray(scales)[:, :, None, None]
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


def embedding_crc(raw: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """CRC-32 of each stored embedding row (with its int8 scales)."""
    out = np.zeros(len(raw), dtype=np.uint32)
    for k in range(len(raw)):
        crc = zlib.crc32(np.ascontiguousarray(raw[k]).tobytes())
        if scales is not None:
            crc = zlib.crc32(np.ascontiguousarray(scales[k], dtype=np.float32).tobytes(), crc)
        out[k] = crc
    return out


def image_crc(images: np.ndarray) -> np.ndarray:
    """CRC-32 of each stored image row."""
    return np.array([zlib.crc32(np.ascontiguousarray(im).tobytes()) for im in images], dtype=np.uint32)


def high_res_dtype(dtype: str) -> str:
    """The stored dtype of a store's high-resolution levels: float32 in a float32 store, else float16."""
    return "float32" if dtype == "float32" else "float16"


def high_res_crc(levels: list[np.ndarray]) -> np.ndarray:
    """CRC-32 of each row's high-resolution levels, in order."""
    out = np.zeros(len(levels[0]), dtype=np.uint32)
    for k in range(len(out)):
        crc = 0
        for level in levels:
            crc = zlib.crc32(np.ascontiguousarray(level[k]).tobytes(), crc)
        out[k] = crc
    return out


def row_checksums(raw: np.ndarray, scales: np.ndarray | None, images: np.ndarray | None) -> np.ndarray:
    """``(n, 2)``: the embedding's and the image's CRC-32 (0 without images)."""
    out = np.zeros((len(raw), 2), dtype=np.uint32)
    out[:, 0] = embedding_crc(raw, scales)
    if images is not None:
        out[:, 1] = image_crc(images)
    return out
