"""How far trained SLCA gates moved from the identity: mean and max ``|gate - 1|`` per stage.

    python bench/gate_strength.py runs/study-isic/runs/slca-f1.0-s0 [more run folders] [--rows 32]

SLCA starts as the identity (``trainer/slca.py``). A run whose gates stay within a fraction of a
percent of 1 trained a backbone that is, in effect, the backbone alone; this tells a real "no
difference" from a recipe too short for SLCA to act. Reads each run's ``best.pt`` (safely: see
``trainer/checkpoint.py``) and the evaluation views of the first ``--rows`` test samples of its
store, made by the trainer's own batch pipeline; prints one line per run.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)

from sam_cache import EmbeddingStore  # noqa: E402
from trainer import load_run_model  # noqa: E402
from trainer.data import PairedCache  # noqa: E402
from trainer.slca import pool_embedding  # noqa: E402
from trainer.step import BatchPipeline  # noqa: E402


@torch.no_grad()
def gate_strength(run: str | Path, rows: int = 32) -> dict[str, tuple[float, float]]:
    """``{stage_name: (mean, max)}`` of ``|gate - 1|`` over test samples, on each stage's 8x8 grid.

    Raises:
      ValueError: the run was trained without SLCA.
    """
    model, cfg, _ = load_run_model(Path(run) / "best.pt", "cpu")
    slca = model.extras.get("slca")
    if slca is None:
        raise ValueError(f"{run} was trained without SLCA")
    with EmbeddingStore.open(cfg.cache) as store:
        test = store.split_indices("test")[:rows]
        with PairedCache(store, test, torch.device("cpu"), "host", embeddings=True, masks=cfg.focus_masks) as c:
            pipeline = BatchPipeline(model, cfg, torch.device("cpu"))
            _, emb, _ = pipeline(c, test, *pipeline.boxes(c, test))
    pooled = pool_embedding(emb.float(), cfg.slca.window, cfg.slca.pool)
    out = {}
    for stage, gate in slca.gates.items():
        d = (gate.multiplier(pooled, (8, 8)) - 1).abs()
        out[slca.stage_names[int(stage)]] = (float(d.mean()), float(d.max()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--rows", type=int, default=32)
    a = p.parse_args()
    for run in a.runs:
        cells = "  ".join(f"{k} {m:.4f}/{x:.4f}" for k, (m, x) in gate_strength(run, a.rows).items())
        print(f"{run}: |gate-1| mean/max  {cells}")


if __name__ == "__main__":
    main()
