import pytest
import torch

from trainer.backbone import BackboneError, SLCAClassifier, create_backbone
from trainer.slca import SLCAConfig, pool_embedding, resize_to_grid

SMALL_SWIN = dict(window_size=4, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
BACKBONES = [("resnet18", {}), ("seresnet18", {}), ("swinv2_tiny_window8_256", SMALL_SWIN)]


def _pair(name, kwargs, slca):
    torch.manual_seed(0)
    plain = SLCAClassifier(create_backbone(name, 3, 64, **kwargs), None, 64).eval()
    torch.manual_seed(0)
    gated = SLCAClassifier(create_backbone(name, 3, 64, **kwargs), slca, 64).eval()
    return plain, gated


@pytest.mark.parametrize("name,kwargs", BACKBONES)
@pytest.mark.parametrize("gate", ["scaled", "residual"])
def test_identity_at_initialization(name, kwargs, gate):
    plain, gated = _pair(name, kwargs, SLCAConfig(gate=gate, pool="avgmax"))
    x, e = torch.randn(2, 3, 64, 64), torch.randn(2, 256, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain(x), gated(x, e))


@pytest.mark.parametrize("name,kwargs", BACKBONES)
def test_gates_change_every_stage_once_trained(name, kwargs):
    """The gate reaches the features: with non-zero weights the output depends on the embedding."""
    _, gated = _pair(name, kwargs, SLCAConfig())
    with torch.no_grad():
        for p in gated.slca.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = gated(x, torch.randn(2, 256, 64, 64)), gated(x, torch.randn(2, 256, 64, 64))
    assert not torch.allclose(a, b)
    assert len(gated.slca.gates) == 4


def test_swin_stages_are_found_nhwc_and_resnet_nchw():
    _, swin = _pair(*BACKBONES[2], SLCAConfig())
    _, resnet = _pair(*BACKBONES[0], SLCAConfig())
    assert all(swin.channels_last_dim.values()) and not any(resnet.channels_last_dim.values())
    assert resnet.stages == [1, 2, 3, 4]  # the stride-2 stem is not gated by default


def test_gradient_reaches_slca_and_backbone():
    _, gated = _pair("resnet18", {}, SLCAConfig())
    gated.train()
    loss = gated(torch.randn(2, 3, 64, 64), torch.randn(2, 256, 64, 64)).sum()
    loss.backward()
    assert gated.slca.gates["1"].mlp[-1].weight.grad.abs().sum() > 0
    assert gated.backbone.conv1.weight.grad.abs().sum() > 0


def test_pooling_and_resizing():
    e = torch.arange(64 * 64, dtype=torch.float32).view(1, 1, 64, 64).repeat(1, 256, 1, 1)
    assert pool_embedding(e, 4, "avg").shape == (1, 256, 16, 16)
    assert pool_embedding(e, 8, "avgmax").shape == (1, 512, 8, 8)
    assert pool_embedding(e, 4, "max")[0, 0, 0, 0] == 3 * 64 + 3
    assert resize_to_grid(torch.ones(1, 2, 16, 16), (7, 7)).shape == (1, 2, 7, 7)
    assert resize_to_grid(torch.ones(1, 2, 16, 16), (56, 56)).shape == (1, 2, 56, 56)


def test_bad_designs_are_refused():
    with pytest.raises(ValueError, match="window must divide 64"):
        SLCAConfig(window=5)
    with pytest.raises(ValueError, match="pool must be one of"):
        SLCAConfig(pool="median")
    with pytest.raises(BackboneError, match=r"stages \[7\] do not index"):
        SLCAClassifier(create_backbone("resnet18", 3, 64), SLCAConfig(stages=[7]), 64)
    with pytest.raises(BackboneError, match="unknown timm model"):
        create_backbone("resnet_nope", 3, 64)
    with pytest.raises(BackboneError, match="do not exist"):
        create_backbone("resnet18", 3, 64, pretrained="/nonexistent/r18.pth")


def test_pretrained_backbone_loads_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = create_backbone("resnet18", 1000, 64)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = create_backbone("resnet18", 3, 64, pretrained=tmp_path / "r18.pth")
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 3
