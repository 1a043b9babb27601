"""Calibration data in, per-layer activations out: what ``calibrate``, ``smooth_quantize`` and ``gptq_quantize`` share.

Calibration ``samples`` take two forms:

* one dataset: an array (or the model's input pytree, or a tuple of inputs for
  a model with several) whose axis 0 is split into batches of ``batch_size``;
* an iterable of batches: a ``list`` or an iterator / generator, each element
  one batch of the model's inputs (a tuple when it takes several).

Each batch runs the model once, jit-compiled per batch shape, in weight-only
mode, recording the input of every quantized dot product and convolution.
A smoothed layer (``"quant_smooth"`` factors) scales its input by their
reciprocals, as it does when serving, and records the scaled input: what the
layer's integer dot quantizes, and what ``calibrate`` and GPTQ need.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxopt_serve.model import Model
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.quant.runtime import (
    ACT_COLLECTION,
    COLLECTIONS,
    SMOOTH_COLLECTION,
    _method_model,
    _run,
    _Session,
)

Observed = dict[str, np.ndarray]


def is_batch_stream(samples: Any) -> bool:
    """Whether ``samples`` is a sequence of batches (a list, an iterator, a generator) rather than one dataset."""
    if isinstance(samples, list):
        return True
    return isinstance(samples, collections.abc.Iterator)


def calibration_batches(model: Model, samples: Any, batch_size: int) -> Iterator[tuple[Any, ...]]:
    """The batches of ``samples`` (see the module docstring), each as a tuple of positional inputs."""
    n_inputs = len(model.example)
    if is_batch_stream(samples):
        for batch in samples:
            yield tuple(batch) if n_inputs > 1 else (batch,)
        return
    inputs = tuple(samples) if n_inputs > 1 else (samples,)
    leaves = jax.tree.leaves(inputs)
    if not leaves or np.ndim(leaves[0]) == 0:
        raise ValueError(f"calibration needs a batch of samples with a batch axis, got {samples!r:.80}")
    total = int(np.shape(leaves[0])[0])
    if total == 0:
        raise ValueError(f"calibration needs a non-empty batch of samples, got shape {np.shape(leaves[0])}")
    for start in range(0, total, batch_size):
        yield jax.tree.map(lambda a, s=start: np.asarray(a)[s : s + batch_size], inputs)


def calibration_model(
    model: Model | ModelConfig, method: str | None, kwargs: Mapping[str, Any], samples: Any = None
) -> tuple[Model, Any]:
    """``(handle, samples)``: ``model`` as a handle, and the samples as the handle takes them.

    ``method`` / ``kwargs`` (reference Linen configs only) choose what the
    forward pass calls. A keyword argument that is an array with one row per
    sample (an attention mask next to the token ids) is split into batches
    with the samples: it becomes an extra input of the handle.
    """
    if isinstance(model, Model):
        if method is not None or kwargs:
            raise ValueError(
                "method= and keyword arguments are for reference configs; "
                "build the Model with them instead (Model.linen(..., method=..., eval_kwargs=...))"
            )
        return model, samples
    if not isinstance(model, ModelConfig):
        raise TypeError(f"expected a jaxopt_serve Model or a ModelConfig, got {type(model).__name__}")
    total = None if samples is None or is_batch_stream(samples) else _rows(samples)
    per_sample = {k: v for k, v in kwargs.items() if total is not None and np.ndim(v) >= 1 and np.shape(v)[0] == total}
    if not per_sample:
        return _method_model(model, method, kwargs), samples
    fixed = {k: v for k, v in kwargs.items() if k not in per_sample}
    names = list(per_sample)
    module = model.build()

    def apply(variables: Any, x: Any, *rows: Any) -> Any:
        model_vars = {k: v for k, v in variables.items() if k not in COLLECTIONS}
        return module.apply(model_vars, x, method=method, **fixed, **dict(zip(names, rows)))

    example = (np.zeros((1,), np.float32),) * (1 + len(names))
    handle = Model(apply, None, {}, example, "config", model.name, model)
    return handle, (samples, *(per_sample[k] for k in names))


def _rows(samples: Any) -> int | None:
    """The length of the first leaf's axis 0, or ``None`` when it has none."""
    leaves = jax.tree.leaves(samples)
    return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) >= 1 else None


def observe_batches(
    model: Model, qvariables: Any, batches: Iterator[tuple[Any, ...]]
) -> Iterator[tuple[Observed, dict[str, tuple[int, ...] | None]]]:
    """Per batch: ``({layer key: input as numpy}, {layer key: kernel axes the dot contracts})``.

    Dot inputs have their contracted axes last, ordered like the kernel's axes,
    after any smoothing (``x * (1 / s)``); the second dict says which kernel axes those
    are (``None`` when a reshape of the kernel hides it; convolutions are absent from it).
    """
    variables = {k: v for k, v in qvariables.items() if k not in (ACT_COLLECTION, SMOOTH_COLLECTION)}
    smooth = qvariables.get(SMOOTH_COLLECTION)
    contracted: dict[str, tuple[int, ...] | None] = {}

    def observe(v: Any, *xs: Any) -> dict[str, jax.Array]:
        session = _Session("weight_only", None, observe=True, smooth=smooth)
        _run(model, v, xs, session)
        contracted.update(session.contracted)
        return session.observed

    jitted = jax.jit(observe)
    first = True
    for batch in batches:
        if first:  # shapes may differ from the example's (another sequence length): trace to check
            _check_fits(model, variables, batch, jitted)
        first = False
        out = jitted(variables, *batch)
        yield {k: np.asarray(x) for k, x in out.items()}, dict(contracted)
    if first:
        raise ValueError("calibration got no batches")


def _check_fits(model: Model, variables: Any, batch: tuple[Any, ...], jitted: Any) -> None:
    try:
        jax.eval_shape(jitted, variables, *batch)
    except Exception as err:  # noqa: BLE001 - any tracing failure means the shape does not fit
        shapes = [np.shape(x) for x in jax.tree.leaves(batch)]
        dtypes = [str(np.asarray(x).dtype) for x in jax.tree.leaves(batch)]
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"calibration samples of shape {shapes[0] if len(shapes) == 1 else shapes} (dtype "
            f"{dtypes[0] if len(dtypes) == 1 else dtypes}) do not fit the {model.name} model: "
            f"{type(err).__name__}: {first}"
        ) from err


def dense_inputs(
    observed: dict[str, np.ndarray], contracted: dict[str, Any], params: Any
) -> Iterator[tuple[str, np.ndarray, np.ndarray, int]]:
    """``(layer key, input, float kernel, n)`` for each observed dot that contracts the kernel's ``n`` leading axes.

    Convolutions and kernels contracted on other axes (e.g. ``x @ w.T``) are left out.
    """
    for key, x in observed.items():
        axes = contracted.get(key)
        if not axes or tuple(axes) != tuple(range(len(axes))):
            continue
        kernel = np.asarray(get_leaf(params, leaf_parts(params, key)), np.float32)
        n = len(axes)
        if kernel.ndim <= n or tuple(x.shape[x.ndim - n :]) != tuple(kernel.shape[:n]):
            continue
        yield key, x, kernel, n


def leaf_parts(params: Any, key: str) -> list[str]:
    """The path inside ``params`` of the kernel a layer key names (``key/kernel`` when that exists, else ``key``)."""
    parts = key.split("/") if key else []
    node = params
    for part in parts:
        node = node[part]
    return [*parts, "kernel"] if isinstance(node, dict) and "kernel" in node else parts


def get_leaf(tree: Any, parts: Sequence[str]) -> Any:
    for part in parts:
        tree = tree[part]
    return tree


def set_leaf(tree: dict, parts: Sequence[str], value: Any) -> None:
    """Replace a leaf of nested dicts in place (copy the dicts first with ``copy_tree``)."""
    for part in parts[:-1]:
        tree = tree[part]
    tree[parts[-1]] = value


def copy_tree(tree: Any) -> Any:
    """A copy of the nested dicts of ``tree`` (leaves shared), to replace leaves in."""
    return {k: copy_tree(v) for k, v in tree.items()} if isinstance(tree, dict) else tree
