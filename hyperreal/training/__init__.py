"""The one training loop every method uses, its objective and its batch sampling."""
from .loop import (CancelToken, ProgressEvent, Trainable, TrainConfig, latest_checkpoint, train)
from .objective import DenoisingObjective

__all__ = ["CancelToken", "DenoisingObjective", "ProgressEvent", "Trainable", "TrainConfig", "latest_checkpoint",
           "train"]
