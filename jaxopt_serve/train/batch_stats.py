"""Re-estimate BatchNorm running statistics of any model: Linen ``batch_stats``, NNX ``BatchStat`` state, or yours.

Running means and variances are moving averages over the last training
steps, taken while the weights were still moving. After fine-tuning,
distillation, quantization or pruning, recomputing them once with the final
weights over a few calibration batches removes that lag.

How the exact average is obtained whatever the module's momentum: every
running statistic is updated by a training step as
``new = momentum * old + (1 - momentum) * batch_statistic``. Two training-mode
passes over the same batch, one from all-zero and one from all-one
statistics, give ``z = (1 - momentum) * s`` and ``o = momentum + z``, hence
``s = z / (1 - (o - z))`` without knowing ``momentum`` (the module's own
formula is used, so the mean and the biased variance are exactly what its
BatchNorm computes). The result is the unweighted mean of the per-batch
statistics over the calibration batches, like PyTorch's ``update_bn``
(cumulative average, ``momentum=None``). In float32 the solve loses about
``2**-24 / (1 - momentum)`` in relative precision (~1e-6 at momentum 0.9,
~1e-5 at 0.99).

Which leaves are statistics: every floating-point leaf of a non-``params``
collection that the training step updates. Leaves it leaves untouched,
integer leaves (NNX RNG counters) and PRNG keys keep their values.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_serve.model import LIBRARY_COLLECTIONS, Model

Variables = dict[str, Any]


def reestimate_batch_stats(
    model: Model,
    variables: Variables | None,
    batches: Iterable[Any],
    *,
    rng: jax.Array | int | None = 0,
    max_batches: int | None = None,
) -> Variables:
    """``variables`` with every running statistic set to its average over ``batches``.

    Each batch runs through ``model.train_step_apply`` (training mode: the
    module's own BatchNorm code, dropout on) twice; see the module docstring
    for why that yields the exact average for any momentum. Params and all
    other state are returned unchanged (the same objects where nothing changed).

    Args:
        model: any ``Model`` (Linen, NNX, function with a ``train_fn``, config).
        variables: the variables to recompute the statistics of (``None``: ``model.variables``).
        batches: an iterable of model inputs, one batch per item, in the
            structure the model takes (a tuple of them for several positional
            inputs); the inputs alone, not ``(inputs, labels)``.
        rng: PRNG key or seed for the training-mode passes (batch ``i`` gets
            ``fold_in(rng, i)``; both passes over a batch share it, so dropout
            masks match). ``None`` passes no key (an NNX model then uses its
            own RNG state).
        max_batches: use at most this many batches (for an endless iterator).

    Returns:
        The variables with the recomputed statistics.

    Raises:
        ValueError: no batch, a batch that does not match the model's inputs
            (the message names the leaf), or a floating-point state leaf the
            step updates that is not a moving average (the message names its path).

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> import flax.linen as nn
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, train: bool):
        ...         return nn.BatchNorm(use_running_average=not train)(x)
        >>> x = np.arange(12, dtype=np.float32).reshape(6, 2)
        >>> net = Net()
        >>> model = Model.linen(net, net.init(jax.random.key(0), x, False), x,
        ...                     eval_kwargs={"train": False}, train_kwargs={"train": True})
        >>> v = reestimate_batch_stats(model, None, [x[:3], x[3:]])
        >>> np.round(v["batch_stats"]["BatchNorm_0"]["mean"], 4).tolist()  # mean of [2, 3] and [8, 9]
        [5.0, 6.0]
    """
    if not isinstance(model, Model):
        raise TypeError(f"reestimate_batch_stats expects a jaxopt_serve Model, got {type(model).__name__}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches <= 0
    ):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    variables = model.variables if variables is None else variables
    state = {name: tree for name, tree in variables.items() if name != "params" and name not in LIBRARY_COLLECTIONS}
    if not any(_is_float(leaf) for leaf in jax.tree.leaves(state)):
        return variables
    key = jax.random.key(rng) if isinstance(rng, int) and not isinstance(rng, bool) else rng
    batch_statistics = _solver(model)

    totals: dict[str, np.ndarray] = {}
    untouched: dict[str, bool] = {}
    count = 0
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        inputs = _check_batch(model, batch, index)
        batch_key = None if key is None else jax.random.fold_in(key, index)
        for path, (stat, same) in batch_statistics(variables, inputs, batch_key).items():
            totals[path] = totals.get(path, 0.0) + np.asarray(stat, np.float64)
            untouched[path] = untouched.get(path, True) and bool(same)
        count += 1
    if count == 0:
        raise ValueError("reestimate_batch_stats needs at least one batch, got none")

    new: dict[str, np.ndarray] = {}
    for path, total in totals.items():
        if untouched[path]:
            continue
        average = total / count
        if not np.isfinite(average).all():
            raise ValueError(
                f"variables{path}: not a running statistic (its training-step update is not a moving average "
                f"with momentum < 1), or the inputs hold NaN/inf"
            )
        new[path] = average
    if not new:
        return variables

    changed: set[str] = set()

    def replace(path: tuple[Any, ...], leaf: Any) -> Any:
        name = jax.tree_util.keystr(path)
        if name not in new:
            return leaf
        changed.add(path[0].key)
        return jnp.asarray(new[name], dtype=jnp.result_type(leaf))

    rebuilt = jax.tree_util.tree_map_with_path(replace, state)
    return {**variables, **{name: rebuilt[name] for name in changed}}


_SOLVERS: weakref.WeakKeyDictionary[Model, Callable[..., Any]] = weakref.WeakKeyDictionary()


def _solver(model: Model) -> Callable[..., Any]:
    """``solve(variables, inputs, key) -> {path: (batch statistic, untouched)}``, jit-compiled once per model."""
    if model in _SOLVERS:
        return _SOLVERS[model]
    ref = weakref.ref(model)  # the cache entry must not keep its model alive

    @jax.jit
    def batch_statistics(
        variables: Variables, inputs: Any, key: jax.Array | None
    ) -> dict[str, tuple[jax.Array, jax.Array]]:
        state = {name: tree for name, tree in variables.items() if name != "params" and name not in LIBRARY_COLLECTIONS}

        def run(value: float) -> dict[str, jax.Array]:
            filled = jax.tree.map(lambda a: jnp.full_like(a, value) if _is_float(a) else a, state)
            _, updates = ref().apply_with_mode({**variables, **filled}, inputs, train=True, rng=key)
            return dict(_leaves(updates))

        at_zero, at_one = run(0.0), run(1.0)
        solved = {}
        for path, leaf in _leaves(state):
            if not _is_float(leaf) or path not in at_zero:  # not returned by the step: not a statistic
                continue
            z, o = at_zero[path].astype(jnp.float32), at_one[path].astype(jnp.float32)
            keep = 1.0 - (o - z)  # 1 - momentum
            stat = jnp.where(jnp.abs(keep) > 1e-6, z / jnp.where(keep == 0, 1.0, keep), jnp.nan)
            untouched = jnp.all(z == 0) & jnp.all(o == 1)
            solved[path] = (stat, untouched)
        return solved

    _SOLVERS[model] = batch_statistics
    return batch_statistics


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _is_float(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _check_batch(model: Model, batch: Any, index: int) -> Any:
    """``batch`` checked against the model's example inputs, in ``apply_with_mode``'s structure."""
    several = len(model.example) > 1
    inputs = tuple(batch) if several and isinstance(batch, (tuple, list)) else (batch,)
    try:
        checked = model.check_inputs(inputs)
    except ValueError as err:
        hint = "" if several else " (pass the inputs alone, not (inputs, labels))"
        raise ValueError(f"batch {index}: {err}{hint}") from err
    return tuple(checked) if several else checked[0]
