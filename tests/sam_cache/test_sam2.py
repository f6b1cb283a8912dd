"""SAM 2 and MedSAM2 encoders: the cache against SAM2ImagePredictor, and the commands end to end.

Reference equality: ``SAM2ImagePredictor.set_image`` squashes an image to a square, while samcache
keeps every encoder's aspect-preserving frame; on a square image at the input size the two inputs
are the same, so these tests use one. The stores are float32 here, and we require the cached
embedding and high-resolution levels to equal the predictor's within 1e-4 of their range (float
summation order), and the masks decoded from the cache to agree with ``predict`` within 2 % of the
logits' range and on 99 % of the pixels. Random weights (seed 0); no SAM 2 checkpoint is needed.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("sam2", reason="the sam2 extra is not installed")

from cli.samcache import app  # noqa: E402
from conftest import shared  # noqa: E402
from sam_cache import EmbeddingStore, EncoderError, create_encoder, extract_dataset  # noqa: E402
from sam_cache.masks import create_mask_decoder, decode_masks  # noqa: E402
from sam_cache.sam2_encoders import build_sam2_model  # noqa: E402

runner = CliRunner(env={"COLUMNS": "200"})
pytestmark = pytest.mark.slow


def _close(ours, theirs, rel=1e-4):
    ours, theirs = np.asarray(ours, dtype=np.float32), np.asarray(theirs, dtype=np.float32)
    assert ours.shape == theirs.shape
    span = float(theirs.max() - theirs.min())
    assert span > 0
    assert float(np.abs(ours - theirs).max()) <= rel * span


def _manifest(root, paths, labels):
    """A CSV dataset, every image in the train split (no split is drawn)."""
    rows = ["path,label,split"] + [f"{p},{lab},train" for p, lab in zip(paths, labels)]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def _square_dataset(root, side: int, n: int = 2):
    """``n`` square RGB pictures of ``side`` pixels spanning 0..255, and their CSV."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    for k in range(n):
        blob = np.exp(-((yy - side * (0.3 + 0.2 * k)) ** 2 + (xx - side * 0.5) ** 2) / (2 * (side / 8) ** 2))
        gray = 40 + 150 * blob + rng.normal(0, 12, (side, side))
        gray = (gray - gray.min()) / (gray.max() - gray.min()) * 255  # spans 0..255: min-max leaves it as it is
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)).save(root / f"img{k}.png")
    return _manifest(root, [root / f"img{k}.png" for k in range(n)], [f"class{k}" for k in range(n)])


@pytest.fixture(scope="module")
def sam2_store(tmp_path_factory):
    csv = _square_dataset(tmp_path_factory.mktemp("sq1024") / "data", 1024)
    out = tmp_path_factory.mktemp("sam2") / "s.zarr"
    extract_dataset(csv, out, "sam2.1_hiera_t", random_weights=True, dtype="float32", image_size=256, batch_size=2,
                    num_workers=0, progress=False)
    return csv.parent, out


def _predictor(name: str):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = build_sam2_model(name, None, random_weights=True)
    return SAM2ImagePredictor(model)


def _rgb(store: EmbeddingStore, root, k: int) -> np.ndarray:
    return np.asarray(Image.open(root / store.ids[k]).convert("RGB"))


def test_sam2_embedding_and_levels_equal_set_image(sam2_store):
    root, out = sam2_store
    predictor = _predictor("sam2.1_hiera_t")
    with EmbeddingStore.open(out) as s:
        assert s.high_res_shapes == [(32, 256, 256), (64, 128, 128)]
        for k in range(len(s)):
            predictor.set_image(_rgb(s, root, k))
            _close(s.read_rows(np.array([k])), predictor.get_image_embedding())
            for ours, theirs in zip(s.read_high_res(np.array([k])), predictor._features["high_res_feats"]):
                _close(ours, theirs)


def test_sam2_mask_from_the_cache_equals_predict(sam2_store):
    root, out = sam2_store
    predictor = _predictor("sam2.1_hiera_t")
    k = 0
    box = np.array([200.0, 250.0, 700.0, 640.0])
    with EmbeddingStore.open(out) as s:
        predictor.set_image(_rgb(s, root, k))
        _, ref_iou, ref_low = predictor.predict(box=box, multimask_output=False, return_logits=True)
        decoder = create_mask_decoder(s.signature)
        emb = torch.from_numpy(s.read_rows(np.array([k])))
        levels = [torch.from_numpy(v) for v in s.read_high_res(np.array([k]))]
        logits, iou = decoder(emb, torch.from_numpy(box[None]).float(), multimask=False, high_res=levels)
    ours, theirs = logits[0, 0].clamp(-32, 32).numpy(), ref_low[0]
    _close(ours, theirs, rel=0.02)
    assert float(((ours > 0) == (theirs > 0)).mean()) >= 0.99
    assert float(iou[0, 0]) == pytest.approx(float(ref_iou[0]), abs=0.02)

    # the whole command: the whole image's box (frame 1024, stored masks at 256 = the low-res logits' size)
    summary = decode_masks(out, prompt="box", progress=False, device="cpu")
    assert summary["written"] == 2
    with EmbeddingStore.open(out) as s:
        predictor.set_image(_rgb(s, root, 1))
        stored = s.mask_set().read(np.array([1]))[0, 0]
    _, _, whole = predictor.predict(box=np.array([0.0, 0.0, 1023.0, 1023.0]), multimask_output=False,
                                    return_logits=True)
    assert float((stored == (whole[0] > 0)).mean()) >= 0.99


def test_medsam2_embedding_equals_set_image_at_512(tmp_path):
    """MedSAM2 at its own 512 input: the 32x32 embedding, repeated to 64x64, comes back exactly from a grid-32 store."""
    csv = _square_dataset(tmp_path / "data", 512, n=1)
    root = csv.parent
    out = tmp_path / "m.zarr"
    extract_dataset(csv, out, "medsam2", random_weights=True, dtype="float32", grid=32, image_size=128, batch_size=1,
                    num_workers=0, progress=False)
    predictor = _predictor("medsam2")
    predictor._bb_feat_sizes = [(128, 128), (64, 64), (32, 32)]  # the predictor hard-codes the 1024 input's sizes
    with EmbeddingStore.open(out) as s:
        predictor.set_image(_rgb(s, root, 0))
        assert predictor.get_image_embedding().shape[-1] == 32
        _close(s.read_rows(np.array([0])), predictor.get_image_embedding())
        assert s.high_res_shapes == [(32, 128, 128), (64, 64, 64)]


def test_sam2_checkpoints_are_checked(tmp_path):
    with pytest.raises(EncoderError, match="needs --checkpoint PATH"):
        create_encoder("sam2.1_hiera_t")
    bad = tmp_path / "other.pt"
    torch.save({"model": {"image_encoder.trunk.pos_embed": torch.zeros(3)}}, bad)
    with pytest.raises(EncoderError, match=f"{bad}.*does not fit sam2.1_hiera_t"):
        create_encoder("sam2.1_hiera_t", checkpoint=bad)
    # a whole SAM 2 checkpoint of this architecture loads, and its sha256 signs the store
    model = build_sam2_model("sam2.1_hiera_t", None, random_weights=True)
    good = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, good)
    enc = create_encoder("sam2.1_hiera_t", checkpoint=good)
    assert enc.checkpoint_sha256 and not enc.random_weights


def test_sam2_commands_on_real_images(tmp_path):
    """samcache extract --encoder sam2.1_hiera_t --random-weights on BUSI pictures, then samcache masks."""
    busi = shared("busi")
    pictures = [busi / "benign" / "benign (1).png", busi / "malignant" / "malignant (1).png"]
    csv = _manifest(tmp_path, pictures, ["benign", "malignant"])
    out = tmp_path / "busi.zarr"
    r = runner.invoke(app, ["extract", "--dataset", str(csv), "--out", str(out), "--encoder", "sam2.1_hiera_t",
                            "--random-weights", "--image-size", "128", "--batch-size", "2", "--workers", "0",
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["masks", str(out), "--prompt", "box", "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", str(out)])
    assert r.exit_code == 0 and "32x256x256, 64x128x128 float16 a sample" in r.output, r.output
    r = runner.invoke(app, ["verify", str(out)])
    assert r.exit_code == 0, r.output
    with EmbeddingStore.open(out) as s:
        assert s.mask_set().done.all()
        assert s.mask_set().signature["decoder"] == "sam2.1_hiera_t"
        assert s.mask_set().read(np.arange(len(s))).shape == (2, 1, 128, 128)
    shard = next((out / "high_res_0").rglob("0/0/0/0"))  # the first shard file of the first level
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    r = runner.invoke(app, ["verify", str(out)])
    assert r.exit_code != 0 and "high_res" in r.output and "do not match their checksums" in r.output, r.output
