"""Static activation scales for W8A8: one calibration pass over sample inputs."""

from __future__ import annotations

from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from jaxopt_serve.model import Model
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables
from jaxopt_serve.quant.observe import calibration_batches, calibration_model, is_batch_stream, observe_batches
from jaxopt_serve.quant.runtime import ACT_COLLECTION

ActCalibration = Literal["absmax", "percentile", "mse"]


def calibrate(
    model: Model | ModelConfig,
    qvariables: Variables,
    samples: Any,
    *,
    method: ActCalibration = "percentile",
    percentile: float = 99.99,
    batch_size: int = 64,
    max_values: int = 1 << 20,
    seed: int = 0,
    call_method: str | None = None,
    **apply_kwargs: Any,
) -> Variables:
    """Fix one int8 activation scale per quantized layer from ``samples``; returns the variables with them.

    The scales go into ``qvariables["quant_act"]`` (``{layer key: scale}``, see
    ``runtime.layer_key``), which ``quantized_predict_fn(model, mode="static")``
    reads and artifacts store.

    Args:
        model: a ``Model``, or a reference ``ModelConfig``.
        qvariables: output of ``quantize(...).variables``.
        samples: one dataset (an array or the model's input pytree, split along axis 0
            into batches of ``batch_size``) or a list / iterator of batches, e.g. a
            data loader (see ``quant.observe``).
        method: ``"absmax"`` (the largest magnitude seen), ``"percentile"`` (that
            percentile of the magnitudes) or ``"mse"`` (the clip minimizing the
            squared int8 rounding-plus-clipping error over the observed values).
        percentile: for ``method="percentile"``.
        batch_size: samples per calibration step when ``samples`` is one dataset.
        max_values: magnitudes kept per layer for percentile / MSE (a uniform subsample).
        seed: seeds that subsample.
        call_method, apply_kwargs: for reference Linen configs, the method the forward pass
            calls and its keyword arguments (a ``Model`` carries its own).

    Raises:
        ValueError: ``samples`` do not fit the model (the message gives their shape).

    Example:
        >>> import numpy as np
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> from jaxopt_serve.quant import quantize
        >>> cfg = MLPConfig(features=(16,))
        >>> q = calibrate(cfg, quantize(init_variables(cfg, 0)).variables, np.ones((8, 8, 8, 1), np.float32))
        >>> sorted(q["quant_act"])
        ['classifier', 'dense_0']
    """
    if method not in ("absmax", "percentile", "mse"):
        raise ValueError(f"method must be 'absmax', 'percentile' or 'mse', got {method!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    handle, samples = calibration_model(model, call_method, apply_kwargs, samples)
    if not is_batch_stream(samples) and not isinstance(samples, (tuple, dict)):
        samples = np.asarray(samples)
        if samples.ndim == 0 or len(samples) == 0:
            raise ValueError(f"calibration needs a non-empty batch of samples, got shape {samples.shape}")
    variables = {k: v for k, v in qvariables.items() if k != ACT_COLLECTION}
    rng = np.random.default_rng(seed)
    absmax: dict[str, float] = {}
    kept: dict[str, list[np.ndarray]] = {}
    per_batch = max(1, max_values // 16)
    for observed, _ in observe_batches(handle, variables, calibration_batches(handle, samples, batch_size)):
        for path, x in observed.items():
            mags = np.abs(x).ravel()
            absmax[path] = max(absmax.get(path, 0.0), float(mags.max()) if mags.size else 0.0)
            if method != "absmax":
                if mags.size > per_batch:
                    mags = rng.choice(mags, per_batch, replace=False)
                kept.setdefault(path, []).append(mags)
    scales = {}
    for path, peak in absmax.items():
        if method == "absmax":
            clip = peak
        else:
            mags = np.concatenate(kept[path])
            if mags.size > max_values:
                mags = rng.choice(mags, max_values, replace=False)
            clip = float(np.percentile(mags, percentile)) if method == "percentile" else _mse_clip(mags, peak)
        scales[path] = jnp.asarray(max(clip, 1e-12) / 127.0, jnp.float32)
    return {**variables, ACT_COLLECTION: scales}


_MSE_CLIP_RATIOS = np.linspace(0.2, 1.0, 41)  # _mse_clip's default search grid


def _mse_clip(mags: np.ndarray, peak: float, ratios: np.ndarray = _MSE_CLIP_RATIOS) -> float:
    best, best_err = peak, np.inf
    for ratio in ratios:
        clip = peak * float(ratio)
        if clip <= 0:
            continue
        scale = clip / 127.0
        err = float(np.mean((np.minimum(np.round(mags / scale), 127.0) * scale - mags) ** 2))
        if err < best_err:
            best, best_err = clip, err
    return best
