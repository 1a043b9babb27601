"""Static activation scales for W8A8: one calibration pass over sample inputs."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables
from jaxopt_serve.quant.runtime import ACT_COLLECTION, observe_inputs

ActCalibration = Literal["absmax", "percentile", "mse"]


def calibrate(
    config: ModelConfig,
    qvariables: Variables,
    samples: np.ndarray,
    *,
    method: ActCalibration = "percentile",
    percentile: float = 99.99,
    batch_size: int = 64,
    max_values: int = 1 << 20,
    seed: int = 0,
) -> Variables:
    """Fix one int8 activation scale per quantized layer from ``samples``; returns the variables with them.

    The scales go into ``qvariables["quant_act"]`` (``{layer path: scale}``),
    which ``quantized_predict_fn(config, mode="static")`` reads and artifacts store.

    Args:
        config: the model.
        qvariables: output of ``quantize(...).variables``.
        samples: inputs shaped like the model's (batch axis first), e.g. training images.
        method: ``"absmax"`` (the largest magnitude seen), ``"percentile"`` (that
            percentile of the magnitudes) or ``"mse"`` (the clip minimizing the
            squared int8 rounding-plus-clipping error over the observed values).
        percentile: for ``method="percentile"``.
        batch_size: samples per calibration step.
        max_values: magnitudes kept per layer for percentile / MSE (a uniform subsample).
        seed: seeds that subsample.

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
    samples = np.asarray(samples)
    if samples.ndim == 0 or len(samples) == 0:
        raise ValueError(f"calibration needs a non-empty batch of samples, got shape {samples.shape}")
    variables = {k: v for k, v in qvariables.items() if k != ACT_COLLECTION}
    observe = jax.jit(lambda v, x: observe_inputs(config, v, x))
    batch_size = min(batch_size, len(samples))
    try:
        jax.eval_shape(observe, variables, jax.ShapeDtypeStruct((batch_size, *samples.shape[1:]), samples.dtype))
    except Exception as err:  # noqa: BLE001 - any tracing failure means the shape does not fit
        raise ValueError(
            f"calibration samples of shape {samples.shape} (dtype {samples.dtype}) do not fit the "
            f"{config.name} model: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    rng = np.random.default_rng(seed)
    absmax: dict[str, float] = {}
    kept: dict[str, list[np.ndarray]] = {}
    batches = range(0, len(samples), batch_size)
    per_batch = max(1, max_values // len(batches))
    for start in batches:
        chunk = samples[start : start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        for path, x in observe(variables, chunk).items():
            mags = np.abs(np.asarray(x)[:n]).ravel()
            absmax[path] = max(absmax.get(path, 0.0), float(mags.max()))
            if method != "absmax":
                if mags.size > per_batch:
                    mags = rng.choice(mags, per_batch, replace=False)
                kept.setdefault(path, []).append(mags)
    scales = {}
    for path, peak in absmax.items():
        if method == "absmax":
            clip = peak
        elif method == "percentile":
            clip = float(np.percentile(np.concatenate(kept[path]), percentile))
        else:
            clip = _mse_clip(np.concatenate(kept[path]), peak)
        scales[path] = jnp.asarray(max(clip, 1e-12) / 127.0, jnp.float32)
    return {**variables, ACT_COLLECTION: scales}


def _mse_clip(mags: np.ndarray, peak: float, ratios: np.ndarray = np.linspace(0.2, 1.0, 41)) -> float:
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
