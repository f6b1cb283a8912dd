"""float16 vs float32 SAM 2 stores of the same six BUSI pictures: how far the decoded masks move (random weights).

    python bench/sam2_float16.py [WORKDIR]     # needs ../shared/data/busi and the sam2 extra
"""
import numpy as np, sys
from pathlib import Path
from sam_cache import EmbeddingStore, extract_dataset
from sam_cache.masks import decode_masks
busi = Path("../shared/data/busi")
pics = [busi / c / f"{c} ({k}).png" for c in ("benign", "malignant", "normal") for k in (1, 2)]
root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sam2-fp"); root.mkdir(parents=True, exist_ok=True)
(root / "labels.csv").write_text("path,label,split\n" + "".join(f"{p.resolve()},{p.parent.name},train\n" for p in pics))
out = {}
for dtype in ("float32", "float16"):
    s = root / f"{dtype}.zarr"
    if not s.exists():
        extract_dataset(root / "labels.csv", s, "sam2.1_hiera_t", random_weights=True, dtype=dtype, image_size=224,
                        batch_size=2, num_workers=0, progress=False)
        decode_masks(s, prompt="candidates", progress=False, device="cpu")
    with EmbeddingStore.open(s) as st:
        out[dtype] = st.mask_set().read(np.arange(len(st)))
a, b = out["float32"].astype(bool), out["float16"].astype(bool)
agree = (a == b).reshape(len(a), -1).mean(1)
inter = (a & b).reshape(len(a), -1).sum(1); union = (a | b).reshape(len(a), -1).sum(1)
print("pixel agreement per image", np.round(agree, 4), "IoU", np.round(inter / np.maximum(union, 1), 4),
      "mask area float32", a.reshape(len(a), -1).mean(1).round(3))
