"""An open_clip visual encoder as the classifier: MedFocusCLIP's classifier, with a text-prompt head.

MedFocusCLIP (arXiv 2501.03839) classifies with CLIP's visual encoder. Here any open_clip model
serves as a backbone (``pip install 'samcache[clip]'``):

- ``--backbone clip:ViT-B-32`` builds the model; its weights come from ``--pretrained-path FILE``
  (an open_clip checkpoint), or, for users with internet, from open_clip's pretrained tags written
  after ``@`` with ``--pretrained`` (``clip:ViT-B-32@laion2b_s34b_b79k``). Without either, the
  weights are random (the tests use a tiny random model).
- The classification head is a linear layer on the L2-normalized image embedding, initialized
  from the text encoder: row ``k`` is the normalized embedding of ``PROMPT`` with class ``k``'s
  name, times CLIP's logit scale. At initialization the model is CLIP's zero-shot classifier;
  training (few-shot, as MedFocusCLIP does) fine-tunes the image encoder and the head. The text
  encoder is used once, for the head, and not kept.
- The image is normalized with the model's own mean and std; a fourth input channel
  (``--focus channel``) is added to the patch embedding, initialized from the mean of the three.

CLIP's visual encoder has no feature stages, so SLCA cannot gate it (``--no-slca``); focus and
fusion work with it.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from sam_cache.torch_files import TorchFileError, load_weights_only

from .errors import BackboneError

__all__ = ["CLIPBackbone", "create_clip_backbone", "PROMPT"]

PROMPT = "a medical image of {}"


class CLIPBackbone(nn.Module):
    """An open_clip visual encoder with a text-initialized linear head; ``forward`` gives logits."""

    def __init__(self, visual: nn.Module, head_weight: torch.Tensor, mean, std, img_size: int):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(head_weight.shape[1], head_weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(head_weight)
            self.head.bias.zero_()
        self.pretrained_cfg = {"mean": tuple(mean), "std": tuple(std), "input_size": (3, img_size, img_size),
                               "classifier": "head"}
        self.default_cfg = self.pretrained_cfg
        self.feature_info = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.visual(x), dim=-1))


def _split(name: str) -> tuple[str, str | None]:
    model = name.split(":", 1)[1]
    model, _, tag = model.partition("@")
    return model, tag or None


def create_clip_backbone(name: str, class_names: list[str], img_size: int, pretrained: bool = False,
                         pretrained_path: str | None = None, in_chans: int = 3) -> tuple[nn.Module, dict]:
    """Build ``clip:MODEL[@TAG]`` with a head from text prompts for ``class_names``.

    Returns:
      ``(backbone, weights)`` as :func:`~trainer.backbone.create_backbone` does.

    Raises:
      BackboneError: open_clip is not installed, the model or weights are unknown or unreachable, or
        ``pretrained_path`` holds Python objects besides tensors (read with ``weights_only=True``
        before open_clip reads it, so nothing in it runs) or is not a torch file.
    """
    try:
        import open_clip
    except ImportError:
        raise BackboneError("CLIP backbones need open_clip: pip install 'samcache[clip]'") from None
    model_name, tag = _split(name)
    if open_clip.get_model_config(model_name) is None:
        raise BackboneError(f"unknown open_clip model {model_name!r}")
    source = pretrained_path if pretrained_path is not None else (tag if pretrained else None)
    if pretrained and tag is None and pretrained_path is None:
        raise BackboneError(f"--pretrained with {name!r}: name open_clip's weights after @, e.g. "
                            f"clip:{model_name}@openai, or pass --pretrained-path FILE")
    if pretrained_path is not None and not str(pretrained_path).endswith(".safetensors"):
        try:  # open_clip 2.x beside torch 2.5 unpickles a checkpoint: a file with objects is refused first
            load_weights_only(pretrained_path)
        except TorchFileError as exc:
            raise BackboneError(f"pretrained weights {pretrained_path} {exc}") from None
    try:
        clip = open_clip.create_model(model_name, pretrained=source, force_image_size=img_size)
    except Exception as exc:  # open_clip and huggingface_hub raise many kinds
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BackboneError(f"cannot build CLIP backbone {name!r} (weights {source!r}): {first}") from None
    tokenizer = open_clip.get_tokenizer(model_name)
    names = [n.replace("_", " ").replace("-", " ") for n in class_names]
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tokenizer([PROMPT.format(n) for n in names])), dim=-1)
        scale = float(clip.logit_scale.exp())
    mean = getattr(clip.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(clip.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    backbone = CLIPBackbone(clip.visual, text * scale, mean, std, img_size)
    if in_chans != 3:
        _widen_stem(backbone.visual, in_chans)
    weights = {"source": "random" if source is None else f"open_clip:{source}", "sha256": None}
    if source is not None:
        digest = hashlib.sha256()
        for k, v in sorted(clip.visual.state_dict().items()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        weights["sha256"] = digest.hexdigest()
    return backbone, weights


def _widen_stem(visual: nn.Module, in_chans: int) -> None:
    conv = getattr(visual, "conv1", None)
    if not isinstance(conv, nn.Conv2d):
        raise BackboneError("this CLIP visual encoder has no conv1 patch embedding to take a fourth channel")
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight[:, :3] = conv.weight
        new.weight[:, 3:] = conv.weight.mean(1, keepdim=True)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    visual.conv1 = new
