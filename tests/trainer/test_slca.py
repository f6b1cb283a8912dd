import pytest
import torch

from trainer.backbone import BackboneError, create_backbone
from trainer.config import ConfigError, SLCAConfig
from trainer.model import Classifier
from trainer.slca import SLCA, pool_embedding, resize_to_grid

SMALL_SWIN = dict(window_size=4, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
BACKBONES = [("resnet18", {}), ("seresnet18", {}), ("swinv2_tiny_window8_256", SMALL_SWIN)]


def _backbone(name, **kwargs):
    return create_backbone(name, 3, 64, **kwargs)[0]


def _gated(backbone, slca: SLCAConfig, img_size: int = 64) -> Classifier:
    return Classifier(backbone, 3, {"slca": SLCA.for_backbone(slca, backbone, img_size)})


def _pair(name, kwargs, slca):
    torch.manual_seed(0)
    plain = Classifier(_backbone(name, **kwargs), 3).eval()
    torch.manual_seed(0)
    gated = _gated(_backbone(name, **kwargs), slca).eval()
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
    """Each gate reaches its stage: with only that gate's weights set, the output depends on the embedding."""
    _, gated = _pair(name, kwargs, SLCAConfig())
    x = torch.randn(2, 3, 64, 64)
    e1, e2 = torch.randn(2, 256, 64, 64), torch.randn(2, 256, 64, 64)
    assert len(gated.slca.gates) == 4
    for stage, gate in gated.slca.gates.items():
        with torch.no_grad():
            for p in gated.slca.parameters():
                p.zero_()
            for p in gate.parameters():
                p.normal_(0, 0.5)
            if hasattr(gate, "gamma"):
                gate.gamma.fill_(1.0)
            assert not torch.allclose(gated(x, e1), gated(x, e2)), f"stage {stage} has no effect"


def test_swin_stages_are_found_nhwc_and_resnet_nchw():
    _, swin = _pair(*BACKBONES[2], SLCAConfig())
    _, resnet = _pair(*BACKBONES[0], SLCAConfig())
    assert all(swin.slca.channels_last_dim.values()) and not any(resnet.slca.channels_last_dim.values())
    assert resnet.slca.stages == [1, 2, 3, 4]  # the stride-2 stem is not gated by default


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
    with pytest.raises(ConfigError, match="window must divide 64"):
        SLCAConfig(window=5)
    with pytest.raises(ConfigError, match="pool must be one of"):
        SLCAConfig(pool="median")
    with pytest.raises(BackboneError, match=r"stages \[7\] do not index"):
        _gated(_backbone("resnet18"), SLCAConfig(stages=[7]))
    with pytest.raises(BackboneError, match="unknown timm model"):
        create_backbone("resnet_nope", 3, 64)
    with pytest.raises(BackboneError, match="do not exist"):
        create_backbone("resnet18", 3, 64, pretrained_path="/nonexistent/r18.pth")


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {os.environ['SAMCACHE_PWNED']}",))


def test_pretrained_weights_with_a_payload_are_refused_and_never_run(tmp_path, monkeypatch):
    """Read with weights_only=True by samcache itself (timm 1.0.16, our lowest, would unpickle)."""
    monkeypatch.setenv("SAMCACHE_PWNED", str(tmp_path / "pwned"))
    state = dict(_backbone("resnet18").state_dict(), extra=_Payload())
    torch.save(state, tmp_path / "evil.pth")
    with pytest.raises(BackboneError, match=r"evil\.pth holds a Python object \(\w+\.system\)"):
        create_backbone("resnet18", 3, 64, pretrained_path=tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists(), "a pretrained weights file ran its payload"
    (tmp_path / "notes.pth").write_text("# not weights")
    with pytest.raises(BackboneError, match=r"notes\.pth is not a torch file"):
        create_backbone("resnet18", 3, 64, pretrained_path=tmp_path / "notes.pth")


def test_pretrained_backbone_loads_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = _backbone("resnet18")
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model, weights = create_backbone("resnet18", 5, 64, pretrained_path=tmp_path / "r18.pth")
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 5
    from sam_cache.encoders import file_sha256

    assert weights == {"source": str(tmp_path / "r18.pth"), "sha256": file_sha256(tmp_path / "r18.pth")}
    assert create_backbone("resnet18", 3, 64)[1] == {"source": "random", "sha256": None}
    # a training checkpoint: the weights under "state_dict" (or "model"), saved from DataParallel
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    model, _ = create_backbone("resnet18", 5, 64, pretrained_path=tmp_path / "ckpt.pth")
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def test_pretrained_weights_of_another_model_are_refused_by_name_unless_partial(tmp_path):
    torch.save(_backbone("resnet34").state_dict(), tmp_path / "r34.pth")  # timm used to load it with a warning
    with pytest.raises(BackboneError, match=r"r34.pth do not fit resnet18: .*keys the model does not have "
                                            r"\(first: layer1.2.conv1.weight\).*--pretrained-partial"):
        create_backbone("resnet18", 3, 64, pretrained_path=tmp_path / "r34.pth")
    model, weights = create_backbone("resnet18", 3, 64, pretrained_path=tmp_path / "r34.pth", partial=True)
    source = torch.load(tmp_path / "r34.pth", weights_only=True)
    assert torch.equal(model.layer1[0].conv1.weight, source["layer1.0.conv1.weight"])  # the keys that fit
    assert weights["skipped"]["file_keys"] > 0 and weights["skipped"]["model_keys"] == 0
    wrong = _backbone("resnet18").state_dict()
    wrong["layer2.0.conv1.weight"] = wrong["layer2.0.conv1.weight"][:, :32]
    torch.save(wrong, tmp_path / "bad.pth")
    with pytest.raises(BackboneError, match=r"1 of another shape \(first: layer2.0.conv1.weight, file "
                                            r"\(128, 32, 3, 3\), model \(128, 64, 3, 3\)\)"):
        create_backbone("resnet18", 3, 64, pretrained_path=tmp_path / "bad.pth")
    # a 4-channel stem (--focus channel) grows from a 3-channel file, as timm's loading does
    four, _ = create_backbone("resnet18", 3, 64, pretrained_path=tmp_path / "r34.pth", in_chans=4, partial=True)
    assert four.conv1.weight.shape[1] == 4
