"""Focus mode: a SAM mask as a visual prompt for the classifier (the MedFocusCLIP idea).

MedFocusCLIP (arXiv 2501.03839) steers a classifier to the region a segmentation model finds. Here
the mask is decoded from the cached embedding (``samcache masks``) and travels with the image as
a fourth channel through the same crop and flip (:mod:`trainer.data`). Three ways to use it,
chosen because each is a different, cheap kind of prompt:

- ``background``: the image outside the mask is dimmed to ``BACKGROUND_LEVEL`` of its intensity.
  The classifier still sees the context (ultrasound shadowing, skin around a lesion), but the
  mask's region stands out. A hard cut-out would delete context when the mask misses.
- ``crop``: every view (training crops and the evaluation view) is cut from the box around the
  mask, grown by 10 % per side, instead of from the whole image: more pixels on the lesion at
  the same input size. The embedding is cut from the same box, so SLCA stays aligned.
- ``channel``: the mask is a fourth input channel (the backbone's stem takes 4 channels), and
  the network learns how to use it; nothing is removed from the image.

An empty mask (the decoder found nothing) leaves the image as it is in every mode.
"""

from __future__ import annotations

import torch

__all__ = ["apply_focus", "BACKGROUND_LEVEL", "MODES"]

MODES = ("none", "background", "crop", "channel")
BACKGROUND_LEVEL = 0.3


def apply_focus(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a ``B x 4 x T x T`` view into the RGB image (0..255) and its mask, and prompt with it.

    Arguments:
      x: the view from :func:`~trainer.data.paired_views`: ``B x 3 x T x T``, or ``B x 4 x T x T``
        whose channel 3 is the mask (0..1). Every mode but ``none`` needs the mask; ``none`` drops
        it if present (a study shares one cache between focus and non-focus methods).
      mode: one of :data:`MODES`.

    Returns:
      ``(rgb, extra)``: ``rgb`` is ``B x 3 x T x T`` (dimmed outside the mask for
      ``background``); ``extra`` is the ``B x 1 x T x T`` mask for ``channel``, else None.
    """
    if mode == "none":
        return x[:, :3], None
    if x.shape[1] != 4:
        raise ValueError(f"focus mode {mode!r} needs a view with a mask channel, got {x.shape[1]} channels")
    rgb, mask = x[:, :3], x[:, 3:4].clamp(0, 1)
    empty = mask.flatten(1).amax(1).view(-1, 1, 1, 1) == 0
    if mode == "background":
        weight = BACKGROUND_LEVEL + (1 - BACKGROUND_LEVEL) * mask
        return torch.where(empty, rgb, rgb * weight), None
    if mode == "channel":
        return rgb, mask
    return rgb, None  # crop: the box did the work
