"""Quantized artifacts: ``QArray`` leaves saved packed, loaded back bit for bit.

``save_artifact`` writes plain nested dicts of arrays (msgpack, no pickle), so
an artifact with layout ``"quantized"`` stores each ``QArray`` as a small dict::

    {"__qarray__": {"values": int8 or packed uint8 array, "scale": float32 array,
                    "zero_point": int8 array (asymmetric only),
                    "meta": uint8 array of UTF-8 JSON bytes (qtype, shape, dtype,
                            granularity, axis, group_size)}}

The values stay packed on disk (int4 at half a byte per value, ternary at a
quarter, binary at an eighth). Loading checks, besides the file's length and
checksum, that every ``QArray`` is internally consistent (values, scale and
zero point sized for its metadata) and has the shape and dtype of the
variable it replaces, that every float leaf has the shape and dtype the model
expects, and that nothing is missing or extra (static activation scales under
``"quant_act"`` aside); the ``ArtifactError`` names the variable's path.

The model is a reference ``ModelConfig`` (checked against freshly initialised
variables) or any ``Model`` (checked against the model's own variables; the
file then has a format-2 header and loads with ``load_artifact(path, model=model)``).

Importing ``jaxopt_serve.quant`` registers the layout with ``load_artifact``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxopt_serve.artifact import (
    Artifact,
    ArtifactError,
    _compare_leaves,
    _leaf_specs,
    _model_leaves,
    _resolve_target,
    _shape_dtype,
    register_layout,
)
from jaxopt_serve.model import Model
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables, init_variables
from jaxopt_serve.quant.qarray import BITS, QArray, is_qarray
from jaxopt_serve.quant.rules import QuantizeResult, path_str
from jaxopt_serve.quant.runtime import ACT_COLLECTION, ASYM_COLLECTION, SMOOTH_COLLECTION, _asym_mark, _mark_bits

LAYOUT = "quantized"
QARRAY_KEY = "__qarray__"
_META_FIELDS = ("qtype", "shape", "dtype", "granularity", "axis", "group_size")


def encode_qtree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``tree`` as a plain nested dict of numpy arrays; each ``QArray`` becomes a ``{"__qarray__": ...}`` dict.

    Idempotent: an already encoded tree comes back unchanged.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_serve.quant import QuantSpec, quantize_array
        >>> q = quantize_array(jnp.linspace(-1.0, 1.0, 64).reshape(16, 4), QuantSpec(qtype="int4"))
        >>> encoded = encode_qtree({"params": {"dense": {"kernel": q}}})
        >>> sorted(encoded["params"]["dense"]["kernel"]["__qarray__"])
        ['meta', 'scale', 'values']
        >>> decode_qtree(encoded)["params"]["dense"]["kernel"]
        QArray(int4, shape=(16, 4), channel, axis=1, 48 bytes)
    """
    return _encode(tree, ())


def decode_qtree(encoded: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``encode_qtree``: every ``{"__qarray__": ...}`` dict becomes a ``QArray`` again.

    Each ``QArray`` is checked for internal consistency (known qtype, values and
    scale sized for its shape, granularity and axis).

    Raises:
        ArtifactError: a ``QArray`` entry is malformed; the message names its path.
    """
    return _decode(encoded, ())


def quantized_artifact(
    config: ModelConfig | Model,
    qvariables: Variables | QuantizeResult,
    input_shape: tuple[int, ...] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Artifact:
    """An ``Artifact`` with layout ``"quantized"`` for ``qvariables``, ready for ``save_artifact``.

    Checks now (before anything is written) that ``qvariables`` fit the model,
    as ``load_artifact`` will.

    Args:
        config: the model: a reference ``ModelConfig``, or any ``Model`` (then
            ``load_artifact(path, model=model)`` loads the file, and the
            artifact's ``.model`` holds ``qvariables``).
        qvariables: ``quantize(...).variables`` (or the ``QuantizeResult``),
            optionally with ``"quant_act"`` activation scales from ``calibrate``.
        input_shape: shape of one example (no batch axis); required with a
            ``ModelConfig``, taken from the example inputs of a ``Model``.
        metadata: free-form JSON-ready information.

    Raises:
        ArtifactError: a variable is missing, extra, or of the wrong shape or
            dtype; the message names its path.

    Example:
        >>> import os, tempfile
        >>> from jaxopt_serve.artifact import load_artifact, save_artifact
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> from jaxopt_serve.quant import QuantSpec, default_rules, quantize
        >>> cfg = MLPConfig(features=(64,))
        >>> q = quantize(init_variables(cfg, 0), default_rules(QuantSpec(qtype="int4")))
        >>> path = os.path.join(tempfile.mkdtemp(), "mlp-int4.jxs")
        >>> size = save_artifact(path, quantized_artifact(cfg, q, (8, 8, 1)))
        >>> load_artifact(path).variables["params"]["dense_0"]["kernel"]
        QArray(int4, shape=(64, 64), channel, axis=1, 2304 bytes)

        Any model, e.g. a plain function, with ``quant_act`` scales from ``calibrate``:

        >>> import jax.numpy as jnp
        >>> from jaxopt_serve.model import Model
        >>> from jaxopt_serve.quant import calibrate, model_rules
        >>> f = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
        >>> x = jnp.linspace(-1, 1, 8 * 16).reshape(8, 16)
        >>> m = Model.function(f, {"w1": jnp.ones((16, 32)) / 16, "w2": jnp.ones((32, 4))}, x)
        >>> q = calibrate(m, quantize(m.variables, model_rules(m)).variables, x)
        >>> path = os.path.join(tempfile.mkdtemp(), "f-int8.jxs")
        >>> size = save_artifact(path, quantized_artifact(m, q))
        >>> loaded = load_artifact(path, model=m)
        >>> sorted(loaded.variables["quant_act"]), loaded.variables["params"]["w1"]
        (['w1', 'w2'], QArray(int8, shape=(16, 32), channel, axis=1, 640 bytes))
    """
    if isinstance(qvariables, QuantizeResult):
        qvariables = qvariables.variables
    if not isinstance(qvariables, Mapping):
        raise TypeError(f"qvariables must be a variables dict or a QuantizeResult, got {type(qvariables).__name__}")
    config, model, input_shape = _resolve_target(config, input_shape, "quantized_artifact")
    qvariables = jax.tree.map(lambda x: x.canonical() if is_qarray(x) else x, dict(qvariables), is_leaf=is_qarray)
    check_qvariables(config if config is not None else model, qvariables, input_shape)
    qvariables = dict(qvariables)
    return Artifact(
        config,
        qvariables,
        input_shape,
        dict(metadata or {}),
        LAYOUT,
        model=model.with_variables(qvariables) if model is not None else None,
    )


def check_qvariables(
    config: ModelConfig | Model, qvariables: Mapping[str, Any], input_shape: tuple[int, ...] | None = None
) -> None:
    """Check that (quantized) variables fit ``config``'s model built for ``input_shape``, or a ``Model``.

    With a ``Model`` in place of the config, the variables are compared with the
    model's own (``input_shape`` is not needed); either way the ``quant_act`` /
    ``quant_smooth`` / ``quant_asym`` entries are checked too.

    Raises:
        ArtifactError: a variable is missing or extra, a float leaf has another
            shape or dtype than the model's, or a ``QArray`` does not have the
            shape and dtype of the variable it replaces; the message names the path.
    """
    if isinstance(config, Model) and config.config is None:
        want, name = _leaf_specs(config.variables), f"the {config.kind} model {config.name!r}"
    else:
        config, _, input_shape = _resolve_target(config, input_shape, "check_qvariables")
        expected = jax.eval_shape(lambda: init_variables(config, 0, input_shape))
        want = {path_str(p): _shape_dtype(leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(expected)}
        name = config.name
    have = _model_leaves(qvariables)
    _compare_leaves(want, have, name)
    for layer, scale in _collection(qvariables, ACT_COLLECTION, "scales"):
        value = np.asarray(scale)
        if value.shape != () or value.dtype != np.float32 or not (np.isfinite(value) and value > 0):
            raise ArtifactError(
                f"activation scale {ACT_COLLECTION}/{layer} must be a positive finite float32 scalar, "
                f"got {value.dtype}{list(value.shape)}"
            )
    for layer, factor in _collection(qvariables, SMOOTH_COLLECTION, "smoothing factors"):
        value = np.asarray(factor)
        kernel = _kernel_of(have, layer)
        if value.dtype != np.float32 or not np.all(np.isfinite(value) & (value > 0)):
            raise ArtifactError(f"smoothing factors {SMOOTH_COLLECTION}/{layer} must be positive finite float32")
        if kernel is None or tuple(np.shape(kernel))[: value.ndim] != value.shape:
            raise ArtifactError(
                f"smoothing factors {SMOOTH_COLLECTION}/{layer} of shape {value.shape} fit no kernel's input dimensions"
            )
    for layer, mark in _collection(qvariables, ASYM_COLLECTION, "True"):
        value = np.asarray(mark)
        try:  # the runtime's reading of a mark (its dtype), then the one value that dtype may hold
            valid = value.item() == _asym_mark(_mark_bits(layer, value)).item()
        except ValueError:
            valid = False
        if not valid:
            raise ArtifactError(
                f"asymmetric-activation mark {ASYM_COLLECTION}/{layer} must be a boolean True "
                f"(8 bits) or int8 7 (7 bits), got {value.dtype}{list(value.shape)}"
            )
        if not isinstance(_kernel_of(have, layer), QArray):
            raise ArtifactError(f"asymmetric-activation mark {ASYM_COLLECTION}/{layer} names no quantized kernel")


def _kernel_of(leaves: Mapping[str, Any], layer: str) -> Any:
    """The leaf whose ``runtime.layer_key`` is ``layer``: ``params/<layer>/kernel`` or ``params/<layer>``; a
    ``QArray`` first."""
    found = [leaves[p] for p in (f"params/{layer}/kernel", f"params/{layer}") if p in leaves]
    return next((leaf for leaf in found if isinstance(leaf, QArray)), found[0] if found else None)


def _collection(qvariables: Mapping[str, Any], name: str, what: str) -> list[tuple[str, Any]]:
    """The ``(layer, value)`` items of the per-layer collection ``name`` (none if absent); not a mapping: an error."""
    entries = qvariables.get(name, {})
    if not isinstance(entries, Mapping):
        raise ArtifactError(f"variables[{name!r}] must map layer paths to {what}, got {type(entries).__name__}")
    return list(entries.items())


def _decode_layout(target: ModelConfig | Model, raw: Variables, header: dict[str, Any]) -> Variables:
    variables = decode_qtree(raw)
    input_shape = header.get("input_shape")
    check_qvariables(target, variables, tuple(input_shape) if input_shape is not None else None)
    return variables


# ---------------------------------------------------------------------------- encoding


def _encode(tree: Any, path: tuple[str, ...]) -> Any:
    if isinstance(tree, QArray):
        tree = tree.canonical()  # artifacts hold the original layout (not serving_layout's)
        entry = {"values": _numpy(tree.values), "scale": _numpy(tree.scale)}
        if tree.zero_point is not None:
            entry["zero_point"] = _numpy(tree.zero_point)
        meta = {field: getattr(tree, field) for field in _META_FIELDS}
        meta["shape"] = [int(d) for d in meta["shape"]]
        entry["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8).copy()
        return {QARRAY_KEY: entry}
    if isinstance(tree, Mapping):  # an already encoded {"__qarray__": ...} entry passes through as it is
        return {str(k): _encode(v, (*path, str(k))) for k, v in tree.items()}
    if tree is None:
        raise ValueError(f"{'/'.join(path)}: None cannot be stored in an artifact")
    return _numpy(tree)


def _numpy(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))


# ---------------------------------------------------------------------------- decoding


def _decode(tree: Any, path: tuple[str, ...]) -> Any:
    if isinstance(tree, Mapping):
        if QARRAY_KEY in tree:
            if len(tree) != 1:
                raise ArtifactError(
                    f"quantized variable {_name(path)}: unexpected keys {sorted(set(tree) - {QARRAY_KEY})}"
                )
            return _decode_qarray(tree[QARRAY_KEY], _name(path))
        return {str(k): _decode(v, (*path, str(k))) for k, v in tree.items()}
    return tree


def _decode_qarray(entry: Any, name: str) -> QArray:
    where = f"quantized variable {name}"
    if not isinstance(entry, Mapping):
        raise ArtifactError(f"{where}: expected a dict of arrays, got {type(entry).__name__}")
    keys = set(entry)
    if not {"values", "scale", "meta"} <= keys or not keys <= {"values", "scale", "zero_point", "meta"}:
        raise ArtifactError(f"{where}: expected keys values, scale, meta (and zero_point), got {sorted(keys)}")
    meta = _parse_meta(entry["meta"], where)
    qtype, shape, granularity, axis, group_size = (
        meta[k] for k in ("qtype", "shape", "granularity", "axis", "group_size")
    )
    values, scale = np.asarray(entry["values"]), np.asarray(entry["scale"])
    zero_point = np.asarray(entry["zero_point"]) if "zero_point" in entry else None
    size = math.prod(shape)
    if BITS[qtype] == 8:
        want_values = ("int8", shape)
    else:
        want_values = ("uint8", (-(-size // (8 // BITS[qtype])),))
    if (str(values.dtype), tuple(values.shape)) != want_values:
        raise ArtifactError(
            f"{where}: {qtype} values of shape {list(shape)} must be {want_values[0]}{list(want_values[1])}, "
            f"got {values.dtype}{list(values.shape)}"
        )
    want_scale = _scale_shape(shape, granularity, axis, group_size)
    if scale.dtype != np.float32 or tuple(scale.shape) != want_scale:
        raise ArtifactError(f"{where}: scale must be float32{list(want_scale)}, got {scale.dtype}{list(scale.shape)}")
    if zero_point is not None:
        if qtype not in ("int8", "int4"):
            raise ArtifactError(f"{where}: {qtype} is symmetric and has no zero point")
        if zero_point.dtype != np.int8 or tuple(zero_point.shape) != want_scale:
            raise ArtifactError(
                f"{where}: zero_point must be int8{list(want_scale)}, got {zero_point.dtype}{list(zero_point.shape)}"
            )
    return QArray(values, scale, zero_point, qtype, shape, meta["dtype"], granularity, axis, group_size)


def _parse_meta(raw: Any, where: str) -> dict[str, Any]:
    array = np.asarray(raw)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ArtifactError(
            f"{where}: metadata must be a uint8 array of JSON bytes, got {array.dtype}{list(array.shape)}"
        )
    try:
        meta = json.loads(array.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ArtifactError(f"{where}: metadata is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or sorted(meta) != sorted(_META_FIELDS):
        raise ArtifactError(f"{where}: metadata must have exactly the fields {sorted(_META_FIELDS)}, got {meta!r}")
    qtype, shape, dtype = meta["qtype"], meta["shape"], meta["dtype"]
    granularity, axis, group_size = meta["granularity"], meta["axis"], meta["group_size"]
    if qtype not in BITS:
        raise ArtifactError(f"{where}: unknown qtype {qtype!r}; known: {sorted(BITS)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ArtifactError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    try:
        if not isinstance(dtype, str) or not np.issubdtype(np.dtype(dtype), np.floating):
            raise TypeError(dtype)
    except TypeError as err:
        raise ArtifactError(f"{where}: dtype must name a float dtype, got {dtype!r}") from err
    ndim = len(shape)
    if granularity == "tensor":
        ok = axis is None and group_size is None
    elif granularity == "channel":
        ok = _is_int(axis) and 0 <= axis < ndim and group_size is None
    elif granularity == "group":
        ok = (
            _is_int(axis)
            and 0 <= axis < ndim
            and _is_int(group_size)
            and group_size > 0
            and shape[axis] % group_size == 0
        )
    else:
        ok = False
    if not ok:
        raise ArtifactError(
            f"{where}: inconsistent granularity {granularity!r} (axis {axis!r}, group_size {group_size!r}) "
            f"for shape {shape}"
        )
    return {**meta, "shape": tuple(shape)}


def _scale_shape(shape: tuple[int, ...], granularity: str, axis: int | None, group_size: int | None) -> tuple[int, ...]:
    if granularity == "tensor":
        return (1,) * len(shape)
    if granularity == "channel":
        return tuple(d if i == axis else 1 for i, d in enumerate(shape))
    return (*shape[:axis], shape[axis] // group_size, 1, *shape[axis + 1 :])


# ---------------------------------------------------------------------------- helpers


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _name(path: tuple[str, ...]) -> str:
    return "/".join(path)


register_layout(LAYOUT, _decode_layout, lambda variables, metadata: encode_qtree(variables))
