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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables
from jaxopt_serve.quant.rules import QuantRule, dequantize_tree, quantize
from jaxopt_serve.quant.runtime import SMOOTH_COLLECTION, observe_inputs


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
    alpha: float = 0.5,
    method: str | None = None,
    **apply_kwargs: Any,
) -> Variables:
    """Quantize ``variables`` by ``rules`` after SmoothQuant smoothing calibrated on ``samples``.

    Args:
        config: the model (Linen).
        variables: float variables.
        samples: a calibration batch (the model's input).
        rules: quantization rules (int8 per-channel kernels are the usual choice).
        alpha: migration strength, 0 (none) to 1 (all of it into the weights).
        method, apply_kwargs: what the forward pass calls, e.g. ``method="encode",
            attention_mask=mask`` for the Transformer's hidden states.

    Returns:
        Quantized variables with ``"quant_smooth"`` factors, for ``quantized_predict_fn`` /
        ``quantized_apply`` in any mode.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    probe = quantize(variables, rules).variables
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
        in_dims = kernel.shape[:n]
        x_absmax = np.abs(x.reshape(-1, *in_dims)).max(axis=0)
        w_absmax = np.abs(kernel.reshape(*in_dims, -1)).max(axis=-1)
        s = smooth_factors(x_absmax, w_absmax, alpha)
        target["kernel"] = jnp.asarray(kernel * s.reshape(*in_dims, *([1] * (kernel.ndim - n))))
        smooth[path] = s
    smoothed = {**variables, "params": params}
    return {**quantize(smoothed, rules).variables, SMOOTH_COLLECTION: smooth}


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
