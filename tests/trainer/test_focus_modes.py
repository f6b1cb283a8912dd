"""A focus mode is one object plus one registration: a toy mode registered here trains end to end."""

import shutil

import numpy as np
import pytest
import torch

from sam_cache import EmbeddingStore
from sam_cache.errors import ConfigError
from trainer import TrainConfig, train
from trainer.focus import FOCUS_MODES, FocusMode, apply_focus, register_focus

seen = []


def _invert_region(rgb, mask):
    """The toy prompt: the image inverted inside the mask; it also records that it ran."""
    seen.append(int(mask.sum()))
    return rgb * (1 - mask) + (255 - rgb) * mask, None


@pytest.fixture
def toy_mode():
    register_focus(FocusMode("invert", _invert_region))
    seen.clear()
    yield
    FOCUS_MODES.pop("invert")


def _with_masks(tiny_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    with EmbeddingStore.open(store, "r+") as s:
        n = len(s)
        masks = np.zeros((n, 1, 64, 64), np.uint8)
        masks[:, 0, 16:48, 16:48] = 1
        ms = s.prepare_masks({"decoder": None, "prompt": "file", "source": "a square"}, mask_set="square")
        ms.write(np.arange(n), masks, np.ones(n, np.float32), np.zeros((n, 4), np.float32))
    return store


def test_a_registered_focus_mode_is_a_valid_option_and_trains(toy_mode, tiny_store, tmp_path):
    store = _with_masks(tiny_store, tmp_path)
    cfg = TrainConfig(cache=str(store), out=str(tmp_path / "r"), focus="invert", mask_set="square", epochs=1,
                      batch_size=4, img_size=32, device="cpu", slca={"enabled": False}, fuse="none")
    assert cfg.focus_masks == "square"  # the mode says it needs the mask
    result = train(cfg, log=lambda s: None)
    assert result["focus"] == "invert" and result["test"]["n"] > 0 and seen and max(seen) > 0
    x = torch.full((1, 4, 8, 8), 10.0)
    x[:, 3] = 0
    x[:, 3, :4] = 1
    rgb, extra = apply_focus(x, "invert")
    assert extra is None and rgb[0, 0, 0, 0] == 245 and rgb[0, 0, 7, 7] == 10


def test_an_unregistered_mode_is_refused_and_names_are_unique(toy_mode):
    with pytest.raises(ConfigError, match="focus must be one of .*invert"):
        TrainConfig(cache="s.zarr", out="r", focus="nope")
    with pytest.raises(ValueError, match="registered already"):
        register_focus(FocusMode("invert", _invert_region))
