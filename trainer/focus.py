"""Focus mode: a SAM mask as a visual prompt for the classifier (the MedFocusCLIP idea).

MedFocusCLIP (arXiv 2501.03839) steers a classifier to the region a segmentation model finds. Here
the mask is decoded from the cached embedding (``samcache masks``) and travels with the image as
a fourth channel through the same crop and flip (:mod:`trainer.data`). Four ways to use it,
chosen because each is a different, cheap kind of prompt:

- ``background``: the image outside the mask is dimmed to ``BACKGROUND_LEVEL`` of its intensity.
  The classifier still sees the context (ultrasound shadowing, skin around a lesion), but the
  mask's region stands out. A hard cut-out would delete context when the mask misses.
- ``crop``: every view (training crops and the evaluation view) is cut from the box around the
  mask, grown by 10 % per side, instead of from the whole image: more pixels on the lesion at
  the same input size. The embedding is cut from the same box, so SLCA stays aligned.
- ``channel``: the mask is a fourth input channel (the backbone's stem takes 4 channels), and
  the network learns how to use it; nothing is removed from the image.
- ``overlay``: MedFocusCLIP's own prompt, the "segmented image": the mask drawn onto the image as
  a colour overlay. The region is blended toward orange (``REGION_TINT``, alpha 0.35) and the
  background toward blue (``BACKGROUND_TINT``, alpha 0.25). Why these: breast ultrasound and most
  grey modalities carry no hue, so any hue is a clean signal; orange and blue are opposite hues,
  so the boundary shows in every pair of channels whatever the grey level; and alphas under 0.4
  keep the grey texture (speckle, margins, shadowing) visible on both sides, since that texture
  is what tells benign from malignant. The background is tinted too, not dimmed: MedFocusCLIP
  reports that a binary mask in place of the segmented image lost accuracy, and dimming hides
  context when the mask misses. ``bench/mask_overlay.py`` draws what the classifier sees.

An empty mask (the decoder found nothing) leaves the image as it is in every mode.

Each mode is one :class:`FocusMode` registered with :func:`register_focus`: it says what it needs
(the mask, the input channels, whether views are cut from the mask's box) and how it prompts.
The pipeline, the model and the config ask it; nothing else names a mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["FocusMode", "FOCUS_MODES", "MODES", "register_focus", "focus_mode", "apply_focus", "overlay",
           "BACKGROUND_LEVEL"]

BACKGROUND_LEVEL = 0.3
REGION_TINT, REGION_ALPHA = (255.0, 140.0, 0.0), 0.35  # orange
BACKGROUND_TINT, BACKGROUND_ALPHA = (0.0, 90.0, 255.0), 0.25  # blue


@dataclass(frozen=True)
class FocusMode:
    """One way to prompt the classifier with the SAM mask.

    Arguments:
      name: the ``--focus`` value.
      prompt: ``prompt(rgb, mask) -> (rgb, extra)`` on ``B x 3 x T x T`` (0..255) and ``B x 1 x T x T``
        (0..1) views of images whose mask is not empty; ``extra`` is an extra input channel or None.
      in_chans: the backbone's input channels (4 when ``prompt`` returns an extra channel).
      crops_to_mask: views are cut from the box around the mask, not the image's region.
      needs_mask: the run carries a mask set (every mode but ``none``).
    """

    name: str
    prompt: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    in_chans: int = 3
    crops_to_mask: bool = False
    needs_mask: bool = True


FOCUS_MODES: dict[str, FocusMode] = {}
#: the registered mode names, live: a mode registered later is a valid ``--focus`` too
MODES = FOCUS_MODES.keys()


def register_focus(mode: FocusMode) -> FocusMode:
    """Add ``mode`` to :data:`FOCUS_MODES` (``--focus`` accepts it from then on); returns it.

    Raises:
      ValueError: a mode of that name is registered already.
    """
    if mode.name in FOCUS_MODES:
        raise ValueError(f"a focus mode {mode.name!r} is registered already")
    FOCUS_MODES[mode.name] = mode
    return mode


def focus_mode(name: str) -> FocusMode:
    """The registered mode ``name``.

    Raises:
      ValueError: no such mode (naming the registered ones).
    """
    if name not in FOCUS_MODES:
        raise ValueError(f"unknown focus mode {name!r}; registered: {', '.join(FOCUS_MODES)}")
    return FOCUS_MODES[name]


def apply_focus(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a ``B x 4 x T x T`` view into the RGB image (0..255) and its mask, and prompt with it.

    Arguments:
      x: the view from :func:`~trainer.data.paired_views`: ``B x 3 x T x T``, or ``B x 4 x T x T``
        whose channel 3 is the mask (0..1). Every mode but ``none`` needs the mask; ``none`` drops
        it if present (a study shares one cache between focus and non-focus methods).
      mode: a registered mode's name (:data:`MODES`).

    Returns:
      ``(rgb, extra)``: ``rgb`` is ``B x 3 x T x T`` as the mode prompts it (images whose mask is
      empty are left as they are); ``extra`` is the mode's extra channel, else None.

    Raises:
      ValueError: an unknown mode, or a mode that needs the mask given a view without one.
    """
    m = focus_mode(mode)
    if not m.needs_mask:
        return x[:, :3], None
    if x.shape[1] != 4:
        raise ValueError(f"focus mode {mode!r} needs a view with a mask channel, got {x.shape[1]} channels")
    rgb, mask = x[:, :3], x[:, 3:4].clamp(0, 1)
    empty = mask.flatten(1).amax(1).view(-1, 1, 1, 1) == 0
    prompted, extra = m.prompt(rgb, mask)
    return torch.where(empty, rgb, prompted), extra


def overlay(rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MedFocusCLIP's segmented image: ``rgb`` (``B x 3 x T x T``, 0..255) with the region of ``mask``
    (``B x 1 x T x T``, 0..1) blended toward :data:`REGION_TINT` and the rest toward
    :data:`BACKGROUND_TINT`. A fractional mask (a resized edge) blends between the two."""
    region = torch.tensor(REGION_TINT, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    background = torch.tensor(BACKGROUND_TINT, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    inside = (1 - REGION_ALPHA) * rgb + REGION_ALPHA * region
    outside = (1 - BACKGROUND_ALPHA) * rgb + BACKGROUND_ALPHA * background
    return mask * inside + (1 - mask) * outside


def _dim_background(rgb, mask):
    return rgb * (BACKGROUND_LEVEL + (1 - BACKGROUND_LEVEL) * mask), None


register_focus(FocusMode("none", lambda rgb, mask: (rgb, None), needs_mask=False))
register_focus(FocusMode("background", _dim_background))
register_focus(FocusMode("crop", lambda rgb, mask: (rgb, None), crops_to_mask=True))  # the box did the work
register_focus(FocusMode("channel", lambda rgb, mask: (rgb, mask), in_chans=4))
register_focus(FocusMode("overlay", lambda rgb, mask: (overlay(rgb, mask), None)))
