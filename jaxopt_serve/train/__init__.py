"""Training: a seeded, jit-compiled optax loop reused by every chapter, and its orbax checkpoints."""

from jaxopt_serve.train.batch_stats import reestimate_batch_stats
from jaxopt_serve.train.checkpoint import Restored, latest_step, restore_checkpoint, save_checkpoint
from jaxopt_serve.train.loop import (
    FitResult,
    LossFn,
    TrainState,
    accuracy,
    batch_indices,
    classification_loss,
    fit,
    init_state,
    make_train_step,
)
from jaxopt_serve.train.recipes import default_optimizer, train_classifier

__all__ = [
    "default_optimizer",
    "train_classifier",
    "FitResult",
    "LossFn",
    "Restored",
    "TrainState",
    "accuracy",
    "batch_indices",
    "classification_loss",
    "fit",
    "init_state",
    "latest_step",
    "make_train_step",
    "reestimate_batch_stats",
    "restore_checkpoint",
    "save_checkpoint",
]
