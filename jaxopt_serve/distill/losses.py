"""Distillation losses: softened-logit KL (Hinton et al., 2015), hard labels, hidden states.

The soft term compares the teacher's and the student's distributions at
temperature ``T`` and is scaled by ``T**2`` so its gradients keep their size
as ``T`` changes:

.. math::

    L = \\alpha \\, T^2 \\, \\mathrm{KL}\\big(\\mathrm{softmax}(z_t / T) \\,\\|\\, \\mathrm{softmax}(z_s / T)\\big)
        + (1 - \\alpha) \\, \\mathrm{CE}(y, \\mathrm{softmax}(z_s))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float, or ``ValueError`` unless it is > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature!r}")
    return float(temperature)


def soft_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """``T**2 * KL(teacher_T || student_T)``, averaged over the batch.

    Example:
        >>> import jax.numpy as jnp
        >>> z = jnp.array([[2.0, 0.0, -1.0]])
        >>> float(soft_kl(z, z, 4.0))
        0.0
        >>> float(soft_kl(jnp.zeros((1, 3)), z, 4.0)) > 0
        True
    """
    t = check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} differ: "
            f"teacher and student need the same number of outputs"
        )
    teacher_log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    student_log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
    return t * t * kl.mean()


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 2.0,
    alpha: float = 0.9,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``alpha * soft_kl + (1 - alpha) * cross_entropy(labels)``; returns the loss and its parts."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (weight of the soft term) must be in [0, 1], got {alpha!r}")
    soft = soft_kl(student_logits, teacher_logits, temperature)
    hard = optax.softmax_cross_entropy_with_integer_labels(student_logits.astype(jnp.float32), labels).mean()
    return alpha * soft + (1.0 - alpha) * hard, {"soft": soft, "hard": hard}


def hidden_mse(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Mean squared error between (projected) student and teacher hidden states."""
    return jnp.mean(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)))


def hidden_cosine(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """``1 - cosine similarity`` along the feature axis, averaged over every other axis."""
    s = student.astype(jnp.float32)
    t = teacher.astype(jnp.float32)
    cos = jnp.sum(s * t, -1) / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1) + 1e-8)
    return jnp.mean(1.0 - cos)


HIDDEN_LOSSES = {"mse": hidden_mse, "cosine": hidden_cosine}
