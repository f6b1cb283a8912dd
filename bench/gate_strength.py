"""How far trained SLCA gates moved from the identity: mean and max ``|gate - 1|`` per stage.

    python bench/gate_strength.py runs/study-isic/runs/slca-f1.0-s0 [more run folders] [--rows 32]

SLCA starts as the identity (``trainer/slca.py``). A run whose gates stay within a fraction of a
percent of 1 trained a backbone that is, in effect, the backbone alone; this tells a real "no
difference" from a recipe too short for SLCA to act. Reads each run's ``best.pt`` and the first
``--rows`` test samples of its store; prints one line per run and stage.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)

import torch  # noqa: E402

from sam_cache import EmbeddingStore  # noqa: E402
from trainer import TrainConfig  # noqa: E402
from trainer.evaluate import build_model  # noqa: E402
from trainer.slca import pool_embedding  # noqa: E402


@torch.no_grad()
def gate_strength(run: str | Path, rows: int = 32) -> dict[str, tuple[float, float]]:
    """``{stage_name: (mean, max)}`` of ``|gate - 1|`` over test samples, on each stage's 8x8 grid.

    Raises:
      ValueError: the run was trained with ``--no-slca``.
    """
    state = torch.load(Path(run) / "best.pt", map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_dict(state["config"])
    if not cfg.slca:
        raise ValueError(f"{run} was trained without SLCA")
    model = build_model(cfg, len(state["class_names"]))
    model.load_state_dict(state["model"])
    model.eval()
    with EmbeddingStore.open(cfg.cache) as store:
        emb = torch.from_numpy(store.read_rows(store.split_indices("test")[:rows])).float()
    pooled = pool_embedding(emb, cfg.window, cfg.pool)
    out = {}
    for stage, gate in model.slca.gates.items():
        d = (gate.multiplier(pooled, (8, 8)) - 1).abs()
        out[model.stage_names[int(stage)]] = (float(d.mean()), float(d.max()))
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
