"""SAM 2 and MedSAM2: image encoder, prompt encoder and mask decoder, registered together.

Needs the optional extra, ``pip install -e ".[sam2]" -c constraints.txt`` (Meta's ``sam2`` code, as
PyPI's ``sam2`` packages it; on a machine without CUDA set ``SAM2_BUILD_CUDA=0``, which skips only
its optional CUDA post-processing kernel). Checkpoints are passed by path, never downloaded.

================  ====================================  =====  ===========================
name              sam2 config                           input  checkpoint
================  ====================================  =====  ===========================
sam2.1_hiera_t    ``configs/sam2.1/sam2.1_hiera_t.yaml``  1024   ``sam2.1_hiera_tiny.pt``
sam2.1_hiera_s    ``configs/sam2.1/sam2.1_hiera_s.yaml``  1024   ``sam2.1_hiera_small.pt``
sam2.1_hiera_b+   ``configs/sam2.1/sam2.1_hiera_b+.yaml`` 1024   ``sam2.1_hiera_base_plus.pt``
sam2.1_hiera_l    ``configs/sam2.1/sam2.1_hiera_l.yaml``  1024   ``sam2.1_hiera_large.pt``
sam2_hiera_t ...  ``configs/sam2/sam2_hiera_*.yaml``      1024   ``sam2_hiera_tiny.pt`` ...
medsam2           sam2.1_hiera_t at image_size 512      512    ``MedSAM2_latest.pt``
================  ====================================  =====  ===========================

What a store keeps, exactly what ``SAM2ImagePredictor.set_image`` keeps for one image:

- the embedding: the neck's lowest-resolution level plus ``no_mem_embed`` (SAM 2 adds it to an
  image that has no memory), ``256 x 64 x 64`` for a 1024 input;
- the two higher-resolution FPN levels after the mask decoder's own projections ``conv_s0`` and
  ``conv_s1`` (``32 x 256 x 256`` and ``64 x 128 x 128``), which SAM 2's mask decoder adds while it
  upsamples its masks. They are kept because the decoder needs them: without them ``samcache
  masks`` could not decode as SAM 2 does (see the README's SAM 2 section for the bytes).

Input frame and intensities: SAM 2's own mean and std (ImageNet's, which are SAM's ``pixel_mean``
and ``pixel_std`` divided by 255), in our aspect-preserving frame (longest side to the input size,
zero padding after normalizing) like every other encoder here, so that the store's valid grid,
images and masks mean the same for every encoder. ``SAM2ImagePredictor`` squashes an image to a
square instead: on a square image the two inputs are the same, and the reference-equality tests
use one.

MedSAM2: its reference inference (bowang-lab/MedSAM2, ``medsam2_infer_3D_CT.py`` and
``medsam2_infer_general.py``) clips CT to a window, scales the volume's min..max to 0..255, resizes
each slice to 512x512, divides by 255 and normalizes with ImageNet's mean and std, and builds the
model from ``sam2.1_hiera_t512.yaml`` (SAM 2.1 Hiera-tiny at ``image_size`` 512). We do the same per
image (``intensity="minmax"``, SAM's mean and std, a 512 frame); DICOM windowing is ``--window``'s.
Its embedding is ``256 x 32 x 32``: each cell is repeated 2x2 to the store's ``256 x 64 x 64``
contract, so that a ``--grid 32`` store keeps it exactly (average pooling undoes the repeat), and
its decoder pools it back before decoding.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import (
    Encoder,
    EncoderError,
    _seeded,
    file_sha256,
    load_checkpoint,
    register_encoder,
)
from .mask_decoder import MaskDecoder, checked_checkpoint
from .preprocess import SAM_PIXEL_MEAN, SAM_PIXEL_STD, Preprocessing

__all__ = ["SAM2_ENCODERS", "Sam2Embedder", "Sam2MaskDecoder", "build_sam2_model"]

#: name -> (sam2 config, image_size, checkpoint file name, intensity)
SAM2_ENCODERS = {
    **{f"sam2.1_hiera_{k}": (f"configs/sam2.1/sam2.1_hiera_{k}.yaml", 1024, f"sam2.1_hiera_{f}.pt", "fixed")
       for k, f in (("t", "tiny"), ("s", "small"), ("b+", "base_plus"), ("l", "large"))},
    **{f"sam2_hiera_{k}": (f"configs/sam2/sam2_hiera_{k}.yaml", 1024, f"sam2_hiera_{f}.pt", "fixed")
       for k, f in (("t", "tiny"), ("s", "small"), ("b+", "base_plus"), ("l", "large"))},
    "medsam2": ("configs/sam2.1/sam2.1_hiera_t.yaml", 512, "MedSAM2_latest.pt", "minmax"),
}
_PARTS = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")


def _import_sam2():
    try:
        from sam2.build_sam import build_sam2
    except ImportError as exc:
        raise EncoderError("the SAM 2 encoders need the sam2 extra: pip install -e \".[sam2]\" -c constraints.txt "
                           f"(SAM2_BUILD_CUDA=0 on a machine without CUDA); importing sam2 failed: {exc}") from None
    return build_sam2


def build_sam2_model(name: str, checkpoint: str | Path | None, random_weights: bool) -> nn.Module:
    """SAM 2's whole model for a registered name, in eval mode on the CPU.

    Only the parts that single images use (image encoder, prompt encoder, mask decoder and
    ``no_mem_embed``) are loaded from the checkpoint, strictly; the video memory modules are left
    as built. Random weights use seed ``RANDOM_SEED``.

    Raises:
      EncoderError: no checkpoint and not ``random_weights``, the sam2 extra missing, or a
        checkpoint that is unreadable or does not fit.
    """
    config, size, file_name, _ = SAM2_ENCODERS[name]
    if checkpoint is None and not random_weights:
        raise EncoderError(f"encoder {name!r} needs --checkpoint PATH to its weights ({file_name}; they are never "
                           "downloaded); pass --random-weights only for benchmarks and tests")
    state = load_checkpoint(checkpoint) if checkpoint is not None else None  # fail before building
    build_sam2 = _import_sam2()
    overrides = [f"++model.image_size={size}"] if size != 1024 else []
    model = _seeded(lambda: build_sam2(config, ckpt_path=None, device="cpu", mode="eval",
                                       hydra_overrides_extra=overrides))
    if state is None:
        return model.eval()
    want = {k: v for k, v in model.state_dict().items() if k.startswith(_PARTS)}
    have = {k: v for k, v in state.items() if k.startswith(_PARTS)}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = [k for k in set(want) & set(have) if tuple(want[k].shape) != tuple(have[k].shape)]
    if missing or extra or wrong:
        what = (f"{len(missing)} missing (first {missing[0]})" if missing else
                f"{len(extra)} unexpected (first {extra[0]})" if extra else f"{wrong[0]} of another shape")
        raise EncoderError(f"checkpoint {checkpoint} does not fit {name} ({config}): of its image, prompt and mask "
                           f"decoder weights, {what}")
    model.load_state_dict(have, strict=False)
    return model.eval()


class Sam2Embedder(nn.Module):
    """SAM 2's image encoder as a store sees it: ``Bx3xSxS`` -> ``Bx256x64x64``.

    ``forward(x, high_res=True)`` returns ``(embedding, [level0, level1])`` with the two projected
    FPN levels the mask decoder needs (``Bx32x(S/4)x(S/4)``, ``Bx64x(S/8)x(S/8)``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.image_encoder = model.image_encoder
        self.conv_s0 = model.sam_mask_decoder.conv_s0
        self.conv_s1 = model.sam_mask_decoder.conv_s1
        self.no_mem_embed = model.no_mem_embed
        self.repeat = 64 // (model.image_size // 16)

    def forward(self, x: torch.Tensor, high_res: bool = False):
        fpn = self.image_encoder(x)["backbone_fpn"]
        emb = fpn[-1] + self.no_mem_embed.view(1, -1, 1, 1)
        if self.repeat > 1:  # MedSAM2's 32x32 to the 64x64 contract, exactly undone by 2x2 average pooling
            emb = emb.repeat_interleave(self.repeat, dim=-2).repeat_interleave(self.repeat, dim=-1)
        if not high_res:
            return emb
        return emb, [self.conv_s0(fpn[0]), self.conv_s1(fpn[1])]


def _encoder(name: str, checkpoint, random_weights, window) -> Encoder:
    config, size, _, intensity = SAM2_ENCODERS[name]
    model = build_sam2_model(name, checkpoint, random_weights)
    sha = file_sha256(checkpoint) if checkpoint is not None else None
    pre = Preprocessing(input_size=size, pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD, window=window,
                        intensity=intensity)
    levels = ((32, size // 4, size // 4), (64, size // 8, size // 8))
    return Encoder(name, Sam2Embedder(model), pre, str(checkpoint) if sha else None, sha, sha is None,
                   high_res=levels)


class Sam2MaskDecoder(MaskDecoder):
    """SAM 2's prompt encoder and mask decoder, called as ``SAM2ImagePredictor.predict`` calls them
    for box prompts: each box as its two corner points (labels 2 and 3), the stored high-resolution
    levels added while upsampling, and the single-mask output's stability fallback as
    ``build_sam2`` configures it."""

    high_res = True

    def __init__(self, name, prompt_encoder, mask_decoder, input_size, sha256):
        super().__init__(name, prompt_encoder, mask_decoder, input_size, sha256)
        self.grid = input_size // 16

    @torch.no_grad()
    def __call__(self, embedding, boxes, multimask, high_res=None):
        if high_res is None:
            raise EncoderError(f"the {self.name} mask decoder needs the store's high-resolution feature levels")
        if embedding.shape[-1] != self.grid:  # MedSAM2: the repeated 64x64 back to its own 32x32
            embedding = F.avg_pool2d(embedding, embedding.shape[-1] // self.grid)
        labels = torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device).repeat(len(boxes), 1)
        sparse, dense = self.prompt_encoder(points=(boxes.reshape(-1, 2, 2), labels), boxes=None, masks=None)
        logits, iou, _, _ = self.mask_decoder(
            image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=multimask, repeat_image=len(boxes) > 1,
            high_res_features=high_res)
        return logits, iou


def _decoder(signature: dict, checkpoint: str | Path | None = None) -> Sam2MaskDecoder:
    name = signature["encoder"]
    random = bool(signature.get("random_weights"))
    if checkpoint is None and not random:
        raise EncoderError(f"the {name} mask decoder comes from the store's checkpoint: pass --checkpoint PATH "
                           "(the same file the store was extracted with)")
    sha = checked_checkpoint(checkpoint, signature.get("checkpoint_sha256")) if checkpoint is not None else None
    model = build_sam2_model(name, checkpoint, random_weights=checkpoint is None)
    return Sam2MaskDecoder(name, model.sam_prompt_encoder.eval(), model.sam_mask_decoder.eval(), model.image_size, sha)


def _register(name: str) -> None:
    def build(checkpoint=None, random_weights=False, window="auto") -> Encoder:
        return _encoder(name, checkpoint, random_weights, window)

    build.__doc__ = f"SAM 2 family encoder {name} ({SAM2_ENCODERS[name][0]}, input {SAM2_ENCODERS[name][1]})."
    register_encoder(build, name=name, decoder=_decoder)


for _name in SAM2_ENCODERS:
    _register(_name)
