"""One loader for every servable file: an artifact (``.jxs``: float, quantized or pruned) or an export (``.jxe``).

``load_servable(path)`` returns an ``InferenceEngine``: the compiled,
bucketed engine (``engine(batch) -> outputs``, numpy pytrees in and out). It
is what the scale-out paths (the Ray Data actor pool, the Ray Serve
deployment, the multi-process ``jaxopt-serve infer``) load in each worker from
the file's path: the model travels as a path to a file read by the package's
own checked loaders, never as a pickled object.

An exported ``.jxe`` runs through the same engine: its deserialized function
(symbolic batch axis) is compiled once per batch bucket, so a worker that sees
batches of every size compiles ``len(engine.buckets)`` times at most, exactly
like an artifact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxopt_serve.engine.engine import InferenceEngine
from jaxopt_serve.engine.nonfinite import NanPolicy


def load_servable(
    path: str | os.PathLike[str], *, max_batch: int = 256, nan_policy: NanPolicy = "propagate", warmup: bool = False
) -> InferenceEngine:
    """The compiled engine of the artifact or exported model at ``path``.

    Args:
        path: a ``.jxs`` artifact saved from a reference model (float,
            quantized or sparse layout), or a ``.jxe`` written by
            ``export_model`` / ``jaxopt-serve export``.
        max_batch: the largest bucket (rows per compiled call).
        nan_policy: rows with a NaN or inf float input (see ``InferenceEngine``).
        warmup: compile every bucket now.

    Raises:
        ValueError: the path does not end in ``.jxs`` or ``.jxe``, or the file
            is not a valid artifact or export (the message names the path).
        OSError: the file is missing or unreadable.

    Example:
        >>> import os, tempfile
        >>> from jaxopt_serve.artifact import Artifact, save_artifact
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> cfg = MLPConfig(features=(16,))
        >>> path = os.path.join(tempfile.mkdtemp(), "mlp.jxs")
        >>> _ = save_artifact(path, Artifact(cfg, init_variables(cfg, 0), (8, 8, 1)))
        >>> engine = load_servable(path, max_batch=8)
        >>> engine.buckets, engine(np.zeros((3, 8, 8, 1), np.float32)).shape
        ((1, 2, 4, 8), (3, 10))
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jxe":
        return _exported_engine(path, max_batch=max_batch, nan_policy=nan_policy, warmup=warmup)
    if suffix != ".jxs":
        raise ValueError(
            f"model path {path} must be an artifact (.jxs) or an exported model (.jxe), got the suffix {path.suffix!r}"
        )
    from jaxopt_serve.artifact import load_artifact

    artifact = load_artifact(path)
    engine = InferenceEngine(
        artifact.config,
        artifact.variables,
        input_shape=artifact.input_shape,
        max_batch=max_batch,
        nan_policy=nan_policy,
    )
    return engine.warmup() if warmup else engine


def _exported_engine(path: Path, *, max_batch: int, nan_policy: NanPolicy, warmup: bool) -> InferenceEngine:
    import jax

    from jaxopt_serve.exported import load_exported

    model = load_exported(path)
    if any(spec.get("length_axis") is not None for spec in model.inputs):
        names = [spec["name"] for spec in model.inputs if spec.get("length_axis") is not None]
        raise ValueError(
            f"exported model {path} has a symbolic sequence length (inputs {names}); "
            f"load_servable runs exports with fixed trailing shapes only: serve the artifact instead"
        )
    exported, variables = model._exported, model._leaves  # noqa: SLF001 - the same package's loader
    examples = [np.zeros((1, *spec["shape"][1:]), np.dtype(spec["dtype"])) for spec in model.inputs]
    (_, inputs), _ = jax.tree.unflatten(exported.in_tree, [None] * len(jax.tree.leaves(variables)) + examples)
    example = inputs if isinstance(inputs, tuple) else (inputs,)
    positional = isinstance(inputs, tuple)  # version >= 2: the function takes the tuple of positional inputs

    by_name = isinstance(variables, dict)  # version 3 binds variables by path; 1 and 2 by position
    if not by_name:
        variables = {str(i): leaf for i, leaf in enumerate(variables)}

    def predict(variables: Any, *xs: Any) -> Any:
        bound = variables if by_name else [variables[str(i)] for i in range(len(variables))]
        return exported.call(bound, xs if positional else xs[0])

    predict.__name__ = str(model.header.get("model", path.stem))
    engine = InferenceEngine(
        None, variables, predict=predict, example=example, max_batch=max_batch, nan_policy=nan_policy
    )
    return engine.warmup() if warmup else engine
