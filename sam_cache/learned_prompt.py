"""A prompt learned from the cache: ``samcache masks STORE --prompt learned --learn-from SET``.

At test time a user has no box around the lesion, and SAM's decoder given the whole image outlines
the imaged tissue instead (``bench/RESULTS.md``). But the cached embedding carries where the lesion
is. This module learns that from masks the store already holds (the user's own, brought in with
``--from-masks``), on the **train split only**:

1. :class:`LesionHead`, a small convolutional head (46 k parameters at the defaults) on
   the ``256 x G x G`` embedding, is trained to predict the share of each grid cell that the lesion
   covers (soft targets: the train split's masks, area-pooled from the stored frame to the grid;
   binary cross-entropy plus soft Dice, AdamW, a fixed number of epochs, seeded). No validation or
   test mask is read: the rows it reads are the train split's, and nothing else.
2. For every sample, the head's lesion map gives a box (:func:`map_box`): the largest connected
   region above one half (or, if no cell reaches it, above half the map's peak), grown by
   ``grow`` grid cells and clipped to the image.
3. That box prompts the store's SAM decoder (:mod:`sam_cache.masks`), which refines the mask.

The masks are stored as a mask set (``--mask-set``, :class:`sam_cache.store.MaskSet`) with their own
signature: ``prompt: learned``, the decoder and its weights' sha256, the source set's name and
signature, the head's recipe (width, epochs, lr, batch size, seed, grow) and the sha256 of the
trained head's weights. The trained head itself is kept in the set (``mask_head.NAME``, its
``torch.save`` bytes), so a run that is killed resumes with the same head instead of training
another one. New images (a store made for ``slca-train predict``, with no masks of its own) get
masks from that same head: ``samcache masks NEW --prompt learned --head-from TRAIN_STORE:SET``.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .preprocess import resized_shape
from .progress import progress as show_progress
from .store import EmbeddingStore, StoreError

__all__ = ["LesionHead", "HeadRecipe", "train_head", "map_box", "learned_boxes", "maps_to_boxes"]

LEARNED_VERSION = 1


@dataclass(frozen=True)
class HeadRecipe:
    """How the lesion head is trained (every field is part of the mask set's signature).

    Arguments:
      width: channels of the head's hidden layers.
      epochs: passes over the train split's masks.
      lr: AdamW learning rate.
      batch_size: samples per step.
      seed: seeds the head's initialisation and the order of the samples.
      grow: grid cells added on each side of the predicted box (a SAM decoder wants a box a little
        larger than the lesion; the oracle of ``bench/RESULTS.md`` grows by 5 px).
      context: dilated 3x3 layers (dilation 2, 4, 8, ...) added to the head, each widening what a
        grid cell's prediction sees (0: 5x5 cells; 2: 17x17; 3, the default: 33x33).
      presence: when set (0 < presence < 1), a sample whose lesion map has no cell at or above it
        gets an empty mask ("no lesion"), as an image without a lesion has in the masks it learns
        from, and the decoder is not run for it. None (the default, and every set made before
        this field): every sample's box is decoded, so every mask has a region.
    """

    width: int = 32
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 16
    seed: int = 0
    grow: float = 1.0
    context: int = 3  # chosen on BUSI's validation lesions: Dice 0.634 (0), 0.671 (2), 0.685 (3)
    presence: float | None = None

    def check(self) -> "HeadRecipe":
        """Raises ConfigError for a value out of range; returns the recipe."""
        if self.width < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("the learned prompt's width, epochs and batch size must be at least 1")
        if not 0 <= self.context <= 5:
            raise ConfigError(f"the learned prompt's context must be 0 to 5 dilated layers; got {self.context}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ConfigError(f"the learned prompt's lr must be a positive number; got {self.lr}")
        if not (self.grow >= 0 and np.isfinite(self.grow)):
            raise ConfigError(f"the learned prompt's grow must be 0 or more grid cells; got {self.grow}")
        if self.presence is not None and not 0 < self.presence < 1:
            raise ConfigError(f"the learned prompt's presence must be between 0 and 1; got {self.presence}")
        return self


class LesionHead(nn.Module):
    """``(B, 256, G, G)`` embedding -> ``(B, 1, G, G)`` lesion logits.

    A 1x1 convolution to ``width`` channels with group normalisation, a 3x3 convolution, ``context``
    dilated 3x3 convolutions (dilation 2, 4, ...), and a 3x3 convolution to one channel, GELU
    between: a receptive field of 5x5 grid cells (``context=0``) on top of SAM's own.
    """

    def __init__(self, width: int = 32, in_channels: int = 256, context: int = 0):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 1), nn.GroupNorm(1, width), nn.GELU(),
                  nn.Conv2d(width, width, 3, padding=1), nn.GELU()]
        for k in range(context):
            d = 2 ** (k + 1)
            layers += [nn.Conv2d(width, width, 3, padding=d, dilation=d), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _targets(masks: np.ndarray, grid: int) -> torch.Tensor:
    """``(n, 1, R, R)`` 0/1 masks in the stored frame -> ``(n, 1, G, G)`` share of each grid cell."""
    return F.adaptive_avg_pool2d(torch.from_numpy(masks).float(), grid)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


def train_head(store: EmbeddingStore, source: str, recipe: HeadRecipe, device: torch.device,
               progress: bool = True) -> LesionHead:
    """Train a :class:`LesionHead` on the train split's masks of the mask set ``source``.

    Only the train split's rows are read, embeddings and masks both (``store.split_indices("train")``).

    Raises:
      StoreError: the set does not exist, or some train rows have no mask in it.
      ConfigError: the train split holds no sample.
    """
    ms = store.mask_set(source)
    if not ms.exists:
        raise StoreError(f"store {store.path} has no mask set {source!r} to learn the prompt from"
                         + (f" (it has: {', '.join(store.mask_sets)})" if store.mask_sets else "")
                         + "; bring your masks in first: `samcache masks STORE --from-masks ... --mask-set NAME`")
    rows = store.split_indices("train")
    if len(rows) == 0:
        raise ConfigError(f"store {store.path} has no done sample in its train split to learn the prompt from")
    lacking = rows[~ms.done[rows]]
    if len(lacking):
        raise StoreError(f"mask set {source!r} of store {store.path} has no mask for {len(lacking)} of the "
                         f"{len(rows)} train samples (first: {store.ids[lacking[0]]}); the learned prompt needs all of them")
    grid = store.grid
    targets = _targets(ms.read(rows), grid)
    torch.manual_seed(recipe.seed)
    head = LesionHead(recipe.width, context=recipe.context).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=recipe.lr, weight_decay=1e-4)
    order = np.random.default_rng(recipe.seed)
    # the train embeddings are read once (float16 in memory) when they fit in 4 GiB, else batch by batch
    held = store.read_rows(rows).astype(np.float16) if len(rows) * store.bytes_per_row <= 4 * 2**30 else None
    with show_progress("learning the prompt", recipe.epochs, enabled=progress, unit="epoch") as bar:
        for _ in range(recipe.epochs):
            perm = order.permutation(len(rows))
            for start in range(0, len(rows), recipe.batch_size):
                pick = np.sort(perm[start:start + recipe.batch_size])
                emb = held[pick] if held is not None else store.read_rows(rows[pick])
                x = torch.from_numpy(np.asarray(emb, dtype=np.float32)).to(device)
                loss = _loss(head(x), targets[pick].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            bar.advance()
    return head.eval()


def map_box(prob: np.ndarray, valid: tuple[int, int], grow: float = 1.0) -> np.ndarray:
    """The box, in grid cells ``[x0, y0, x1, y1]`` (x1, y1 exclusive), of the lesion in a ``G x G`` map.

    Arguments:
      prob: lesion probabilities.
      valid: the rows and columns of the grid that see the image (in the same grid units).
      grow: cells added on each side, clipped to the valid region.

    Returns:
      The box of the largest connected region (8-connected, by summed probability) above 0.5, or
      above half the map's peak when no cell reaches 0.5; the whole valid region for a map of zeros.
    """
    from scipy import ndimage

    vr, vc = int(valid[0]), int(valid[1])
    p = np.zeros_like(prob, dtype=np.float32)
    p[:vr, :vc] = prob[:vr, :vc]
    peak = float(p.max())
    if peak <= 0:
        return np.array([0, 0, vc, vr], dtype=np.float32)
    labels, n = ndimage.label(p > min(0.5, peak / 2), structure=np.ones((3, 3)))
    mass = ndimage.sum(p, labels, index=np.arange(1, n + 1))
    ys, xs = np.nonzero(labels == 1 + int(np.argmax(mass)))
    return np.array([max(0.0, xs.min() - grow), max(0.0, ys.min() - grow),
                     min(float(vc), xs.max() + 1 + grow), min(float(vr), ys.max() + 1 + grow)], dtype=np.float32)


def head_bytes(head: LesionHead) -> bytes:
    """The head's weights as ``torch.save`` bytes (kept in the mask set)."""
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    return buf.getvalue()


def load_head(data: bytes, width: int, context: int = 0) -> LesionHead:
    """The head saved by :func:`head_bytes`."""
    head = LesionHead(width, context=context)
    head.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return head.eval()


def weights_sha256(head: LesionHead) -> str:
    """sha256 of the head's parameter values (not of their pickled form)."""
    digest = hashlib.sha256()
    for name, value in sorted(head.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def learned_boxes(store: EmbeddingStore, head: LesionHead, rows: np.ndarray, embeddings: torch.Tensor, frame: int,
                  grow: float, presence: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Box prompts for sorted ``rows``, and whether the head sees a lesion in each.

    ``embeddings`` are those rows' (float, on the head's device), already read by the caller.

    Returns:
      ``(boxes, present)``: ``(len(rows), 4)`` boxes XYXY in the encoder frame's pixels, and a
      boolean per row, False where the lesion map's peak is below ``presence`` (all True when
      ``presence`` is None).
    """
    maps = torch.sigmoid(head(embeddings))[:, 0].cpu().numpy()
    present = np.ones(len(rows), dtype=bool) if presence is None else maps.reshape(len(rows), -1).max(1) >= presence
    return maps_to_boxes(store, maps, rows, frame, grow), present


def maps_to_boxes(store: EmbeddingStore, maps: np.ndarray, rows: np.ndarray, frame: int, grow: float) -> np.ndarray:
    """The box prompts of lesion maps already computed (:func:`learned_boxes` without the head).

    Takes ``maps``, ``(len(rows), grid, grid)`` probabilities of ``rows`` of ``store``. Returns
    ``(len(rows), 4)`` boxes XYXY in the encoder frame's pixels (``frame``), each the box of its
    map's largest region (:func:`map_box`) grown by ``grow`` grid cells and kept inside the image.
    """
    grid = store.grid
    out = np.zeros((len(rows), 4), dtype=np.float32)
    for k, row in enumerate(rows):
        h, w = store.orig_size[row]
        nh, nw = resized_shape(int(h), int(w), frame)
        vr, vc = (int(np.ceil(v * grid / 64)) for v in store.valid[row])
        box = map_box(maps[k], (vr, vc), grow) * (frame / grid)
        out[k] = [box[0], box[1], min(box[2], nw - 1), min(box[3], nh - 1)]
    return out


def recipe_signature(recipe: HeadRecipe) -> dict:
    """The recipe as recorded in a mask set's signature (``presence`` only when set, so that the
    sets made before it existed keep their signature and resume)."""
    sig = asdict(recipe)
    if sig["presence"] is None:
        del sig["presence"]
    return sig
