"""The ``pmap`` path: the batch split across local devices, variables broadcast, for pmap-style code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import jax
import numpy as np

from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables
from jaxopt_serve.quant.qarray import has_qarrays
from jaxopt_serve.quant.runtime import inference_fn


def pmap_predict_fn(
    config: ModelConfig, *, devices: Sequence[jax.Device] | None = None, quant_mode: str = "auto"
) -> Callable[[Variables, Any], np.ndarray]:
    """``f(variables, x) -> outputs`` that runs ``x`` split across ``devices`` with ``jax.pmap``.

    The batch is padded to a multiple of the device count, reshaped to
    ``(devices, per_device, ...)`` and the outputs are flattened and cut back.
    Quantized variables run quantized.

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

    def predict(variables: Variables, x: Any) -> np.ndarray:
        quantized = has_qarrays(variables)
        if quantized not in compiled:
            base = inference_fn(config, variables, mode=quant_mode)
            compiled[quantized] = jax.pmap(base, in_axes=(None, 0), devices=devices)
        x = np.asarray(x)
        rows = len(x)
        per = -(-rows // n)
        padded = np.concatenate([x, np.zeros((per * n - rows, *x.shape[1:]), x.dtype)]) if per * n != rows else x
        out = compiled[quantized](variables, padded.reshape(n, per, *x.shape[1:]))
        out = np.asarray(out)
        return out.reshape(n * per, *out.shape[2:])[:rows]

    return predict
