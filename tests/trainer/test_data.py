import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam_cache import EmbeddingStore
from trainer.data import AugmentConfig, PairedCache, image_regions, paired_views, sample_boxes
from trainer.subset import stratified_subset


def _square_pair(r: int):
    """An image (stored frame R x R) and an embedding with a bright square at the same place.

    The original image is 3:4 (h:w), so rows below 48 of the 64-grid are padding.
    """
    img = torch.zeros(1, 3, r, r)
    emb = torch.zeros(1, 256, 64, 64)
    y0, y1, x0, x1 = 8, 20, 36, 52  # grid cells
    s = r // 64
    img[:, :, y0 * s:y1 * s, x0 * s:x1 * s] = 255
    img[:, :, : 48 * s, :] += 30  # the image region is not black, so padding is visible
    emb[:, 5, y0:y1, x0:x1] = 1.0
    return img, emb, image_regions(np.array([[300, 400]]))


def _centroid(mask: torch.Tensor) -> np.ndarray:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return np.array([ys.float().mean().item(), xs.float().mean().item()])


def test_bright_square_lands_on_the_same_embedding_cells_after_crop_and_flip():
    img, emb, regions = _square_pair(128)
    assert regions.tolist() == [[0, 0, 64, 48]]
    rng = np.random.default_rng(0)
    aug = AugmentConfig(hflip=True, crop_scale_min=0.3)
    t = 96
    checked = flipped = 0
    for _ in range(60):
        boxes, flips = sample_boxes(regions, aug, rng)
        x, e = paired_views(img, emb, boxes, flips, t)
        image_mask = x[0, 0] > 200
        emb_up = F.interpolate(e[:, 5:6], size=(t, t), mode="bilinear", align_corners=False)[0, 0]
        emb_mask = emb_up > 0.5
        if image_mask.sum() < 20:  # the crop missed the square
            assert emb_mask.sum() < 0.3 * t * t / 64
            continue
        iou = (image_mask & emb_mask).sum().item() / (image_mask | emb_mask).sum().item()
        assert iou > 0.7, f"box {boxes[0]}, flip {flips[0]}: IoU {iou:.2f}"
        assert np.abs(_centroid(image_mask) - _centroid(emb_mask)).max() < 3
        assert (e[0, :5].abs().max() == 0) and (e[0, 6:].abs().max() == 0)  # channels do not mix
        checked += 1
        flipped += bool(flips[0])
    assert checked > 20 and 0 < flipped < checked


def test_flip_moves_both_to_the_mirrored_side():
    img, emb, regions = _square_pair(64)
    boxes, _ = sample_boxes(regions, None, None)
    x0, e0 = paired_views(img, emb, boxes, np.array([False]), 64)
    x1, e1 = paired_views(img, emb, boxes, np.array([True]), 64)
    assert torch.equal(x1, x0.flip(-1)) and torch.equal(e1, e0.flip(-1))
    assert _centroid(x0[0, 0] > 200)[1] > 32 > _centroid(x1[0, 0] > 200)[1]


def test_evaluation_view_is_the_unpadded_region():
    img, emb, regions = _square_pair(64)
    boxes, flips = sample_boxes(regions, None, None)
    x, _ = paired_views(img, emb, boxes, flips, 64)
    # no padding row (value 0) reaches the training image; bilinear sampling of the last row
    # reaches less than half a stored pixel into the padding
    assert x[..., :-1, :].min() >= 29.9 and x.min() > 20


def test_stratified_subset():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    sub = stratified_subset(labels, fraction=0.1, seed=0)
    assert np.bincount(labels[sub]).tolist() == [5, 3, 2]
    assert np.array_equal(sub, stratified_subset(labels, fraction=0.1, seed=0))
    assert not np.array_equal(sub, stratified_subset(labels, fraction=0.1, seed=1))
    assert set(sub) <= set(stratified_subset(labels, fraction=0.5, seed=0))  # nested across fractions
    shots = stratified_subset(labels, shots=4, seed=2)
    assert np.bincount(labels[shots]).tolist() == [4, 4, 4]
    assert np.bincount(labels[stratified_subset(labels, fraction=0.01)]).tolist() == [1, 1, 1]
    assert len(stratified_subset(labels)) == 100
    with pytest.raises(ValueError, match="not both"):
        stratified_subset(labels, fraction=0.5, shots=2)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        stratified_subset(labels, fraction=1.5)


@pytest.mark.parametrize("residency", ["host", "stream"])
def test_paired_cache_returns_store_rows(tiny_store, residency):
    with EmbeddingStore.open(tiny_store) as store:
        rows = np.array([7, 2, 11])
        cache = PairedCache(store, np.arange(len(store)), torch.device("cpu"), residency)
        assert cache.mode == residency
        img, emb, y = cache.batch(rows)
        assert torch.equal(emb, torch.from_numpy(store.read_rows(np.sort(rows))[np.argsort(np.argsort(rows))]))
        assert torch.equal(img, torch.from_numpy(store.read_images(0, len(store))[rows]))
        assert y.tolist() == store.labels[rows].tolist()
        no_emb = PairedCache(store, rows, torch.device("cpu"), residency, embeddings=False)
        assert no_emb.batch(rows)[1] is None
