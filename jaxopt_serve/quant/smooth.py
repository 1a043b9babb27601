"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8 quantization.

For a Dense layer ``y = x W``, per input channel ``j``,

.. math::

    s_j = \\frac{\\max |x_j|^{\\alpha}}{\\max |W_{j,:}|^{1 - \\alpha}}, \\qquad
    y = (x / s) (s W),

so a channel with huge activations (BERT has a few) is scaled down before
the per-token int8 quantization of ``x``, and its weights scaled up, where
per-channel weight scales absorb them. The factors ``s`` are stored under
``variables["quant_smooth"]`` by layer path; the quantized runtime divides
each smoothed layer's input by them (in every mode). Only Dense and
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

from collections.abc import Iterator, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables
from jaxopt_serve.quant.qarray import QuantSpec, quantize_array
from jaxopt_serve.quant.rules import QuantRule, dequantize_tree, first_match, quantize
from jaxopt_serve.quant.runtime import (
    ASYM_COLLECTION,
    SMOOTH_COLLECTION,
    mark_asymmetric,
    observe_inputs,
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
    config: ModelConfig,
    variables: Variables,
    samples: Any,
    rules: Sequence[QuantRule],
    *,
    alpha: float | Sequence[float] = 0.5,
    asymmetric: str | None = None,
    method: str | None = None,
    **apply_kwargs: Any,
) -> Variables:
    """Quantize ``variables`` by ``rules`` after SmoothQuant smoothing calibrated on ``samples``.

    Args:
        config: the model (Linen).
        variables: float variables.
        samples: a calibration batch (the model's input).
        rules: quantization rules (int8 per-channel kernels are the usual choice).
        alpha: migration strength, 0 (none) to 1 (all of it into the weights);
            or several candidates, searched per layer (see the module docstring).
        asymmetric: a regular expression of layer paths (e.g. ``"layer_[0-9]+/output"``)
            whose inputs are quantized asymmetrically at run time; ``None``: none.
        method, apply_kwargs: what the forward pass calls, e.g. ``method="encode",
            attention_mask=mask`` for the Transformer's hidden states.

    Returns:
        Quantized variables with ``"quant_smooth"`` factors (and ``"quant_asym"``
        marks), for ``quantized_predict_fn`` / ``quantized_apply`` in any mode.

    Raises:
        ValueError: an alpha outside [0, 1], or an ``asymmetric`` pattern that matches no quantized layer.
    """
    rules = list(rules)
    grid = [float(a) for a in (np.atleast_1d(alpha) if not isinstance(alpha, (int, float)) else [alpha])]
    if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
        raise ValueError(f"alpha must be in [0, 1] (or a non-empty sequence of such values), got {alpha!r}")
    probe = quantize(variables, rules).variables
    if asymmetric is not None:
        probe = mark_asymmetric(probe, asymmetric)
    marks = probe.get(ASYM_COLLECTION, {})
    observed = observe_inputs(config, probe, samples, method=method, **apply_kwargs)
    float_params = dequantize_tree(variables)["params"]
    smooth: dict[str, np.ndarray] = {}
    params = copy_tree(variables["params"])
    for path, x, node, target in observed_layers(observed, float_params, params):
        if "kernel" not in node or np.ndim(node["kernel"]) < 2 or np.ndim(node["kernel"]) > 3 + 1:
            continue
        kernel = np.asarray(node["kernel"], np.float32)
        x = np.asarray(x, np.float32)
        n = contracted_dims(x.shape, kernel.shape)
        if n == 0 or kernel.ndim == 4:  # no Dense-like contraction (e.g. a conv): leave it
            continue
        if len(grid) == 1:
            best = grid[0]
        else:
            rule = first_match(f"params/{path}/kernel", rules)
            spec = rules[rule].spec if rule is not None and rules[rule].spec is not None else QuantSpec()
            best, _ = search_alpha(x, kernel, spec, grid, act_symmetric=path not in marks)
        s = smooth_factors(*_absmax(x, kernel, n), best)
        target["kernel"] = jnp.asarray(kernel * _broadcast(s, kernel.ndim))
        smooth[path] = s
    smoothed = {**variables, "params": params}
    result = {**quantize(smoothed, rules).variables, SMOOTH_COLLECTION: smooth}
    return {**result, ASYM_COLLECTION: marks} if marks else result


def search_alpha(
    x: np.ndarray, kernel: np.ndarray, spec: QuantSpec, grid: Sequence[float], *, act_symmetric: bool = True
) -> tuple[float, list[float]]:
    """The ``alpha`` in ``grid`` whose smoothed W8A8 output of ``x @ kernel`` has the least mean squared error.

    ``x`` is a calibration input whose trailing axes the kernel's leading axes
    contract; the output is computed as the ``"dynamic"`` runtime does.
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
        y = quantized_dot(jnp.asarray(x / s), q, n_contract=n, mode="dynamic", act_symmetric=act_symmetric)
        errors.append(float(np.mean((np.asarray(y).reshape(exact.shape) - exact) ** 2)))
    return float(grid[int(np.argmin(errors))]), errors


def _absmax(x: np.ndarray, kernel: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per input channel: the activations' and the kernel's absolute maxima (shaped like the input dims)."""
    in_dims = kernel.shape[:n]
    return np.abs(x.reshape(-1, *in_dims)).max(axis=0), np.abs(kernel.reshape(*in_dims, -1)).max(axis=-1)


def _broadcast(s: np.ndarray, kernel_ndim: int) -> np.ndarray:
    """Input-channel factors shaped to multiply a kernel of rank ``kernel_ndim``."""
    return s.reshape(*s.shape, *([1] * (kernel_ndim - s.ndim)))


def copy_tree(tree: Any) -> Any:
    """A copy of the nested dicts of ``tree`` (leaves shared), to replace leaves in."""
    return {k: copy_tree(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def observed_layers(observed: dict[str, Any], source: dict, target: dict) -> Iterator[tuple[str, Any, dict, dict]]:
    """``(path, input, source node, target node)`` per observed layer, the nodes found by the layer path."""
    for path, x in observed.items():
        node, out = source, target
        for part in path.split("/"):
            node, out = node[part], out[part]
        yield path, x, node, out


def contracted_dims(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> int:
    """How many leading kernel axes the input's trailing axes contract with (0: no Dense-like contraction).

    Example:
        >>> contracted_dims((8, 5, 12, 32), (12, 32, 384)), contracted_dims((8, 7), (3, 3, 7, 16))
        (2, 0)
    """
    return next((k for k in range(min(len(x_shape), len(kernel_shape) - 1), 0, -1)
                 if tuple(x_shape[-k:]) == tuple(kernel_shape[:k])), 0)
