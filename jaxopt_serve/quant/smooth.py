"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8 quantization.

For a Dense layer ``y = x W``, per input channel ``j``,

.. math::

    s_j = \\frac{\\max |x_j|^{\\alpha}}{\\max |W_{j,:}|^{1 - \\alpha}}, \\qquad
    y = (x / s) (s W),

so a channel with huge activations (BERT has a few) is scaled down before
the per-token int8 quantization of ``x``, and its weights scaled up, where
per-channel weight scales absorb them. The factors ``s`` are stored under
``variables["quant_smooth"]`` by layer path; the quantized runtime multiplies
each smoothed layer's input by their reciprocals (in every mode). Only Dense and
DenseGeneral layers are smoothed.

``alpha`` may also be a grid of candidates: each layer then takes the one whose
quantized output (the int8 kernel and the runtime's per-token activation
quantization, on the calibration inputs) is closest to the float output in
mean squared error, the per-layer search the paper suggests in place of one
global value. ``asymmetric`` marks layers whose inputs are one-signed or
skewed (the FFN output layer reads a GELU's output) for asymmetric per-token
activations (``runtime.mark_asymmetric``); the search scores those layers
that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxopt_serve.model import Model
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables
from jaxopt_serve.quant.gptq import accumulate_hessian, check_damp, gptq_round
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
from jaxopt_serve.quant.qarray import QuantSpec, quantize_array
from jaxopt_serve.quant.rules import QuantRule, dequantize_tree, first_match, quantize
from jaxopt_serve.quant.runtime import (
    ASYM_COLLECTION,
    SMOOTH_COLLECTION,
    _mark_bits,
    mark_asymmetric,
    quantized_dot,
)


def smooth_factors(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """``s = amax_x**alpha / amax_w**(1 - alpha)``, 1 where a channel is silent, clipped to [1e-4, 1e4].

    Example:
        >>> smooth_factors(np.array([100.0, 1.0, 0.0]), np.array([1.0, 1.0, 1.0]), 0.5).tolist()
        [10.0, 1.0, 1.0]
    """
    s = np.power(np.maximum(x_absmax, 1e-12), alpha) / np.power(np.maximum(w_absmax, 1e-12), 1.0 - alpha)
    s = np.where((x_absmax > 0) & (w_absmax > 0), s, 1.0)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def smooth_quantize(
    model: Model | ModelConfig,
    variables: Variables,
    samples: Any,
    rules: Sequence[QuantRule],
    *,
    alpha: float | Sequence[float] = 0.5,
    asymmetric: str | None = None,
    asymmetric_bits: int = 8,
    rounding: str = "nearest",
    damp: float = 0.01,
    method: str | None = None,
    batch_size: int = 64,
    max_rows: int = 4096,
    **apply_kwargs: Any,
) -> Variables:
    """Quantize ``variables`` by ``rules`` after SmoothQuant smoothing calibrated on ``samples``.

    Works on any ``Model`` (Linen, NNX, plain function): every quantized kernel
    consumed by a dot product that contracts its leading axes is smoothed; the
    others (convolutions, kernels used transposed) are quantized unsmoothed.

    Args:
        model: a ``Model``, or a reference ``ModelConfig``.
        variables: float variables.
        samples: one calibration dataset or a list / iterator of batches (``quant.observe``).
        rules: quantization rules (int8 per-channel kernels are the usual choice).
        alpha: migration strength, 0 (none) to 1 (all of it into the weights);
            or several candidates, searched per layer (see the module docstring).
        asymmetric: a regular expression of layer keys (e.g. ``"layer_[0-9]+/output"``)
            whose inputs are quantized asymmetrically at run time; ``None``: none.
        asymmetric_bits: their grid, 8 or 7 bits (``runtime.mark_asymmetric``; 7 is the faster
            native AVX2 path).
        rounding: ``"nearest"``, or ``"gptq"``: the smoothed kernels are rounded by
            GPTQ (``quant.gptq``) for the Hessian of the smoothed inputs from the same calibration
            pass; same storage and speed, usually less output error (with few calibration
            tokens it can fit them too closely: see the MiniLM benchmark notes).
        damp: GPTQ's damping, as a fraction of the Hessian's mean diagonal.
        method, apply_kwargs: for reference Linen configs, what the forward pass calls, e.g.
            ``method="encode", attention_mask=mask`` (a ``Model`` carries its own).
        batch_size: samples per step when ``samples`` is one dataset.
        max_rows: input rows per layer kept for the alpha search: a uniform sample over every
            batch (seeded), so batches sorted by length do not leave it only the shortest.

    Returns:
        Quantized variables with ``"quant_smooth"`` factors (and ``"quant_asym"``
        marks), for ``quantized_predict_fn`` in any mode.

    Raises:
        ValueError: an alpha outside [0, 1], an unknown ``rounding``, variables already smoothed,
            or an ``asymmetric`` pattern that matches no quantized layer.
    """
    if rounding not in ("nearest", "gptq"):
        raise ValueError(f"rounding must be 'nearest' or 'gptq', got {rounding!r}")
    if variables.get(SMOOTH_COLLECTION):
        raise ValueError(f"variables already hold {SMOOTH_COLLECTION!r} factors: smooth the float variables once")
    check_damp(damp)
    rules = list(rules)
    grid = [float(a) for a in (np.atleast_1d(alpha) if not isinstance(alpha, (int, float)) else [alpha])]
    if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
        raise ValueError(f"alpha must be in [0, 1] (or a non-empty sequence of such values), got {alpha!r}")
    handle, samples = calibration_model(model, method, apply_kwargs, samples)
    probe = quantize(variables, rules).variables
    if asymmetric is not None:
        probe = mark_asymmetric(probe, asymmetric, bits=asymmetric_bits)
    marks = probe.get(ASYM_COLLECTION, {})
    float_params = dequantize_tree(variables)["params"]
    x_absmax: dict[str, np.ndarray] = {}
    rows: dict[str, RowSample] = {}
    hessians: dict[str, np.ndarray] = {}
    for observed, contracted in observe_batches(handle, probe, calibration_batches(handle, samples, batch_size)):
        for key, x, kernel, n in dense_inputs(observed, contracted, float_params):
            x = x.reshape(-1, *kernel.shape[:n])
            peak = np.abs(x).max(axis=0)
            x_absmax[key] = np.maximum(x_absmax[key], peak) if key in x_absmax else peak
            if key not in rows:
                rows[key] = RowSample(max_rows)
            rows[key].add(x)
            if rounding == "gptq":
                accumulate_hessian(hessians, key, x, kernel.shape[:n])
    smooth: dict[str, np.ndarray] = {}
    params = copy_tree(variables["params"])
    for key, peak in x_absmax.items():
        parts = leaf_parts(float_params, key)
        kernel = np.asarray(get_leaf(float_params, parts), np.float32)
        n = peak.ndim
        if len(grid) == 1:
            best = grid[0]
        else:
            rule = first_match("params/" + "/".join(parts), rules)
            spec = rules[rule].spec if rule is not None and rules[rule].spec is not None else QuantSpec()
            best, _ = search_alpha(
                rows[key].rows(),
                kernel,
                spec,
                grid,
                act_symmetric=key not in marks,
                act_bits=_mark_bits(key, marks[key]) if key in marks else 8,
            )
        w_absmax = np.abs(kernel.reshape(*kernel.shape[:n], -1)).max(axis=-1)
        s = smooth_factors(peak, w_absmax, best)
        set_leaf(params, parts, jnp.asarray(kernel * _broadcast(s, kernel.ndim)))
        smooth[key] = s
    smoothed = {**variables, "params": params}
    result = {**quantize(smoothed, rules).variables, SMOOTH_COLLECTION: smooth}
    if hessians:  # of the unsmoothed inputs x; the kernels now see x / s
        scaled = {k: h / np.outer(smooth[k].ravel(), smooth[k].ravel()) for k, h in hessians.items()}
        result = gptq_round(result, params, scaled, rules, damp=damp)
    return {**result, ASYM_COLLECTION: marks} if marks else result


class RowSample:
    """A uniform sample of at most ``size`` rows of everything ``add`` saw (reservoir sampling, seeded).

    Example:
        >>> sample = RowSample(4)
        >>> for start in range(0, 100, 10):
        ...     sample.add(np.arange(start, start + 10)[:, None])
        >>> sample.rows().shape, sample.seen
        ((4, 1), 100)
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seen = size, 0
        self._rows: np.ndarray | None = None
        self._rng = np.random.default_rng(seed)

    def add(self, x: np.ndarray) -> None:
        """Offer the rows of ``x`` (axis 0), in order."""
        if self._rows is None:
            self._rows = np.empty((self.size, *x.shape[1:]), x.dtype)
        fill = min(max(self.size - self.seen, 0), len(x))
        self._rows[self.seen : self.seen + fill] = x[:fill]
        index = self.seen + np.arange(fill, len(x))  # row index i takes a random slot w.p. size / (i + 1)
        slots = self._rng.integers(0, index + 1) if len(index) else index
        keep = slots < self.size
        self._rows[slots[keep]] = x[fill:][keep]  # a slot drawn twice keeps the later row, as one by one would
        self.seen += len(x)

    def rows(self) -> np.ndarray:
        """The sampled rows, in the order they were kept."""
        assert self._rows is not None, "no rows were added"
        return self._rows[: min(self.seen, self.size)]


def search_alpha(
    x: np.ndarray,
    kernel: np.ndarray,
    spec: QuantSpec,
    grid: Sequence[float],
    *,
    act_symmetric: bool = True,
    act_bits: int = 8,
) -> tuple[float, list[float]]:
    """The ``alpha`` in ``grid`` whose smoothed W8A8 output of ``x @ kernel`` has the least mean squared error.

    ``x`` is a calibration input whose trailing axes the kernel's leading axes
    contract; the output is computed as the ``"dynamic"`` runtime does, with
    the kernel rounded to nearest (also for ``rounding="gptq"``: scored on
    the inputs it was fitted to, GPTQ would favour extreme factors).
    Returns the best alpha and the error of every candidate.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(256, 16)).astype(np.float32)
        >>> x[:, 3] *= 50  # one outlier channel, as in BERT's hidden states
        >>> best, errors = search_alpha(x, rng.normal(size=(16, 8)).astype(np.float32), QuantSpec(), [0.0, 0.5])
        >>> best, errors[1] < errors[0]
        (0.5, True)
    """
    n = contracted_dims(x.shape, kernel.shape)
    if n == 0:
        raise ValueError(f"input of shape {x.shape} does not contract kernel of shape {kernel.shape}")
    x = np.asarray(x, np.float32).reshape(-1, *kernel.shape[:n])
    exact = x.reshape(len(x), -1) @ kernel.reshape(-1, int(np.prod(kernel.shape[n:])))
    absmax = _absmax(x, kernel, n)
    errors = []
    for a in grid:
        s = smooth_factors(*absmax, a)
        q = quantize_array(jnp.asarray(kernel * _broadcast(s, kernel.ndim)), spec)
        y = quantized_dot(
            jnp.asarray(x * (np.float32(1) / s)),  # as served: x * (1 / s)
            q,
            n_contract=n,
            mode="dynamic",
            act_symmetric=act_symmetric,
            act_bits=act_bits,
        )
        errors.append(float(np.mean((np.asarray(y).reshape(exact.shape) - exact) ** 2)))
    return float(grid[int(np.argmin(errors))]), errors


def _absmax(x: np.ndarray, kernel: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per input channel: the activations' and the kernel's absolute maxima (shaped like the input dims)."""
    in_dims = kernel.shape[:n]
    return np.abs(x.reshape(-1, *in_dims)).max(axis=0), np.abs(kernel.reshape(*in_dims, -1)).max(axis=-1)


def _broadcast(s: np.ndarray, kernel_ndim: int) -> np.ndarray:
    """Input-channel factors shaped to multiply a kernel of rank ``kernel_ndim``."""
    return s.reshape(*s.shape, *([1] * (kernel_ndim - s.ndim)))


def contracted_dims(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> int:
    """How many leading kernel axes the input's trailing axes contract with (0: no Dense-like contraction).

    Example:
        >>> contracted_dims((8, 5, 12, 32), (12, 32, 384)), contracted_dims((8, 7), (3, 3, 7, 16))
        (2, 0)
    """
    return next(
        (
            k
            for k in range(min(len(x_shape), len(kernel_shape) - 1), 0, -1)
            if tuple(x_shape[-k:]) == tuple(kernel_shape[:k])
        ),
        0,
    )
