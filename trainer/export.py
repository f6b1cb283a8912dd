"""``slca-train export``: a trained backbone as a plain timm state dict, with SLCA's weights apart.

``OUT`` is the backbone's state dict, which timm loads like any pretrained weights::

    timm.create_model(name, num_classes=K, pretrained=True, pretrained_cfg_overlay=dict(file=OUT, num_classes=K))

(``num_classes`` in the overlay tells timm that the file's classifier has K outputs, so it keeps it
instead of dropping it as it does for ImageNet weights.)

``OUT`` with ``.extras.pth`` holds what is not the backbone (SLCA gates, the fusion head), and
``OUT`` with ``.json`` says how to rebuild the model (backbone name, classes, input channels) and
whether the plain backbone *is* the whole model: only for runs without SLCA and fusion. With them,
the exported backbone alone is not the trained classifier; the JSON says so. Its
``pretrained_cfg`` (also in the ``load`` line) records what the run fed the backbone: the image
size, the whole image resized to a square (``crop_pct`` 1, ``crop_mode`` squash, bilinear) and
the normalization, so that ``timm.data.resolve_data_config`` preprocesses as training did.
"""

from __future__ import annotations

import json
from pathlib import Path

from sam_cache.outputs import OutputError, atomic_write, refuse_overlap

from .checkpoint import save_checkpoint
from .errors import TrainError
from .evaluate import load_run_model

__all__ = ["export_checkpoint"]


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> dict:
    """Write ``out`` (timm state dict), ``out.extras.pth`` (when there are extras) and ``out.json``.

    Returns:
      The JSON's content: ``{"backbone", "num_classes", "in_chans", "pretrained_cfg", "class_names",
      "complete", "note", "load", "files"}``.

    Raises:
      TrainError: the checkpoint is missing, unsafe or unreadable; ``out`` (or a file beside it)
        is the checkpoint itself; or ``out`` cannot be written.
    """
    out = Path(out)
    extra_path, json_path = out.with_name(out.name + ".extras.pth"), out.with_name(out.name + ".json")
    try:
        for path in (out, extra_path, json_path):
            refuse_overlap(path, {"--checkpoint": checkpoint})
    except OutputError as exc:
        raise TrainError(str(exc)) from None
    model, cfg, state = load_run_model(checkpoint, "cpu")
    if not model.has_backbone:
        raise TrainError(f"{checkpoint} is a cache-only head (--backbone none): there is no timm backbone to export; "
                         "use the checkpoint itself (slca-train eval / predict)")
    save_checkpoint(model.backbone.state_dict(), out)
    extras = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    files = [str(out)]
    if extras:
        save_checkpoint({"state_dict": extras, "config": cfg.to_dict()}, extra_path)
        files.append(str(extra_path))
    in_chans = next(p for p in model.backbone.parameters() if p.ndim == 4).shape[1]
    base = getattr(model.backbone, "pretrained_cfg", {}) or {}
    # what the run fed the backbone: the whole image (no centre crop) resized to a square, bilinear
    pretrained_cfg = {"input_size": [int(in_chans), cfg.img_size, cfg.img_size], "crop_pct": 1.0,
                      "crop_mode": "squash", "interpolation": "bilinear",
                      "mean": list(base.get("mean", (0.485, 0.456, 0.406))),
                      "std": list(base.get("std", (0.229, 0.224, 0.225))), "num_classes": len(state.class_names)}
    overlay = ", ".join(f"{k}={v!r}" for k, v in pretrained_cfg.items())
    info = {"backbone": cfg.backbone, "num_classes": len(state.class_names), "in_chans": int(in_chans),
            "pretrained_cfg": pretrained_cfg,
            "class_names": state.class_names, "complete": not extras,
            "note": ("the backbone is the whole trained classifier" if not extras else
                     "trained with SLCA or fusion: the backbone alone is not the trained classifier; the extras "
                     "file holds the rest, and slca-train eval/predict use the whole model"),
            "load": f"timm.create_model({cfg.backbone!r}, num_classes={len(state.class_names)}, in_chans={in_chans}, "
                    f"pretrained=True, pretrained_cfg_overlay=dict(file={str(out)!r}, {overlay}))",
            "files": files}
    try:
        atomic_write(json_path, lambda p: p.write_text(json.dumps(info, indent=2)))
    except OutputError as exc:
        raise TrainError(str(exc)) from None
    return info
