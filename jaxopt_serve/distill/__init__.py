"""Knowledge distillation: softened-logit KL x T^2 plus hard labels, hidden-state losses, a resumable trainer,
and ``distill_models`` for any teacher and student ``Model``."""

from jaxopt_serve.distill.losses import distillation_loss, hidden_cosine, hidden_mse, soft_kl
from jaxopt_serve.distill.models import ModelDistillResult, distill_models
from jaxopt_serve.distill.trainer import (
    DistillConfig,
    DistillResult,
    distill,
    load_checkpoint,
    save_checkpoint,
    teacher_fn,
    validation_split,
)

__all__ = [
    "DistillConfig",
    "DistillResult",
    "ModelDistillResult",
    "distill",
    "distill_models",
    "distillation_loss",
    "hidden_cosine",
    "hidden_mse",
    "load_checkpoint",
    "save_checkpoint",
    "soft_kl",
    "teacher_fn",
    "validation_split",
]
