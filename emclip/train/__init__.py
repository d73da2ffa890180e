"""Training on accelerate: configuration, feature cache, checkpoints, the loop and its command line."""
from .config import TrainConfig, load_config
from .loop import TrainingDiverged, TrainingInterrupted, train

__all__ = ["TrainConfig", "load_config", "TrainingDiverged", "TrainingInterrupted", "train"]
