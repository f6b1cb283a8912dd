"""samcache stage 2: SLCA plus a timm backbone, trained on cached SAM embeddings.

    from trainer import TrainConfig, train, evaluate_checkpoint
"""

from .config import TrainConfig
from .evaluate import TrainError, evaluate_checkpoint
from .slca import SLCA, SLCAConfig, SLCAGate
from .train import train

__all__ = ["TrainConfig", "TrainError", "evaluate_checkpoint", "SLCA", "SLCAConfig", "SLCAGate", "train"]
