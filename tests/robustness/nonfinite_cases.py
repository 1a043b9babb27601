"""Cases for the non-finite input policy: small models, batches with chosen batch-mates, and a count of failures.

Shared by ``test_nonfinite.py`` and ``benchmarks/robustness_report.py``
(``nonfinite_batch_dependence_cases``): a case is one row (finite, all NaN,
one NaN pixel, one +inf or -inf pixel) at one position of a bucket, run with
several sets of batch-mates (finite, NaN, inf, zero rows, and fewer rows so
that padding fills the bucket). It fails when the row's outputs are not
bit-identical across the mates (a finite row) or not all NaN (a non-finite
row).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxopt_serve.engine import InferenceEngine
from jaxopt_serve.models import CNNConfig, MLPConfig, init_variables
from jaxopt_serve.quant import QuantRule, QuantSpec, quantize

CNN = CNNConfig(channels=(8, 16), hidden=16)
MLP = MLPConfig(features=(16,))
SHAPE = (8, 8, 1)
MAX_BATCH = 8
KINDS = ("finite", "nan", "nan_pixel", "inf_pixel", "neg_inf_pixel")
MATES = ("finite", "nan", "inf", "zeros")


def random_variables(config: Any, seed: int = 0) -> Any:
    """Random variables shaped like the model's (positive batch-norm variances), without an eager Flax init."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_variables(config, 0))

    def leaf(path: Any, s: Any) -> np.ndarray:
        x = rng.normal(size=s.shape).astype(s.dtype)
        return np.abs(x) if path[-1].key == "var" else x

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.cache
def engines(nan_policy: str = "propagate") -> dict[str, InferenceEngine]:
    """The float and int8 reference CNN and MLP, each an engine with buckets (1, 2, 4, 8), compiled once."""
    out = {}
    for name, config, seed in (("cnn", CNN, 2), ("mlp", MLP, 3)):
        variables = random_variables(config, seed)
        int8 = quantize(variables, [QuantRule(r"params/.*/kernel", QuantSpec(qtype="int8"))]).variables
        out[name] = InferenceEngine(config, variables, max_batch=MAX_BATCH, nan_policy=nan_policy)
        # "dynamic": the int8 activation quantizer is where NaN used to turn into finite logits
        out[f"{name}_int8"] = InferenceEngine(
            config, int8, max_batch=MAX_BATCH, quant_mode="dynamic", nan_policy=nan_policy
        )
    return out


def row(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One input row of the given kind (``KINDS`` for the row under test, ``MATES`` for its batch-mates)."""
    x = rng.normal(size=SHAPE).astype(np.float32)
    if kind == "zeros":
        return np.zeros(SHAPE, np.float32)
    if kind == "nan":
        return np.full(SHAPE, np.nan, np.float32)
    if kind == "inf":
        x[...] = np.inf
    pixel = tuple(int(rng.integers(d)) for d in SHAPE)
    if kind == "nan_pixel":
        x[pixel] = np.nan
    elif kind == "inf_pixel":
        x[pixel] = np.inf
    elif kind == "neg_inf_pixel":
        x[pixel] = -np.inf
    return x


def check_row(
    engine: Callable[[np.ndarray], Any], target: np.ndarray, position: int, mate_sets: list[np.ndarray]
) -> str | None:
    """Run ``target`` at ``position`` among each set of mates (rows of the batch other than ``position``).

    Returns ``None`` when the row's outputs are bit-identical across the sets
    (finite target) or all NaN (non-finite target), else what went wrong.
    """
    outs = []
    for mates in mate_sets:
        batch = np.concatenate([mates[:position], target[None], mates[position:]])
        outs.append(np.asarray(engine(batch))[position])
    if np.isfinite(target).all():
        for i, out in enumerate(outs[1:], 1):
            if not np.array_equal(out, outs[0]):
                return f"finite row differs with mates set {i}: max |diff| {np.nanmax(np.abs(out - outs[0])):.3g}"
        if not np.isfinite(outs[0]).all():
            return "finite row gave non-finite outputs"
        return None
    for i, out in enumerate(outs):
        if not np.isnan(out).all():
            return f"non-finite row gave finite outputs with mates set {i}: {out[:3]}"
    return None


def nonfinite_batch_dependence_cases(*, seed: int = 0, failures: list[str] | None = None) -> int:
    """How many (model, bucket, row kind, position) cases give a row an output that depends on its batch-mates.

    ``failures`` (a list) receives one line per failing case. Zero is the target.
    """
    rng = np.random.default_rng(seed)
    failed = 0
    for name, engine in engines("propagate").items():
        for bucket in engine.buckets:
            for kind in KINDS:
                target = row(kind, rng)
                for position in sorted({0, bucket - 1}):
                    mate_sets = [
                        np.stack([row(m, rng) for _ in range(bucket - 1)])
                        if bucket > 1
                        else np.zeros((0, *SHAPE), np.float32)
                        for m in MATES
                    ]
                    mate_sets.append(
                        np.stack([row(str(rng.choice(MATES)), rng) for _ in range(bucket - 1)])
                        if bucket > 1
                        else np.zeros((0, *SHAPE), np.float32)
                    )
                    problem = check_row(engine, target, position, mate_sets)
                    if problem is None and bucket > 2:  # fewer real rows in the same bucket: padding fills it
                        half = bucket // 2 + 1
                        small = [m[: half - 1] for m in mate_sets]
                        problem = check_row(engine, target, min(position, half - 1), small)
                    if problem is not None:
                        failed += 1
                        if failures is not None:
                            failures.append(f"{name} bucket {bucket} {kind} row at {position}: {problem}")
    return failed
