"""Regularizers: L1, L2 and group lasso, as loss terms and as optax transforms.

The loss terms (``l1_penalty``, ``l2_penalty``, ``group_lasso_penalty``) are
pure functions of ``params``; ``regularized`` adds one to any ``LossFn`` of the
training loop. The transforms add the same (sub)gradient to the updates before
the optimizer: ``optax.chain(add_l1(1e-4), optax.adam(1e-3))``.

Group lasso sums, over groups of parameters that belong to one neuron,
channel or head (``structured.Group``), the L2 norm of the group scaled by the
square root of its size,

.. math::

    \\lambda \\sum_g \\sqrt{|g|} \\, \\lVert w_g \\rVert_2,

which pushes whole groups to zero, ahead of structured pruning.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_serve.prune.structured import Group
from jaxopt_serve.quant.rules import path_str
from jaxopt_serve.train.loop import LossFn

KERNELS = r"params/(.*/)?kernel"


def _selected(params: Any, pattern: str) -> list[jax.Array]:
    return [x for p, x in jax.tree_util.tree_leaves_with_path(params) if re.fullmatch(pattern, f"params/{path_str(p)}")]


def l1_penalty(params: Any, *, pattern: str = KERNELS) -> jax.Array:
    """``sum |w|`` over the leaves whose path (``params/...``) fully matches ``pattern``.

    Example:
        >>> import jax.numpy as jnp
        >>> float(l1_penalty({"d": {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([5.0])}}))
        3.0
    """
    return sum((jnp.abs(x).sum() for x in _selected(params, pattern)), jnp.zeros(()))


def l2_penalty(params: Any, *, pattern: str = KERNELS) -> jax.Array:
    """``sum w**2 / 2`` over the selected leaves."""
    return sum((0.5 * jnp.square(x).sum() for x in _selected(params, pattern)), jnp.zeros(()))


def group_norms(params: Any, groups: Sequence[Group]) -> dict[str, jax.Array]:
    """The L2 norm of each unit of each group, over the group's ``params`` slices (batch stats skipped)."""
    leaves = {f"params/{path_str(p)}": x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    norms = {}
    for group in groups:
        total = None
        for sl in group.slices:
            if sl.path not in leaves:
                if sl.path.startswith("params/"):
                    raise ValueError(f"group {group.name!r}: no parameter at {sl.path}")
                continue
            x = jnp.moveaxis(leaves[sl.path], sl.axis, 0)
            n = group.size or sl.units_in(x.shape[0])
            sq = jnp.square(x[sl.indices(n)].reshape(n, -1)).sum(axis=1)  # static indices: any Slice layout
            total = sq if total is None else total + sq
        norms[group.name] = jnp.sqrt(total + 1e-12)
    return norms


def group_sizes(params: Any, groups: Sequence[Group]) -> dict[str, int]:
    """Parameters per unit of each group (over its ``params`` slices)."""
    leaves = {f"params/{path_str(p)}": x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    sizes = {}
    for group in groups:
        count = 0
        for sl in group.slices:
            if sl.path in leaves:
                shape = np.shape(leaves[sl.path])
                count += sl.repeat * sl.block * int(np.prod(shape)) // shape[sl.axis]
        sizes[group.name] = count
    return sizes


def group_lasso_penalty(params: Any, groups: Sequence[Group]) -> jax.Array:
    """``sum_g sqrt(|g|) * ||w_g||_2`` over every unit of every group."""
    sizes = group_sizes(params, groups)
    norms = group_norms(params, groups)
    return sum((np.sqrt(sizes[name]) * norms[name].sum() for name in norms), jnp.zeros(()))


def regularized(loss_fn: LossFn, penalty, strength: float) -> LossFn:
    """``loss_fn`` plus ``strength * penalty(params)``; the penalty is reported as the metric ``"penalty"``."""
    if strength < 0:
        raise ValueError(f"regularization strength must be >= 0, got {strength}")

    def wrapped(params, model_state, batch, rng):
        loss, (state, metrics) = loss_fn(params, model_state, batch, rng)
        value = penalty(params)
        return loss + strength * value, (state, {**metrics, "penalty": value})

    return wrapped


def _add_gradient(penalty, strength: float) -> optax.GradientTransformation:
    if strength < 0:
        raise ValueError(f"regularization strength must be >= 0, got {strength}")

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("this regularizer needs params in update()")
        grads = jax.grad(penalty)(params)
        return jax.tree.map(lambda u, g: u + strength * g, updates, grads), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def add_l1(strength: float, *, pattern: str = KERNELS) -> optax.GradientTransformation:
    """Add ``strength * sign(w)`` (the L1 subgradient) to the updates of the selected leaves."""
    return _add_gradient(lambda p: l1_penalty(p, pattern=pattern), strength)


def add_l2(strength: float, *, pattern: str = KERNELS) -> optax.GradientTransformation:
    """Add ``strength * w`` (the L2 gradient) to the updates of the selected leaves."""
    return _add_gradient(lambda p: l2_penalty(p, pattern=pattern), strength)


def add_group_lasso(strength: float, groups: Sequence[Group]) -> optax.GradientTransformation:
    """Add the group-lasso gradient ``strength * sqrt(|g|) * w_g / ||w_g||`` to the updates."""
    groups = list(groups)
    return _add_gradient(lambda p: group_lasso_penalty(p, groups), strength)
