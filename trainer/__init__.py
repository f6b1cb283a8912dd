"""samcache stage 2: a timm backbone with SLCA, fusion or focus, trained on cached SAM embeddings.

    from trainer import TrainConfig, train, evaluate_checkpoint
"""

from .config import AugmentConfig, SLCAConfig, TrainConfig
from .errors import BackboneError, ConfigError, TrainError
from .evaluate import evaluate_checkpoint, load_run_model
from .model import Classifier, build_model
from .slca import SLCA, SLCAGate
from .train import train

__all__ = ["TrainConfig", "SLCAConfig", "AugmentConfig", "TrainError", "BackboneError", "ConfigError",
           "evaluate_checkpoint", "load_run_model", "Classifier", "build_model", "SLCA", "SLCAGate", "train"]
