"""An extra is one module plus one registration: a toy extra registered here trains end to end."""

import pytest
import torch
from torch import nn

from trainer import TrainConfig, train
from trainer.evaluate import load_run_model
from trainer.extras import EXTRAS, Extra, register_extra
from trainer.model import Classifier, build_model
from trainer.slca import SLCA

calls = []


class PeakLogits(Extra):
    """The toy: logits from the per-channel peak of the embedding, added to the backbone's."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(256, num_classes)

    def grid(self):
        return 8, False

    def logits(self, embeddings):
        calls.append(tuple(embeddings.shape))
        return self.fc(embeddings.float().amax((2, 3)))

    def describe(self):
        return "peak logits"


@pytest.fixture
def toy_extra():
    register_extra("peak")(lambda cfg, backbone, num_classes, img_size: PeakLogits(num_classes))
    calls.clear()
    yield
    EXTRAS.pop("peak")


def test_a_registered_extra_trains_evaluates_and_reloads(toy_extra, tiny_store, tmp_path):
    cfg = TrainConfig(cache=str(tiny_store), out=str(tmp_path / "r"), epochs=2, batch_size=4, img_size=32,
                      device="cpu", slca={"enabled": False}, fuse="none")
    model, _ = build_model(cfg, 3)
    assert list(model.extras) == ["peak"] and model.needs_embeddings and model.embedding_grid == 8
    before = model.peak.fc.weight.detach().clone()
    lines = []
    result = train(cfg, log=lines.append)
    assert result["test"]["n"] > 0 and calls and calls[0][1:] == (256, 8, 8)  # it read the 8x8 view
    assert any("no SLCA, peak logits, " in line for line in lines)  # the model line asks the extra
    reloaded, _, state = load_run_model(tmp_path / "r" / "best.pt", "cpu")
    assert any(k.startswith("peak.fc.") for k in state.model)  # its keys, under its name
    assert not torch.equal(reloaded.peak.fc.weight, before)  # it trained, and came back from the checkpoint


def test_the_built_in_extras_keep_their_names_and_order(toy_extra):
    cfg = TrainConfig(cache="s.zarr", out="r", img_size=32, fuse="mean")
    model, _ = build_model(cfg, 3)
    assert list(model.extras) == ["slca", "fuse", "peak"]  # the toy (order 100) after the built-ins
    keys = {k.split(".")[0] for k in model.state_dict()}
    assert keys == {"backbone", "slca", "fuse", "peak"}
    names = [g.get("name") for g in model.param_groups(1e-3, 0.05)]
    assert names[-1] == "slca" and names.count("slca") == 1  # its own learning rate, after the shared groups
    with pytest.raises(ValueError, match="registered already"):
        register_extra("peak")(lambda *a: None)


def test_extras_that_cannot_share_a_batch_are_refused(tiny_store):
    backbone = build_model(TrainConfig(cache="s.zarr", out="r", img_size=32, slca=False, fuse="none"), 3)[0].backbone
    gates = SLCA.for_backbone(TrainConfig(cache="s.zarr", out="r").slca, backbone, 32)  # the 16x16 grid, exactly

    class NeedsFour(PeakLogits):
        def grid(self):
            return 4, True

    with pytest.raises(Exception, match="different embedding grids"):
        Classifier(backbone, 3, {"slca": gates, "four": NeedsFour(3)})


def test_layer_decay_scales_the_backbone_by_depth_and_leaves_the_extras_alone():
    """--layer-decay D: the classifier keeps lr, each layer below it D times the rate of the one
    above (timm's groups); SLCA keeps its own multiplied rate; D = 1 gives the groups of before."""
    cfg = TrainConfig(cache="s.zarr", out="r", img_size=32, backbone="resnet18")
    model, _ = build_model(cfg, 3)
    rate = {}
    for g in model.param_groups(1e-3, 0.05, layer_decay=0.5):
        for p in g["params"]:
            rate[id(p)] = g["lr"]
    bb = model.backbone
    assert rate[id(bb.fc.weight)] == pytest.approx(1e-3)
    assert rate[id(bb.conv1.weight)] < rate[id(bb.layer1[0].conv1.weight)] < rate[id(bb.layer4[1].conv2.weight)] < 1e-3
    assert rate[id(bb.layer4[1].conv2.weight)] == pytest.approx(0.5e-3)  # one layer below the classifier
    slca = next(g for g in model.param_groups(1e-3, 0.05, layer_decay=0.5) if g.get("name") == "slca")
    assert slca["lr"] == pytest.approx(1e-3 * cfg.slca.lr_mult)
    assert sum(len(g["params"]) for g in model.param_groups(1e-3, 0.05, 0.5)) == len(list(model.parameters()))
    plain = model.param_groups(1e-3, 0.05, layer_decay=1.0)
    assert {g["lr"] for g in plain if "name" not in g} == {1e-3}
