"""GPTQ (Frantar et al., 2023): weight-only quantization that corrects each rounding error with the next weights.

Rounding every weight to its nearest level (RTN) treats the errors as
independent. GPTQ quantizes a Dense kernel one input row at a time and
moves each row's rounding error onto the rows not yet quantized, weighted
by the inverse Hessian ``H = X^T X`` of the layer's calibration inputs, so
that the layer's *output* ``x W`` changes as little as possible:

.. math::

    \\delta = \\frac{w_i - q(w_i)}{[H^{-1}]_{ii}}, \\qquad
    W_{j,:} \\mathrel{-}= [H^{-1}]_{ij}\\, \\delta \\quad (j > i).

Per-group scales (and zero points) are chosen as the rows of the group are
reached, from the already-corrected weights, with the spec's calibration
(absmax or MSE clip); per-channel kernels keep round-to-nearest's ranges,
which span the whole input axis. The result is an ordinary ``QArray`` of the
rule's spec: serving, artifacts and size are those of round-to-nearest. Only
int8 / int4 kernels of Dense-like layers (inputs contracted over leading
kernel axes) with ``"channel"`` granularity on an output axis or
``"group"`` granularity along an input axis are handled; other quantized
leaves keep round-to-nearest. Smoothed layers (``smooth_quantize(...,
rounding="gptq")``) are corrected for their smoothed inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_serve.model import Model
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables
from jaxopt_serve.quant.observe import (
    calibration_batches,
    calibration_model,
    copy_tree,
    dense_inputs,
    get_leaf,
    leaf_parts,
    observe_batches,
    set_leaf,
)
from jaxopt_serve.quant.qarray import QArray, QuantSpec, _integer, is_qarray, pack
from jaxopt_serve.quant.rules import QuantRule, first_match, quantize


def gptq_quantize(
    model: Model | ModelConfig,
    variables: Variables,
    samples: Any,
    rules: Sequence[QuantRule],
    *,
    damp: float = 0.01,
    method: str | None = None,
    batch_size: int = 64,
    **apply_kwargs: Any,
) -> Variables:
    """Quantize ``variables`` by ``rules``, with GPTQ error correction on Dense-like int kernels.

    The Hessian ``H = X^T X`` of each layer is accumulated over every
    calibration batch, so a data loader of any length can feed it.

    Args:
        model: a ``Model``, or a reference ``ModelConfig``.
        variables: float variables; with a ``"quant_smooth"`` collection, its factors
            are taken to be in the kernels already, and the layers' inputs are scaled
            by their reciprocals.
        samples: one calibration dataset or a list / iterator of batches (``quant.observe``).
        rules: quantization rules, as for ``quantize``.
        damp: added to the Hessian's diagonal, as a fraction of its mean.
        method, apply_kwargs: for reference Linen configs, what the forward pass calls
            (e.g. ``method="encode", attention_mask=mask``); a ``Model`` carries its own.
        batch_size: samples per step when ``samples`` is one dataset.

    Returns:
        Quantized variables, for ``quantized_predict_fn`` in ``"weight_only"`` mode
        (or any mode, for int8).

    Example:
        >>> import jax
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> cfg = MLPConfig(features=(64,), num_classes=4, input_shape=(32,))
        >>> v = init_variables(cfg, 0)
        >>> spec = QuantSpec(qtype="int4", granularity="group", group_size=16)
        >>> q = gptq_quantize(cfg, v, jax.random.normal(jax.random.key(1), (64, 32)), [QuantRule(".*kernel", spec)])
        >>> q["params"]["dense_0"]["kernel"]
        QArray(int4, shape=(32, 64), group, axis=0, group_size=16, 1536 bytes)
    """
    check_damp(damp)
    handle, samples = calibration_model(model, method, apply_kwargs, samples)
    rtn = quantize(variables, rules).variables
    hessians: dict[str, np.ndarray] = {}
    for observed, contracted in observe_batches(handle, rtn, calibration_batches(handle, samples, batch_size)):
        for key, x, kernel, n in dense_inputs(observed, contracted, variables["params"]):
            accumulate_hessian(hessians, key, x, kernel.shape[:n])
    return gptq_round(rtn, variables["params"], hessians, rules, damp=damp)


def check_damp(damp: float) -> None:
    """GPTQ's damping must be a positive fraction (checked before any calibration pass)."""
    if not damp > 0:
        raise ValueError(f"damp must be > 0, got {damp!r}")


def accumulate_hessian(hessians: dict[str, np.ndarray], key: str, x: np.ndarray, in_dims: tuple[int, ...]) -> None:
    """Add ``X^T X`` of layer inputs ``x`` (trailing axes ``in_dims``, flattened) to ``hessians[key]``, in float64."""
    x = np.asarray(x, np.float64).reshape(-1, int(np.prod(in_dims)))
    h = x.T @ x
    hessians[key] = hessians[key] + h if key in hessians else h


def gptq_round(
    qvariables: Variables,
    float_params: Any,
    hessians: dict[str, np.ndarray],
    rules: Sequence[QuantRule],
    *,
    damp: float = 0.01,
) -> Variables:
    """``qvariables`` (``quantize(variables, rules).variables``) with GPTQ in place of round-to-nearest.

    Each layer key in ``hessians`` (``X^T X`` of that layer's calibration inputs,
    as its dot quantizes them) whose kernel in ``float_params`` (the float,
    already smoothed kernels) has a supported rule is re-quantized with error
    correction; every other leaf is kept.
    """
    check_damp(damp)
    params = copy_tree(qvariables["params"])
    for key, h in hessians.items():
        parts = leaf_parts(float_params, key)
        index = first_match("params/" + "/".join(parts), rules)
        if index is None:
            continue
        kernel = np.asarray(get_leaf(float_params, parts), np.float32)
        set_leaf(params, parts, gptq_kernel(kernel, h, rules[index].spec, get_leaf(params, parts), damp=damp))
    return {**qvariables, "params": params}


def gptq_kernel(kernel: np.ndarray, h: np.ndarray, spec: QuantSpec, like: Any, *, damp: float = 0.01) -> Any:
    """``like``, the round-to-nearest ``QArray`` of ``kernel`` by ``spec``, rounded by GPTQ for the Hessian ``h``.

    ``like`` comes back unchanged when its spec or layout is not one GPTQ handles
    (see the module docstring) or ``h`` fits no leading axes of ``kernel``.
    """
    n_in = _n_in(kernel.shape, h.shape[0])
    if n_in == 0 or not is_qarray(like) or not _supported(spec, like, n_in):
        return like
    return _gptq_kernel(kernel, h, spec, like, n_in, damp)


def _n_in(kernel_shape: tuple[int, ...], d_in: int) -> int:
    """How many leading kernel axes multiply to ``d_in``."""
    size = 1
    for n, dim in enumerate(kernel_shape[:-1], start=1):
        size *= dim
        if size == d_in:
            return n
    return 0


def _supported(spec: QuantSpec, q: QArray, n_in: int) -> bool:
    if spec.qtype not in ("int8", "int4"):
        return False
    if q.granularity == "channel":  # an output axis: (in, out) or DenseGeneral's (in, heads, head_dim)
        return q.axis >= n_in
    return q.granularity == "group" and q.axis < n_in and q.axis == n_in - 1


def _gptq_kernel(kernel: np.ndarray, h: np.ndarray, spec: QuantSpec, like: QArray, n_in: int, damp: float) -> QArray:
    d_in = h.shape[0]
    w = kernel.reshape(d_in, -1).astype(np.float64)
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(d_in)
    # Upper Cholesky factor of H^-1: row i holds the update of rows > i.
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    group = d_in if like.granularity == "channel" else like.group_size
    q = np.zeros_like(w, dtype=np.int8)
    scales, zeros = [], []
    qmax = 2 ** (spec.bits - 1) - 1
    lo, hi = (-qmax, qmax) if spec.symmetric else (-qmax - 1, qmax)
    block = group if group <= 128 else 128  # rows updated eagerly; later rows get the block's errors at once
    if like.granularity == "channel":  # the round-to-nearest ranges, one per output column
        scale, zero = (
            np.broadcast_to(np.asarray(a, np.float64), like.shape).reshape(d_in, -1)[0]
            for a in (like.scale, 0.0 if like.zero_point is None else like.zero_point)
        )
    for start in range(0, d_in, block):
        stop = min(start + block, d_in)
        if like.granularity == "group" and start % group == 0:  # its range from the already-corrected weights
            scale, zero = _group_range(jnp.asarray(w[start : start + group], jnp.float32), spec)
            scale, zero = np.asarray(scale, np.float64)[0], np.asarray(zero, np.float64)[0]
            scales.append(scale)
            zeros.append(zero)
        errors = np.zeros((stop - start, w.shape[1]))
        for i in range(start, stop):
            qi = np.clip(np.round(w[i] / scale) + zero, lo, hi)
            q[i] = qi
            errors[i - start] = (w[i] - (qi - zero) * scale) / hinv[i, i]
            w[i + 1 : stop] -= np.outer(hinv[i, i + 1 : stop], errors[i - start])
        w[stop:] -= hinv[start:stop, stop:].T @ errors  # the group's errors onto the later rows at once
    shape = like.shape
    values = q.reshape(shape)
    packed = jnp.asarray(values) if spec.bits == 8 else pack(jnp.asarray(values.reshape(-1)), spec.qtype)
    if like.granularity == "channel":
        scale_out, zero_out = like.scale, like.zero_point
    else:
        scale_shape = (*shape[: like.axis], shape[like.axis] // group, 1, *shape[like.axis + 1 :])
        scale_out = jnp.asarray(np.stack(scales).astype(np.float32).reshape(scale_shape))  # (groups, out)
        zero_out = None if spec.symmetric else jnp.asarray(np.stack(zeros).astype(np.int8).reshape(scale_shape))
    return QArray(
        values=packed,
        scale=scale_out,
        zero_point=zero_out,
        qtype=like.qtype,
        shape=like.shape,
        dtype=like.dtype,
        granularity=like.granularity,
        axis=like.axis,
        group_size=like.group_size,
    )


@functools.partial(jax.jit, static_argnames="spec")
def _group_range(w: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point (zeros when symmetric) of each column of ``w``, by the spec's calibration."""
    _, scale, zp = _integer(w, (0,), spec)
    return scale, jnp.zeros_like(scale) if zp is None else zp.astype(jnp.float32)
