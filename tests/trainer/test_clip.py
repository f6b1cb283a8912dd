"""The CLIP classifier (MedFocusCLIP's): an open_clip visual encoder with a head from text prompts.

A tiny random open_clip model is registered for the tests; no CLIP weights are downloaded.
"""

import json

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip", reason="CLIP backbones are the optional extra samcache[clip]")

from trainer import BackboneError, TrainConfig, train  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402
from trainer.backbone import create_backbone  # noqa: E402
from trainer.clip_backbone import PROMPT  # noqa: E402

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module", autouse=True)
def tiny_clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    (d / "samcache-tiny-clip.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(d)


def test_the_head_is_clip_s_zero_shot_classifier_at_initialization():
    names = ["benign", "malignant", "normal"]
    torch.manual_seed(0)
    backbone, weights = create_backbone("clip:samcache-tiny-clip", 3, 32, class_names=names)
    torch.manual_seed(0)
    clip = open_clip.create_model("samcache-tiny-clip", force_image_size=32).eval()
    tok = open_clip.get_tokenizer("samcache-tiny-clip")
    x = torch.randn(2, 3, 32, 32)
    backbone.eval()
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tok([PROMPT.format(n) for n in names])), dim=-1)
        zero_shot = clip.logit_scale.exp() * F.normalize(clip.encode_image(x), dim=-1) @ text.T
        assert torch.allclose(backbone(x), zero_shot, atol=1e-5)
    assert weights == {"source": "random", "sha256": None}
    assert backbone.pretrained_cfg["mean"] == tuple(open_clip.OPENAI_DATASET_MEAN)


def test_a_clip_backbone_trains_with_fusion_and_refuses_slca(tiny_store, tmp_path):
    base = {"cache": str(tiny_store), "epochs": 1, "batch_size": 4, "img_size": 32, "device": "cpu",
            "backbone": "clip:samcache-tiny-clip"}
    result = train(TrainConfig.from_dict({**base, "out": str(tmp_path / "c"), "slca": False, "fuse": "mean"}),
                   log=lambda s: None)
    assert result["test"]["n"] == 3 and result["backbone"] == "clip:samcache-tiny-clip"
    with pytest.raises(ConfigError, match="no feature stages .* --no-slca"):  # at once: the config refuses it
        TrainConfig.from_dict({**base, "out": str(tmp_path / "s")})
    with pytest.raises(BackboneError, match="unknown open_clip model"):
        create_backbone("clip:no-such-model", 2, 32)
    with pytest.raises(BackboneError, match="name open_clip's weights after @"):
        create_backbone("clip:samcache-tiny-clip", 2, 32, pretrained=True)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {os.environ['SAMCACHE_PWNED']}",))


def test_clip_weights_load_from_a_file_and_a_file_with_a_payload_never_runs(tmp_path, monkeypatch):
    torch.manual_seed(3)
    source = open_clip.create_model("samcache-tiny-clip", force_image_size=32)
    torch.save(source.state_dict(), tmp_path / "clip.pt")
    backbone, weights = create_backbone("clip:samcache-tiny-clip", 2, 32, pretrained_path=str(tmp_path / "clip.pt"))
    assert torch.equal(backbone.visual.conv1.weight, source.visual.conv1.weight)
    assert weights["source"] == f"open_clip:{tmp_path / 'clip.pt'}"
    monkeypatch.setenv("SAMCACHE_PWNED", str(tmp_path / "pwned"))
    torch.save(dict(source.state_dict(), extra=_Payload()), tmp_path / "evil.pt")
    with pytest.raises(BackboneError, match=r"evil\.pt holds a Python object \(\w+\.system\)"):
        create_backbone("clip:samcache-tiny-clip", 2, 32, pretrained_path=str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists(), "a CLIP checkpoint ran its payload"
