"""Calibration data in, per-layer activations out: what ``calibrate``, ``smooth_quantize`` and ``gptq_quantize`` share.

Calibration ``samples`` take two forms:

* one dataset: an array (or the model's input pytree, or a tuple of inputs for
  a model with several) whose axis 0 is split into batches of ``batch_size``;
* an iterable of batches: a ``list`` or an iterator / generator, each element
  one batch of the model's inputs (a tuple when it takes several).

Each batch runs the model once, jit-compiled per batch shape, in weight-only
mode, recording the input of every quantized dot product and convolution.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Iterator, Mapping
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

    Dot inputs have their contracted axes last, ordered like the kernel's axes;
    the second dict says which kernel axes those are (``None`` when a reshape of
    the kernel hides it; convolutions are absent from it).
    """
    variables = {k: v for k, v in qvariables.items() if k not in (ACT_COLLECTION, SMOOTH_COLLECTION)}
    contracted: dict[str, tuple[int, ...] | None] = {}

    def observe(v: Any, *xs: Any) -> dict[str, jax.Array]:
        session = _Session("weight_only", None, observe=True)
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
