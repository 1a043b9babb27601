"""The ``pmap`` path: the batch split across local devices, variables broadcast, for pmap-style code."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxopt_serve.models.functional import Variables
from jaxopt_serve.quant.qarray import has_qarrays
from jaxopt_serve.quant.runtime import inference_fn


def pmap_predict_fn(
    config: Any, *, devices: Sequence[jax.Device] | None = None, quant_mode: str = "auto"
) -> Callable[..., Any]:
    """``f(variables, *inputs) -> outputs`` that runs the inputs split across ``devices`` with ``jax.pmap``.

    ``config`` is a ``Model`` (inputs and outputs any pytrees) or a reference
    ``ModelConfig``. Every input leaf is padded along axis 0 to a multiple of the
    device count and reshaped to ``(devices, per_device, ...)``; every output leaf
    is flattened back and cut to the batch. Quantized variables run quantized.

    Example:
        >>> import numpy as np
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> cfg = MLPConfig(features=(8,))
        >>> pmap_predict_fn(cfg)(init_variables(cfg, 0), np.zeros((5, 8, 8, 1), np.float32)).shape
        (5, 10)
    """
    devices = list(devices if devices is not None else jax.local_devices())
    n = len(devices)
    compiled: dict[bool, Any] = {}

    def predict(variables: Variables, *inputs: Any) -> Any:
        quantized = has_qarrays(variables)
        if quantized not in compiled:
            base = inference_fn(config, variables, mode=quant_mode)
            compiled[quantized] = jax.pmap(lambda v, xs: base(v, *xs), in_axes=(None, 0), devices=devices)
        inputs = jax.tree.map(np.asarray, inputs)
        rows = len(jax.tree.leaves(inputs)[0])
        per = -(-rows // n)

        def split(x: np.ndarray) -> np.ndarray:
            if per * n != rows:
                x = np.concatenate([x, np.zeros((per * n - rows, *x.shape[1:]), x.dtype)])
            return x.reshape(n, per, *x.shape[1:])

        out = compiled[quantized](variables, jax.tree.map(split, inputs))
        return jax.tree.map(lambda o: np.asarray(o).reshape(n * per, *o.shape[2:])[:rows], out)

    return predict
