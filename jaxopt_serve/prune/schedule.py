"""Pruning during fine-tuning, as optax transformations.

``gradual_pruning`` wraps any optimizer: it raises the sparsity of the selected
leaves along the cubic schedule of Zhu & Gupta (2017),

.. math::

    s_t = s_f + (s_i - s_f) \\left(1 - \\frac{t - t_0}{t_1 - t_0}\\right)^3,
    \\qquad t_0 \\le t \\le t_1,

recomputing magnitude masks every ``frequency`` steps (and at ``t_1``), and
zeroes masked weights after every update, so they are exactly zero after
each optimizer step. Its state (step count, masks, the inner optimizer's
state) is a pytree of arrays: it checkpoints with the rest of the
``TrainState``. ``keep_masks`` holds fixed masks (one-shot pruning followed by
fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_serve.prune.masks import PruneRule, Scope, check_sparsity, compute_masks


def polynomial_sparsity(
    final: float, *, initial: float = 0.0, begin_step: int = 0, end_step: int, frequency: int = 1, power: int = 3
) -> Callable[[jax.Array | int], jax.Array]:
    """The Zhu & Gupta schedule as a function ``step -> sparsity`` (jit-friendly).

    Sparsity is 0 before ``begin_step``, changes only on update steps
    (``begin_step + k * frequency``, and ``end_step``), and equals ``final``
    from ``end_step`` on.

    Example:
        >>> schedule = polynomial_sparsity(0.8, begin_step=10, end_step=20, frequency=5)
        >>> [round(float(schedule(t)), 3) for t in (0, 10, 14, 15, 19, 20, 99)]
        [0.0, 0.0, 0.0, 0.7, 0.7, 0.8, 0.8]
    """
    check_sparsity(final, "polynomial_sparsity final")
    check_sparsity(initial, "polynomial_sparsity initial")
    if initial > final:
        raise ValueError(f"polynomial_sparsity: initial sparsity {initial} exceeds final {final}")
    if not 0 <= begin_step < end_step:
        raise ValueError(f"polynomial_sparsity needs 0 <= begin_step < end_step, got {begin_step} and {end_step}")
    if frequency <= 0:
        raise ValueError(f"polynomial_sparsity: frequency must be > 0, got {frequency}")

    def schedule(step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step, jnp.int32)
        last_update = begin_step + (jnp.minimum(step, end_step) - begin_step) // frequency * frequency
        last_update = jnp.where(step >= end_step, end_step, last_update)
        progress = (last_update - begin_step).astype(jnp.float32) / (end_step - begin_step)
        value = final + (initial - final) * (1.0 - progress) ** power
        return jnp.where(step < begin_step, 0.0, value)

    return schedule


def is_update_step(step: jax.Array | int, *, begin_step: int, end_step: int, frequency: int) -> jax.Array:
    """Whether masks are recomputed at ``step``."""
    step = jnp.asarray(step, jnp.int32)
    on_grid = (step >= begin_step) & (step <= end_step) & ((step - begin_step) % frequency == 0)
    return on_grid | (step == end_step)


class GradualPruningState(NamedTuple):
    """State of ``gradual_pruning``: optimizer steps taken, current masks, the inner optimizer's state."""

    count: jax.Array
    masks: Any
    inner_state: optax.OptState


def gradual_pruning(
    inner: optax.GradientTransformation,
    rules: Sequence[PruneRule],
    *,
    begin_step: int,
    end_step: int,
    frequency: int = 10,
    initial_sparsity: float = 0.0,
    scope: Scope = "layer",
) -> optax.GradientTransformation:
    """``inner`` plus gradual magnitude pruning of the leaves ``rules`` select.

    Each selected leaf's sparsity follows ``polynomial_sparsity`` from
    ``initial_sparsity`` to its rule's sparsity; N:M rules apply their pattern
    from ``begin_step`` on. Masks are computed from the magnitudes of the
    weights after the update, and masked weights are set to exactly zero.

    Args:
        inner: the optimizer (e.g. ``default_optimizer(steps)``).
        rules: ``PruneRule`` list; first match wins.
        begin_step: first step that prunes (counting this transform's updates).
        end_step: the step at which the final sparsity is reached.
        frequency: steps between mask updates.
        initial_sparsity: sparsity at ``begin_step`` (capped at each rule's target).
        scope: ``"layer"`` or ``"global"`` ranking (see ``compute_masks``).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> params = {"dense": {"kernel": jnp.ones((8, 8))}}
        >>> opt = gradual_pruning(optax.sgd(0.1), [PruneRule(r".*kernel", 0.5)], begin_step=0, end_step=4, frequency=2)
        >>> state = opt.init(params)
        >>> for _ in range(5):
        ...     updates, state = opt.update({"dense": {"kernel": jnp.ones((8, 8))}}, state, params)
        ...     params = optax.apply_updates(params, updates)
        >>> float((params["dense"]["kernel"] == 0).mean())
        0.5
    """
    rules = list(rules)
    check_sparsity(initial_sparsity, "gradual_pruning initial_sparsity")
    steps = dict(begin_step=begin_step, end_step=end_step, frequency=frequency)
    polynomial_sparsity(0.0, **steps)  # check the step arguments now, not at the first update

    def init(params: Any) -> GradualPruningState:
        masks = compute_masks(params, rules, scope=scope, sparsity_at=lambda target: 0.0)
        masks = jax.tree.map(jnp.ones_like, masks)  # dense until begin_step (N:M rules included)
        return GradualPruningState(jnp.zeros((), jnp.int32), masks, inner.init(params))

    def update(updates: Any, state: GradualPruningState, params: Any = None):
        if params is None:
            raise ValueError("gradual_pruning needs params in update()")
        updates, inner_state = inner.update(updates, state.inner_state, params)
        candidate = optax.apply_updates(params, updates)
        count = state.count

        def sparsity_at(target: float) -> jax.Array:  # each rule follows its own schedule to its target
            return polynomial_sparsity(target, initial=min(initial_sparsity, target), **steps)(count)

        def recompute() -> Any:
            return compute_masks(candidate, rules, scope=scope, sparsity_at=sparsity_at)

        prune_now = is_update_step(count, **steps)
        masks = jax.lax.cond(prune_now, recompute, lambda: state.masks)
        out = jax.tree.map(
            lambda m, c, p: c - p if m is None else jnp.where(m, c, jnp.zeros_like(c)) - p,
            masks,
            candidate,
            params,
            is_leaf=lambda x: x is None,
        )
        return out, GradualPruningState(count + 1, masks, inner_state)

    return optax.GradientTransformation(init, update)


class KeepMasksState(NamedTuple):
    """``keep_masks`` is stateless apart from its masks."""

    masks: Any


def keep_masks(masks: Any) -> optax.GradientTransformation:
    """Zero the updates of masked-out entries, so weights pruned to zero stay exactly zero.

    Chain it after the optimizer: ``optax.chain(default_optimizer(n), keep_masks(masks))``.
    """

    def init(params: Any) -> KeepMasksState:
        del params
        return KeepMasksState(masks)

    def update(updates: Any, state: KeepMasksState, params: Any = None):
        del params
        out = jax.tree.map(
            lambda m, u: u if m is None else jnp.where(m, u, jnp.zeros_like(u)),
            state.masks,
            updates,
            is_leaf=lambda x: x is None,
        )
        return out, state

    return optax.GradientTransformation(init, update)
