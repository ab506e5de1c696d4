"""The generic training loop, data streams, optimisers and training state."""

from polyclip.engine.loop import evaluate, train_one_epoch
from polyclip.engine.optim import LARS, build_optimizer, build_scheduler
from polyclip.engine.streams import ArrayLoader, zip_streams

__all__ = [
    "LARS",
    "ArrayLoader",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "train_one_epoch",
    "zip_streams",
]
