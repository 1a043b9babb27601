"""GPTQ (Frantar et al., 2023): weight-only quantization that corrects each rounding error with the next weights.

Rounding every weight to its nearest level (RTN) treats the errors as
independent. GPTQ quantizes a Dense kernel one input row at a time and
moves each row's rounding error onto the rows not yet quantized, weighted
by the inverse Hessian ``H = X^T X`` of the layer's calibration inputs, so
that the layer's *output* ``x W`` changes as little as possible:

.. math::

    \\delta = \\frac{w_i - q(w_i)}{[H^{-1}]_{ii}}, \\qquad
    W_{j,:} \\mathrel{-}= [H^{-1}]_{ij}\\, \\delta \\quad (j > i).

Scales (and zero points) are chosen per group as the rows of the group are
reached, from the already-corrected weights, with the spec's calibration
(absmax or MSE clip). The result is an ordinary ``QArray`` of the rule's
spec: serving, artifacts and size are those of round-to-nearest. Only
int8 / int4 kernels of Dense-like layers (inputs contracted over leading
kernel axes) with ``"channel"`` (last axis) or ``"group"`` granularity along
an input axis are handled; other quantized leaves keep round-to-nearest.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables
from jaxopt_serve.quant.qarray import QArray, QuantSpec, _integer, pack
from jaxopt_serve.quant.rules import QuantRule, first_match, quantize
from jaxopt_serve.quant.runtime import SMOOTH_COLLECTION, observe_inputs
from jaxopt_serve.quant.smooth import contracted_dims, copy_tree, observed_layers


def gptq_quantize(
    config: ModelConfig,
    variables: Variables,
    samples: Any,
    rules: Sequence[QuantRule],
    *,
    damp: float = 0.01,
    method: str | None = None,
    **apply_kwargs: Any,
) -> Variables:
    """Quantize ``variables`` by ``rules``, with GPTQ error correction on Dense-like int kernels.

    Args:
        config: the model (Linen).
        variables: float variables (a ``"quant_smooth"`` collection from
            ``smooth_quantize`` is kept: its factors are already in the kernels).
        samples: a calibration batch (the model's input).
        rules: quantization rules, as for ``quantize``.
        damp: added to the Hessian's diagonal, as a fraction of its mean.
        method, apply_kwargs: what the forward pass calls (e.g. ``method="encode", attention_mask=mask``).

    Returns:
        Quantized variables, for ``quantized_apply`` / ``quantized_predict_fn`` in ``"weight_only"`` mode
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
    if not damp > 0:
        raise ValueError(f"damp must be > 0, got {damp!r}")
    rtn = quantize(variables, rules).variables
    observed = observe_inputs(config, rtn, samples, method=method, **apply_kwargs)
    smooth = variables.get(SMOOTH_COLLECTION, {})
    params = copy_tree(rtn["params"])
    for path, x, node, target in observed_layers(observed, variables["params"], params):
        name = f"params/{path}/kernel"
        index = first_match(name, rules)
        if index is None:
            continue
        spec = rules[index].spec
        kernel = np.asarray(node["kernel"], np.float32)
        x = np.asarray(x, np.float32)
        if path in smooth:
            x = x / np.asarray(smooth[path], np.float32)
        n_in = contracted_dims(x.shape, kernel.shape)
        qkernel = target["kernel"]
        if n_in == 0 or not _supported(spec, qkernel, n_in):
            continue
        target["kernel"] = _gptq_kernel(kernel, x.reshape(-1, int(np.prod(kernel.shape[:n_in]))), spec, qkernel, n_in,
                                        damp)
    return {**rtn, "params": params}


def _supported(spec: QuantSpec, q: QArray, n_in: int) -> bool:
    if spec.qtype not in ("int8", "int4"):
        return False
    if q.granularity == "channel":
        return q.axis == len(q.shape) - 1 and n_in == len(q.shape) - 1
    return q.granularity == "group" and q.axis < n_in and q.axis == n_in - 1


def _gptq_kernel(kernel: np.ndarray, x: np.ndarray, spec: QuantSpec, like: QArray, n_in: int, damp: float) -> QArray:
    d_in = x.shape[1]
    w = kernel.reshape(d_in, -1).astype(np.float64)
    h = x.T.astype(np.float64) @ x.astype(np.float64)
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
    for start in range(0, d_in, block):
        stop = min(start + block, d_in)
        if start % group == 0:  # a new group: its range from the already-corrected weights
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
    scale = np.stack(scales).astype(np.float32)  # (groups, out)
    zero = None if spec.symmetric else np.stack(zeros).astype(np.int8)
    if like.granularity == "channel":
        scale_shape = (*([1] * n_in), *shape[n_in:])
    else:
        scale_shape = (*shape[: like.axis], shape[like.axis] // group, 1, *shape[like.axis + 1 :])
    values = q.reshape(shape)
    packed = jnp.asarray(values) if spec.bits == 8 else pack(jnp.asarray(values.reshape(-1)), spec.qtype)
    return QArray(
        values=packed,
        scale=jnp.asarray(scale.reshape(scale_shape)),
        zero_point=None if zero is None else jnp.asarray(zero.reshape(scale_shape)),
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
