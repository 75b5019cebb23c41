"""The one training loop every method uses, its objective and its batch sampling."""
from .loop import BesideTheBase, CancelToken, ProgressEvent, Trainable, TrainConfig, latest_checkpoint, train, training_seconds
from .objective import DenoisingObjective

__all__ = ["BesideTheBase", "CancelToken", "DenoisingObjective", "ProgressEvent", "Trainable", "TrainConfig", "latest_checkpoint",
           "train", "training_seconds"]
