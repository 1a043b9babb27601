"""Training: a seeded, jit-compiled optax loop reused by every chapter."""

from jaxopt_serve.train.batch_stats import reestimate_batch_stats
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
    "TrainState",
    "accuracy",
    "batch_indices",
    "classification_loss",
    "fit",
    "init_state",
    "make_train_step",
    "reestimate_batch_stats",
]
