"""Export a model's inference function with ``jax.export``: one file that runs without the model's code.

The function is exported with a symbolic batch dimension ``b`` (axis 0 of
every input leaf), so one artifact serves every batch size; leaves named in
``length_axes`` share a second symbolic dimension ``l`` (any sequence length).
Inputs and outputs are pytrees. The variables travel as arrays next to the
function, each stored under its path (``params/dense_0/kernel``) and listed in
the header with its shape and dtype. The exported function itself takes them
as a dict keyed by path, so the loader binds them by path and refuses an
artifact whose variables do not match the function by name, shape or dtype; the tree
structure, quantization metadata included, is baked into the exported
function. ``jaxopt_serve.exported.load_exported`` reads it back using only JAX
and NumPy. Serialization needs the ``flatbuffers`` package (the ``export``
extra).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxopt_serve import native
from jaxopt_serve.engine.pytrees import axes_per_leaf, leaf_names, slash_names
from jaxopt_serve.exported import pack_exported
from jaxopt_serve.extras import require
from jaxopt_serve.fileio import atomic_write
from jaxopt_serve.model import Model, as_model
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables
from jaxopt_serve.quant.qarray import has_qarrays
from jaxopt_serve.quant.runtime import inference_fn


def export_model(
    path: str | os.PathLike[str],
    model: Model | ModelConfig,
    variables: Variables | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    quant_mode: str = "weight_only",
    platforms: Sequence[str] | None = None,
    length_axes: Any = None,
) -> int:
    """Write ``model``'s inference function and ``variables`` to ``path``; returns the file size.

    Args:
        path: the exported artifact to write (atomically).
        model: a ``Model``, or a reference ``ModelConfig`` (with ``variables``).
        variables: float or quantized variables (default: the ``Model`` 's own).
        input_shape: one example's shape, for a ``ModelConfig`` (default: the config's).
        quant_mode: execution mode of quantized variables (``weight_only`` exports
            for any backend; ``dynamic`` is the int8 path).
        platforms: backends to export for (default: the current one), e.g. ``("cpu", "cuda")``.
        length_axes: a pytree prefix of the inputs (as passed to the model: the
            input itself, or a tuple for several) giving the axis of each leaf
            that takes any length (a second symbolic dimension shared by all of
            them), or ``None``; e.g. ``{"input_ids": 1, "attention_mask": 1}``.

    Example:
        >>> import os, tempfile, numpy as np
        >>> from jaxopt_serve.exported import load_exported
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> cfg = MLPConfig(features=(8,))
        >>> path = os.path.join(tempfile.mkdtemp(), "mlp.jxe")
        >>> size = export_model(path, cfg, init_variables(cfg, 0))
        >>> load_exported(path)(np.zeros((3, 8, 8, 1), np.float32)).shape
        (3, 10)
    """
    require("flatbuffers", extra="export", purpose="serializing jax.export artifacts")
    from jax import export

    if isinstance(model, Model):
        if input_shape is not None:
            raise ValueError("input_shape= is for a ModelConfig; a Model carries its example inputs")
        variables = model.variables if variables is None else variables
    elif variables is None:
        raise ValueError(f"a {type(model).__name__} needs its variables: export_model(path, config, variables)")
    handle = as_model(model, variables, input_shape=input_shape)
    example = handle.example
    axes = [None] * len(jax.tree.leaves(example))
    if length_axes is not None:
        prefix = (length_axes,) if len(example) == 1 else tuple(length_axes)
        axes = axes_per_leaf(prefix, example)
        for name, leaf, axis in zip(leaf_names(example), jax.tree.leaves(example), axes):
            if axis is not None and axis >= leaf.ndim:
                raise ValueError(
                    f"length_axes: {name} has shape (batch, {', '.join(map(str, leaf.shape[1:]))}), no axis {axis}"
                )

    all_leaves, treedef = jax.tree.flatten(dict(variables))
    all_paths = slash_names(dict(variables), empty="variables")
    # RNG keys (an NNX model's dropout streams) have no numpy form; inference does not read them: baked in.
    is_key = [jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key) for leaf in all_leaves]
    # stored as the function sees them: float64 numpy leaves run as float32 unless jax_enable_x64 is on
    leaves = [_canonical(leaf) for leaf, key in zip(all_leaves, is_key) if not key]
    paths = [path for path, key in zip(all_paths, is_key) if not key]
    base = inference_fn(model, variables, mode=quant_mode)

    if len(set(paths)) != len(paths):
        raise ValueError(f"variables have duplicate paths: {sorted(p for p in paths if paths.count(p) > 1)[:5]}")

    def run(named: dict[str, jax.Array], inputs: tuple[Any, ...]) -> Any:
        stored = iter([named[p] for p in paths])
        full = [leaf if key else next(stored) for leaf, key in zip(all_leaves, is_key)]
        return base(jax.tree.unflatten(treedef, full), *inputs)

    batch, length = export.symbolic_shape("b, l")
    input_specs = _input_specs(example, axes, batch, length)
    leaf_specs = {p: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype) for p, leaf in zip(paths, leaves)}
    # The file must run without jaxopt_serve (and on other platforms): XLA's own integer ops, not the native
    # kernels' FFI calls, which only this package registers.
    with native.use_kernel("xla"):
        exported = export.export(jax.jit(run), platforms=platforms)(leaf_specs, input_specs)
    out_names = leaf_names(exported.out_tree.unflatten([0] * exported.out_tree.num_leaves), root="outputs")

    inputs = []
    for name, leaf, axis in zip(leaf_names(example), jax.tree.leaves(example), axes):
        shape: list[int | None] = [None, *map(int, leaf.shape[1:])]
        if axis is not None:
            shape[axis] = None
        inputs.append({"name": name, "shape": shape, "dtype": str(leaf.dtype), "length_axis": axis})
    header: dict[str, Any] = {
        "model": handle.name,
        "num_inputs": len(example),
        "inputs": inputs,
        "outputs": [
            {"name": n, "shape": [d if isinstance(d, int) else None for d in a.shape], "dtype": str(a.dtype)}
            for n, a in zip(out_names, exported.out_avals)
        ],
        # listed in the order the function takes them (a dict flattens in sorted key order)
        "variables": [
            {"path": p, "shape": list(np.shape(leaf)), "dtype": str(leaf.dtype)}
            for p, leaf in sorted(zip(paths, leaves), key=lambda item: item[0])
        ],
        "platforms": list(exported.platforms),
        "quantized": has_qarrays(variables),
    }
    if len(example) == 1 and isinstance(example[0], np.ndarray) and length_axes is None:
        header["input_shape"], header["input_dtype"] = list(example[0].shape[1:]), str(example[0].dtype)
    by_path = dict(zip(paths, leaves))
    data = pack_exported(
        header,
        exported.serialize(),
        [np.asarray(jax.device_get(by_path[spec["path"]])) for spec in header["variables"]],
    )
    atomic_write(path, data)
    return len(data)


def _canonical(leaf: Any) -> Any:
    """``leaf`` in the dtype JAX computes with: every 64-bit dtype narrowed (float64 to float32, int64 to int32,
    ...) unless x64 is on, so the stored variables match what the exported function was traced with."""
    dtype = jax.dtypes.canonicalize_dtype(leaf.dtype)
    return leaf if leaf.dtype == dtype else np.asarray(jax.device_get(leaf)).astype(dtype)


def _input_specs(example: tuple[Any, ...], axes: list[int | None], batch: Any, length: Any) -> tuple[Any, ...]:
    ex_leaves, ex_tree = jax.tree.flatten(example)
    specs = []
    for leaf, axis in zip(ex_leaves, axes):
        shape = [batch, *leaf.shape[1:]]
        if axis is not None:
            shape[axis] = length
        specs.append(jax.ShapeDtypeStruct(tuple(shape), leaf.dtype))
    return jax.tree.unflatten(ex_tree, specs)
