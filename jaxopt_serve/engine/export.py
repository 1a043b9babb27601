"""Export a model's inference function with ``jax.export``: one file that runs without the model's code.

The function is exported with a symbolic batch dimension, so one artifact
serves every batch size; the variables travel as flat arrays next to it (the
tree structure, quantization metadata included, is baked into the exported
function). ``jaxopt_serve.exported.load_exported`` reads it back using only
JAX and NumPy. Serialization needs the ``flatbuffers`` package (the
``export`` extra).
"""

from __future__ import annotations

import os

import jax

from jaxopt_serve.extras import require
from jaxopt_serve.exported import pack_exported
from jaxopt_serve.fileio import atomic_write
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables
from jaxopt_serve.quant.qarray import has_qarrays
from jaxopt_serve.quant.runtime import inference_fn


def export_model(
    path: str | os.PathLike[str],
    config: ModelConfig,
    variables: Variables,
    *,
    input_shape: tuple[int, ...] | None = None,
    quant_mode: str = "weight_only",
    platforms: tuple[str, ...] | None = None,
) -> int:
    """Write ``config``'s inference function and ``variables`` to ``path``; returns the file size.

    Args:
        path: the exported artifact to write (atomically).
        config: the model.
        variables: float or quantized variables.
        input_shape: one example's shape (default: the config's).
        quant_mode: execution mode of quantized variables (``weight_only`` exports
            for any backend; ``dynamic`` is the int8 path).
        platforms: backends to export for (default: the current one), e.g. ``("cpu", "cuda")``.

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

    shape = tuple(int(d) for d in (input_shape if input_shape is not None else config.example_shape()))
    leaves, treedef = jax.tree.flatten(dict(variables), is_leaf=None)
    quantized = has_qarrays(variables)
    base = inference_fn(config, variables, mode=quant_mode)

    def run(flat: list[jax.Array], x: jax.Array) -> jax.Array:
        return base(jax.tree.unflatten(treedef, flat), x)

    batch = export.symbolic_shape("b")[0]
    x_spec = jax.ShapeDtypeStruct((batch, *shape), config.input_dtype)
    leaf_specs = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
    exported = export.export(jax.jit(run), platforms=platforms)(leaf_specs, x_spec)
    header = {"model": config.name, "input_shape": list(shape), "input_dtype": config.input_dtype,
              "platforms": list(exported.platforms), "quantized": quantized}
    data = pack_exported(header, exported.serialize(), [jax.device_get(leaf) for leaf in leaves])
    atomic_write(path, data)
    return len(data)
