"""The prompt encoder and mask decoder that belong to a store's encoder: :class:`MaskDecoder`.

:func:`sam_cache.masks.create_mask_decoder` builds one for a store; an encoder family registers its
own builder beside its encoder (:func:`sam_cache.encoders.register_encoder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .encoders import EncoderError, file_sha256, load_checkpoint

__all__ = ["MaskDecoder", "checked_checkpoint", "load_parts", "decoder_of"]


@dataclass
class MaskDecoder:
    """SAM's prompt encoder and mask decoder for one store's encoder.

    Arguments:
      name: the store's encoder name.
      prompt_encoder, mask_decoder: segment-anything modules (or LiteMedSAM's), eval mode.
      input_size: the encoder frame's side, in which boxes are given.
      sha256: the checkpoint they were loaded from, or None for random weights.

    ``high_res`` (class attribute): whether a call needs the store's high-resolution feature levels
    (SAM 2); False for SAM's decoders, which read the embedding alone.
    """

    name: str
    prompt_encoder: nn.Module
    mask_decoder: nn.Module
    input_size: int
    sha256: str | None

    high_res = False

    def to(self, device) -> "MaskDecoder":
        self.prompt_encoder.to(device)
        self.mask_decoder.to(device)
        return self

    @torch.no_grad()
    def __call__(self, embedding: torch.Tensor, boxes: torch.Tensor, multimask: bool,
                 high_res: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits for one image's embedding and ``K`` box prompts.

        Arguments:
          embedding: ``1 x 256 x 64 x 64`` float.
          boxes: ``K x 4`` XYXY in the encoder frame's pixels.
          multimask: three masks per prompt (True) or one.
          high_res: the image's high-resolution levels, each ``1 x C x H x W``, for decoders that
            need them (ignored here).

        Returns:
          ``(logits, iou)``: ``K x M x 256 x 256`` logits over the whole frame, ``K x M`` predicted IoU.
        """
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
        logits, iou = self.mask_decoder(image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=multimask)
        return logits, iou


def checked_checkpoint(path: str | Path, want: str | None) -> str:
    """sha256 of ``path``, refused unless it is ``want`` (the store's) when the store names one.

    Raises:
      EncoderError: another checkpoint than the store was made with.
    """
    sha = file_sha256(path)
    if want is not None and sha != want:
        raise EncoderError(f"checkpoint {path} (sha256 {sha[:16]}) is not the one this store was made with "
                           f"({want[:16]}); its decoder would not match the embeddings")
    return sha


def load_parts(parts: dict[str, nn.Module], path: Path, state: dict | None = None) -> None:
    """Load each ``prefix.``-ed part of a checkpoint into its module, strictly.

    Raises:
      EncoderError: a part is missing from the checkpoint or does not fit.
    """
    state = load_checkpoint(path) if state is None else state
    for prefix, module in parts.items():
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as exc:
            raise EncoderError(f"checkpoint {path} has no {prefix.rstrip('.')} that fits: "
                               f"{str(exc).splitlines()[0]}") from None


def decoder_of(sam: nn.Module, signature: dict, checkpoint: str | Path | None, input_size: int) -> MaskDecoder:
    """The :class:`MaskDecoder` of a built SAM-like model (``prompt_encoder``, ``mask_decoder``)
    for a store: its two parts loaded from ``checkpoint`` (checked against the store's sha256)
    when one is given, else left as built (random weights, seed 0).

    Raises:
      EncoderError: the checkpoint is not the store's, or has no parts that fit.
    """
    sha = None
    if checkpoint is not None:
        sha = checked_checkpoint(checkpoint, signature.get("checkpoint_sha256"))
        load_parts({"prompt_encoder.": sam.prompt_encoder, "mask_decoder.": sam.mask_decoder}, Path(checkpoint))
    return MaskDecoder(signature["encoder"], sam.prompt_encoder.eval(), sam.mask_decoder.eval(), input_size, sha)
