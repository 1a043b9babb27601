"""Distillation between any two models: a teacher and a student ``Model`` (Linen, NNX or plain functions).

``distill_models`` runs the foundation's optax loop (``jaxopt_serve.train.fit``)
on an iterable of batches: the teacher runs in inference mode inside each
jit-compiled step, the student in training mode (its BatchNorm statistics and
NNX state are carried from step to step). The default loss is the project's
``alpha * T**2 * KL + (1 - alpha) * CE`` (``distillation_loss``); any
``loss(student_out, teacher_out, batch)`` replaces it. At the end the
student's BatchNorm statistics are re-estimated with its final weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import optax

from jaxopt_serve.distill.losses import check_temperature, distillation_loss, soft_kl
from jaxopt_serve.model import Model
from jaxopt_serve.train.batch_stats import reestimate_batch_stats
from jaxopt_serve.train.loop import BN_RNG_SALT, LogitsOf, _bn_batches, fit, select_logits

Variables = dict[str, Any]
DistillLoss = Callable[[Any, Any, Any], Any]


@dataclasses.dataclass
class ModelDistillResult:
    """What ``distill_models`` returns.

    Attributes:
        variables: the student's variables after the last step and the
            BatchNorm re-estimation (when it ran).
        trained_variables: the student's variables after the last step, before
            the re-estimation (the same as ``variables`` when it did not run).
        history: one entry per ``log_every`` steps: ``step``, ``loss`` and the
            loss parts (``soft``, ``hard`` for the default loss, or the metrics
            a custom loss returns).
        model: the student holding ``variables``.
        bn_reestimated: whether BatchNorm statistics were re-estimated.
    """

    variables: Variables
    trained_variables: Variables
    history: list[dict[str, float]]
    model: Model
    bn_reestimated: bool

    @property
    def losses(self) -> list[float]:
        """The ``loss`` of every history entry."""
        return [entry["loss"] for entry in self.history]


def distill_models(
    teacher: Model,
    student: Model,
    batches: Iterable[Any],
    *,
    steps: int,
    optimizer: optax.GradientTransformation | None = None,
    temperature: float = 2.0,
    alpha: float = 0.9,
    loss: DistillLoss | None = None,
    logits_of: LogitsOf | None = None,
    teacher_logits_of: LogitsOf | None = None,
    teacher_variables: Variables | None = None,
    student_variables: Variables | None = None,
    labeled: bool = True,
    reestimate_bn: bool | int = True,
    seed: int = 0,
    log_every: int = 1,
    progress: bool = False,
) -> ModelDistillResult:
    """Train ``student`` to match ``teacher`` for ``steps`` steps over ``batches``.

    Each batch is ``(inputs, labels)``, where ``inputs`` is what both models
    take (any pytree; a tuple for several positional inputs) and ``labels``
    are int class labels. With ``labeled=False`` each batch is the inputs
    alone: then only the soft term can be used (``alpha=1``) or a custom
    ``loss``. A list (re-iterable) of batches is cycled; an iterator or
    generator that runs out ends training early.

    By default the student's BatchNorm statistics are re-estimated at the end
    (``reestimate_bn=True``) over the first ``BN_BATCHES`` training batches,
    with its final weights (``jaxopt_serve.train.reestimate_batch_stats``);
    models without running statistics are unaffected.

    Args:
        teacher: the teacher ``Model``; it runs in inference mode, without gradients.
        student: the student ``Model``; it trains in training mode.
        batches: an iterable of batches (see above).
        steps: optimizer steps.
        optimizer: any optax transformation (default: ``default_optimizer(steps)``,
            AdamW with warm-up and cosine decay).
        temperature: softmax temperature ``T`` of the soft term (> 0).
        alpha: weight of the soft term; ``1 - alpha`` goes to the labels.
        loss: replaces the default loss: ``loss(student_out, teacher_out, batch)``
            returns a scalar, or ``(scalar, {name: scalar})`` to log parts.
        logits_of: maps the student's outputs to its logits (default: the
            outputs when they are an array, ``outputs["logits"]`` for a dict).
        teacher_logits_of: the same for the teacher (default: ``logits_of``).
        teacher_variables: the teacher's variables (default: ``teacher.variables``).
        student_variables: the student's initial variables (default: ``student.variables``).
        labeled: whether batches carry labels (``(inputs, labels)``) or are the inputs alone.
        reestimate_bn: re-estimate the student's BatchNorm statistics at the end
            (an int: over that many batches).
        seed: seeds the per-step rng (dropout) and the re-estimation passes.
        log_every: steps per history entry (1: every step).
        progress: show a progress bar.

    Returns:
        ``ModelDistillResult`` with the student's variables and the loss history.

    Raises:
        ValueError: ``alpha < 1`` with unlabeled batches, teacher and student
            logits of different shapes, or an invalid option.

    Example:
        >>> import jax.numpy as jnp, numpy as np, optax
        >>> x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
        >>> teacher = Model.function(lambda w, x: x @ w, jnp.eye(4), x)
        >>> student = Model.function(lambda w, x: x @ w, jnp.zeros((4, 4)), x)
        >>> result = distill_models(teacher, student, [(x, x.argmax(-1))], steps=30,
        ...                         optimizer=optax.adam(0.1))
        >>> result.losses[-1] < result.losses[0]
        True
    """
    for role, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, Model):
            raise TypeError(f"distill_models: the {role} must be a jaxopt_serve Model, got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    temperature = check_temperature(temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (weight of the soft term) must be in [0, 1], got {alpha!r}")
    if loss is None and not labeled and alpha != 1.0:
        raise ValueError(
            f"unlabeled batches (labeled=False) need alpha=1 (soft loss only) or a custom loss, got alpha={alpha}"
        )
    bn_batches = _bn_batches(reestimate_bn, student)
    if optimizer is None:
        from jaxopt_serve.train.recipes import default_optimizer

        optimizer = default_optimizer(steps)
    teacher_vars = jax.device_put(teacher.variables if teacher_variables is None else teacher_variables)
    student_vars = student.variables if student_variables is None else student_variables
    teacher_logits_of = teacher_logits_of or logits_of

    def loss_fn(params: Any, model_state: Variables, fed: Any, rng: jax.Array):
        teacher_vars, batch = fed  # the teacher's variables travel with the batch: jit arguments, not constants
        inputs, labels = batch if labeled else (batch, None)
        student_out, updates = student.apply_with_mode({"params": params, **model_state}, inputs, train=True, rng=rng)
        teacher_out = jax.lax.stop_gradient(teacher.apply_with_mode(teacher_vars, inputs)[0])
        if loss is not None:
            result = loss(student_out, teacher_out, batch)
            value, parts = result if isinstance(result, tuple) else (result, {})
        else:
            student_logits = select_logits(student_out, logits_of, f"student {student.name!r}")
            teacher_logits = select_logits(teacher_out, teacher_logits_of, f"teacher {teacher.name!r}")
            if labels is None:
                value = soft_kl(student_logits, teacher_logits, temperature)
                parts = {"soft": value}
            else:
                value, parts = distillation_loss(
                    student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha
                )
        return value, ({**model_state, **updates}, {"loss": value, **parts})

    kept: list[Any] = []
    result = fit(
        loss_fn,
        student_vars,
        batches=_feed(batches, teacher_vars, kept, bn_batches),
        optimizer=optimizer,
        steps=steps,
        seed=seed,
        log_every=log_every,
        progress=progress,
        reestimate_bn=False,
    )
    variables = result.variables
    reestimated = False
    if bn_batches and kept:
        inputs = [batch[0] if labeled else batch for batch in kept]
        rng = jax.random.fold_in(jax.random.key(seed), BN_RNG_SALT)
        new = reestimate_batch_stats(student, variables, inputs, rng=rng)
        reestimated = new is not variables
        variables = new
    return ModelDistillResult(
        variables=variables,
        trained_variables=result.variables,
        history=result.history,
        model=student.with_variables(variables),
        bn_reestimated=reestimated,
    )


def _feed(batches: Iterable[Any], teacher_vars: Variables, kept: list[Any], keep: int) -> Iterator[Any]:
    """``(teacher_vars, batch)`` for every batch (a re-iterable cycled), keeping the first ``keep`` batches."""
    reiterable = iter(batches) is not batches
    while True:
        empty = True
        for batch in batches:
            empty = False
            if len(kept) < keep:
                kept.append(batch)
            yield teacher_vars, batch
        if empty:
            raise ValueError("distill_models: batches is empty")
        if not reiterable:
            return
