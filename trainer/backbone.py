"""timm backbones, with pretrained weights the way timm users expect them.

- ``pretrained=False`` (default): random initialization; nothing is read or downloaded.
- ``pretrained=True``: timm's default weights for the name, through timm and its cache
  (``timm.create_model(name, pretrained=True)``). Tagged names (``resnet50.a1_in1k``), ``hf-hub:``
  and ``local-dir:`` names work as they do in timm, and so does timm's offline behaviour
  (``HF_HUB_OFFLINE=1``: only what is cached).
- ``pretrained_path=FILE``: a local weights file (a state dict, or one under ``state_dict`` or
  ``model``, as timm's ``load_state_dict`` picks it; read with ``weights_only=True``, so a file
  with a pickled object is refused, never run; ``.safetensors`` files too), loaded strictly:
  every key must fit the model but the classifier's, which a new class count re-initializes.
  Weights of another model (a ResNet-34 file for a ResNet-18) are refused, naming the keys that
  do not fit; ``partial=True`` (``--pretrained-partial``) loads the keys that fit on purpose and
  records how many did not.
- ``pretrained_path="litemedsam"``: LiteMedSAM's TinyViT encoder mapped onto
  ``tiny_vit_5m_224`` (:mod:`trainer.litemedsam_weights`).

:func:`create_backbone` returns the model and a record of where its weights came from, with their
sha256, which the run folder keeps.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import timm
import torch
from torch import nn

from sam_cache.torch_files import TorchFileError, load_weights_only

from .errors import BackboneError
from .litemedsam_weights import LITEMEDSAM, TIMM_MODEL, litemedsam_tiny_vit_state_dict

__all__ = ["create_backbone", "BackboneError", "weights_sha256"]


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)  # 0-d (BatchNorm counters) too
        digest.update(f"{name}{tuple(state[name].shape)}{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    from sam_cache.encoders import file_sha256

    return file_sha256(path)


def create_backbone(name: str, num_classes: int, img_size: int, pretrained: bool = False,
                    pretrained_path: str | Path | None = None, in_chans: int = 3,
                    class_names: list[str] | None = None, partial: bool = False,
                    **kwargs) -> tuple[nn.Module, dict]:
    """``timm.create_model`` with pretrained weights by flag, by file, or LiteMedSAM's.

    Arguments:
      name: a timm model name, tagged name, ``hf-hub:`` or ``local-dir:`` name.
      num_classes: the classifier's outputs.
      img_size: passed to models built for a fixed input size (ViT, Swin); ignored by CNNs.
      pretrained: timm's default weights for ``name`` (through its cache or hub).
      pretrained_path: a local weights file, or ``"litemedsam"``; implies ``pretrained``.
      in_chans: input channels (4 for ``--focus channel``; timm adapts pretrained stems).
      class_names: the classes (a ``clip:`` backbone builds its head from their names).
      partial: load the keys of ``pretrained_path`` that fit and skip the rest (default: refuse
        a file with a key that does not fit).
      kwargs: more model arguments (e.g. ``embed_dim`` for a small test Swin).

    ``clip:MODEL[@TAG]`` builds an open_clip visual encoder instead (:mod:`trainer.clip_backbone`).

    Returns:
      ``(model, weights)``; ``weights`` is ``{"source", "sha256"}``: ``source`` is ``random``, the
      timm name, the file path or ``litemedsam``; ``sha256`` that of the file, or of the loaded
      tensors when no single file is known (None for random weights). A partial load adds
      ``"skipped"``: how many of the file's keys, and the model's, were left out.

    Raises:
      BackboneError: an unknown model, a missing file, or weights that cannot be reached or do
        not fit (a file's keys: missing, unexpected or of another shape, first ones named).
    """
    if name.startswith("clip:"):
        from .clip_backbone import create_clip_backbone

        names = class_names or [f"class {k}" for k in range(num_classes)]
        return create_clip_backbone(name, names, img_size, pretrained,
                                    None if pretrained_path is None else str(pretrained_path), in_chans)
    special = str(pretrained_path) == LITEMEDSAM if pretrained_path is not None else False
    source_name = name.split(":", 1)[0] if ":" in name else None
    if source_name not in (None, "hf-hub", "local-dir"):
        raise BackboneError(f"backbone {name!r}: unknown source {source_name!r} (timm knows hf-hub: and local-dir:)")
    if source_name is None and not timm.is_model(name.split(".")[0]):
        raise BackboneError(f"unknown timm model {name!r}")
    if special and name.split(".")[0] != TIMM_MODEL:
        raise BackboneError(f"--pretrained-path litemedsam needs --backbone {TIMM_MODEL} (LiteMedSAM's TinyViT), "
                            f"not {name!r}")
    extra: dict = {}
    weights = {"source": "random", "sha256": None}
    if pretrained_path is not None and not special:
        path = Path(pretrained_path)
        if not path.is_file():
            raise BackboneError(f"pretrained weights {path} do not exist (nothing is downloaded for a path)")
        weights = {"source": str(path), "sha256": _file_sha256(path)}
    elif pretrained and not special:
        extra = {"pretrained": True}
        weights = {"source": f"timm:{name}", "sha256": None}
    try:
        try:
            model = timm.create_model(name, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                                      **kwargs, **extra)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs, **extra)
    except BackboneError:
        raise
    except Exception as exc:  # timm and huggingface_hub raise many kinds for unreachable or bad weights
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = "" if not extra else " with pretrained weights (offline? timm reads them from its cache or the hub)"
        raise BackboneError(f"cannot build backbone {name!r}{where}: {first}") from None
    if pretrained_path is not None and not special:
        skipped = _load_file(model, Path(pretrained_path), name, in_chans, partial)
        if partial:
            weights["skipped"] = skipped
    if special:
        _load_litemedsam(model, in_chans)
        weights = {"source": LITEMEDSAM, "sha256": None}
    if weights["source"] != "random" and weights["sha256"] is None:
        weights["sha256"] = weights_sha256({k: v for k, v in model.state_dict().items()
                                            if not k.startswith(_classifier_prefix(model))})
    return model, weights


def _classifier_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the model's classifier, which a new class count re-initializes."""
    name = getattr(model, "default_cfg", {}).get("classifier", "fc")
    return name if isinstance(name, str) else name[0]


def _prefixes(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


def _load_file(model: nn.Module, path: Path, name: str, in_chans: int, partial: bool) -> dict:
    """Load a weights file into ``model`` strictly but for the classifier (see the module)."""
    from timm.models import clean_state_dict, load_state_dict

    try:
        if path.suffix == ".safetensors":  # no pickle inside: nothing in it can run
            state = load_state_dict(str(path), use_ema=False)
        else:  # read here, not by timm: timm 1.0.16, the lowest we allow, unpickles by default
            state = load_weights_only(path)
            if isinstance(state, dict):  # timm's choice of key (use_ema=False), and its "module." stripping
                key = next((k for k in ("state_dict", "model") if k in state), None)
                state = clean_state_dict(state[key] if key else state)
    except TorchFileError as exc:
        raise BackboneError(f"pretrained weights {path} {exc}") from None
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BackboneError(f"pretrained weights {path} cannot be read: {first}") from None
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    if in_chans != 3:  # a 3-channel stem grows to in_chans as timm's own pretrained loading does
        from timm.models._manipulate import adapt_input_conv

        for conv in _prefixes(cfg.get("first_conv")):
            key = f"{conv}.weight"
            if key in state and state[key].ndim == 4 and state[key].shape[1] != in_chans:
                state[key] = adapt_input_conv(in_chans, state[key])
    own = model.state_dict()
    head = _prefixes(cfg.get("classifier", "fc"))

    def in_head(k: str) -> bool:
        return any(k == h or k.startswith(h + ".") for h in head)

    missing = [k for k in own if k not in state and not in_head(k)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape) and not in_head(k)]
    if (missing or unexpected or wrong) and not partial:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's keys missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} keys the model does not have (first: {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (first: {k}, file {tuple(state[k].shape)}, "
                         f"model {tuple(own[k].shape)})")
        raise BackboneError(f"pretrained weights {path} do not fit {name}: {'; '.join(parts)}. Is it another "
                            "model's file? --pretrained-partial loads the keys that fit on purpose")
    fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(fits, strict=False)
    return {"file_keys": len(state) - len(fits), "model_keys": len([k for k in own if k not in fits and not in_head(k)])}


def _load_litemedsam(model: nn.Module, in_chans: int) -> None:
    state = litemedsam_tiny_vit_state_dict()
    if in_chans != 3:
        w = state["patch_embed.conv1.conv.weight"]
        extra = w.mean(1, keepdim=True).repeat(1, in_chans - 3, 1, 1)
        state["patch_embed.conv1.conv.weight"] = torch.cat([w, extra], 1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise BackboneError(f"LiteMedSAM weights do not fit {TIMM_MODEL}: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
