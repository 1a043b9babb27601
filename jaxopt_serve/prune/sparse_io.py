"""Sparse artifacts: pruned weights stored as a bitmask plus the kept values, so files really shrink.

Layout ``"sparse"``. In memory the variables are the ordinary (dense) tree,
float or quantized (``QArray`` leaves from ``quant.quantize``), with pruned
entries equal to zero. On disk, every leaf with at least ``min_sparsity``
zeros is stored as::

    {"__sparse__": {"mask": uint8 (np.packbits of "entry is non-zero", row-major)
                            or "gaps": uint8 escape-coded zeros skipped before each
                            non-zero (a relative-index CSR; whichever is smaller),
                    "values": the non-zero entries only: float, int8 codes, or
                              int4 codes packed two per byte,
                    "scale": float32 (quantized leaves),
                    "meta": uint8 JSON bytes (kind, shape, dtype; qtype,
                            granularity, axis, group_size for quantized leaves)}}

Quantized leaves must be symmetric int8 / int4 (code 0 is exactly 0.0). Other
leaves are stored as in the dense or quantized layouts; with
``float_dtype="float16"`` the remaining float leaves (biases, norms) are
stored as float16 (and so are the scales of the sparse quantized leaves) and
restored to the model's dtype (float32 scales) on load. The payload is
LZMA-compressed. Loading restores exactly the tree that was saved (up to the
optional float16 rounding) and checks it against the model: a reference
``ModelConfig``, or any ``Model`` given in its place (the file then loads with
``load_artifact(path, model=model)``; see ``jaxopt_serve.artifact``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_serve.artifact import (
    Artifact,
    ArtifactError,
    _leaf_specs,
    _resolve_target,
    _shape_dtype,
    register_layout,
)
from jaxopt_serve.model import Model
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables, init_variables
from jaxopt_serve.quant.qarray import QArray, is_qarray, pack, unpack
from jaxopt_serve.quant.rules import path_str
from jaxopt_serve.quant.serialize import check_qvariables, decode_qtree, encode_qtree

LAYOUT = "sparse"
SPARSE_KEY = "__sparse__"
_QTYPES = ("int8", "int4")


def sparse_artifact(
    config: ModelConfig | Model,
    variables: Variables,
    input_shape: tuple[int, ...] | None = None,
    metadata: dict[str, Any] | None = None,
    *,
    min_sparsity: float = 0.25,
    float_dtype: str | None = None,
) -> Artifact:
    """An ``Artifact`` with layout ``"sparse"`` for (pruned, optionally quantized) ``variables``.

    Args:
        config: the model: a reference ``ModelConfig``, or any ``Model`` (then
            ``load_artifact(path, model=model)`` loads the file, and the
            artifact's ``.model`` holds ``variables``).
        variables: plain float variables or ``quantize(...).variables``.
        input_shape: one example's shape; required with a ``ModelConfig``,
            taken from the example inputs of a ``Model``.
        metadata: free-form JSON-ready information.
        min_sparsity: leaves with at least this fraction of zeros are stored sparse.
        float_dtype: ``"float16"`` stores the remaining dense float leaves at half size.

    Example:
        >>> import os, tempfile, numpy as np
        >>> from jaxopt_serve.artifact import load_artifact, save_artifact
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> from jaxopt_serve.prune import PruneRule, prune
        >>> cfg = MLPConfig(features=(256,))
        >>> v = init_variables(cfg, 0)
        >>> v = {**v, "params": prune(v["params"], [PruneRule(r".*kernel", 0.9)]).params}
        >>> path = os.path.join(tempfile.mkdtemp(), "sparse.jxs")
        >>> sparse_size, dense_size = save_artifact(path, sparse_artifact(cfg, v, (8, 8, 1))), 4 * (64 * 256 + 256 * 10)
        >>> dense_size / sparse_size > 3
        True
        >>> bool(np.array_equal(load_artifact(path).variables["params"]["dense_0"]["kernel"],
        ...                     v["params"]["dense_0"]["kernel"]))
        True

        Any model, e.g. a plain function:

        >>> import jax.numpy as jnp
        >>> from jaxopt_serve.model import Model
        >>> from jaxopt_serve.prune import model_prune_rules
        >>> m = Model.function(lambda p, x: x @ p["w"], {"w": jnp.linspace(-1, 1, 256).reshape(16, 16)},
        ...                    jnp.ones((1, 16)))
        >>> pruned = {"params": prune(m.variables["params"], model_prune_rules(m, 0.8)).params}
        >>> size = save_artifact(path, sparse_artifact(m, pruned))
        >>> loaded = load_artifact(path, model=m)
        >>> float((np.asarray(loaded.variables["params"]["w"]) == 0).mean()) >= 0.8
        True
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if float_dtype not in (None, "float16", "bfloat16"):
        raise ValueError(f"float_dtype must be None, 'float16' or 'bfloat16', got {float_dtype!r}")
    config, model, input_shape = _resolve_target(config, input_shape, "sparse_artifact")
    variables = jax.tree.map(lambda x: x.canonical() if is_qarray(x) else x, dict(variables), is_leaf=is_qarray)
    check_qvariables(config if config is not None else model, variables, input_shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables, is_leaf=is_qarray):
        if isinstance(leaf, QArray) and _sparse_zeros(leaf) >= min_sparsity and not _storable(leaf):
            raise ValueError(
                f"{path_str(path)}: a sparse quantized leaf must be symmetric int8 or int4 (code 0 = 0.0), got {leaf!r}"
            )
    meta = {**dict(metadata or {}), "sparse": {"min_sparsity": min_sparsity, "float_dtype": float_dtype}}
    return Artifact(
        config,
        variables,
        input_shape,
        meta,
        LAYOUT,
        compression="lzma",
        model=model.with_variables(variables) if model is not None else None,
    )


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _storable(q: QArray) -> bool:
    return q.qtype in _QTYPES and q.zero_point is None


def _sparse_zeros(leaf: Any) -> float:
    values = np.asarray(leaf.dequantize()) if isinstance(leaf, QArray) else np.asarray(leaf)
    return float((values == 0).mean()) if values.size else 0.0


def encode_sparse(
    variables: Variables, *, min_sparsity: float = 0.25, float_dtype: str | None = None
) -> dict[str, Any]:
    """The on-disk tree (plain nested dict of numpy arrays) for ``variables``."""

    def encode(leaf: Any) -> Any:
        if isinstance(leaf, QArray):
            if _storable(leaf) and float((np.asarray(leaf.int_values()) == 0).mean()) >= min_sparsity:
                codes = np.asarray(leaf.int_values()).reshape(-1)
                keep = codes != 0
                kept = codes[keep]
                values = np.asarray(pack(kept, "int4")) if leaf.qtype == "int4" else kept.astype(np.int8)
                meta = {
                    "kind": "qarray",
                    "qtype": leaf.qtype,
                    "shape": list(leaf.shape),
                    "dtype": leaf.dtype,
                    "granularity": leaf.granularity,
                    "axis": leaf.axis,
                    "group_size": leaf.group_size,
                    "count": int(keep.sum()),
                }
                scale = np.asarray(leaf.scale)
                scale = scale.astype(float_dtype) if float_dtype is not None else scale
                return {SPARSE_KEY: {**_index(keep), "values": values, "scale": scale, "meta": _meta_bytes(meta)}}
            return leaf
        array = np.asarray(jax.device_get(leaf))
        if np.issubdtype(array.dtype, np.floating) and array.size and float((array == 0).mean()) >= min_sparsity:
            keep = (array != 0).reshape(-1)
            meta = {"kind": "float", "shape": list(array.shape), "dtype": str(array.dtype)}
            return {SPARSE_KEY: {**_index(keep), "values": array.reshape(-1)[keep], "meta": _meta_bytes(meta)}}
        if float_dtype is not None and np.issubdtype(array.dtype, np.floating):
            return array.astype(float_dtype)
        return array

    tree = jax.tree.map(encode, variables, is_leaf=is_qarray)
    return encode_qtree(tree)


def decode_sparse(
    config: ModelConfig | Model, raw: Mapping[str, Any], input_shape: tuple[int, ...] | None = None
) -> Variables:
    """Inverse of ``encode_sparse``; checks the result against ``config``'s model (or a ``Model`` in its place).

    Raises:
        ArtifactError: a sparse entry is malformed (mask or value count does not
            match its shape), or the variables do not fit the model; the message
            names the path.
    """
    tree = _decode(raw, ())
    tree = decode_qtree(tree)
    if isinstance(config, Model) and config.config is None:
        dtypes = {path: dtype for path, (_, dtype) in _leaf_specs(config.variables).items()}
    else:
        config, _, input_shape = _resolve_target(config, input_shape, "decode_sparse")
        expected = jax.eval_shape(lambda: init_variables(config, 0, input_shape))
        dtypes = {path_str(p): _shape_dtype(s)[1] for p, s in jax.tree_util.tree_leaves_with_path(expected)}

    def restore(path, leaf):
        if isinstance(leaf, QArray) or _is_key(leaf):
            return leaf
        want = dtypes.get(path_str(path))
        array = np.asarray(leaf)
        if want is not None and not want.startswith("key<") and np.issubdtype(array.dtype, np.floating):
            want = jnp.dtype(want)
            return array.astype(want) if array.dtype != want else array
        return array

    tree = jax.tree_util.tree_map_with_path(restore, tree, is_leaf=is_qarray)
    check_qvariables(config, tree, input_shape)
    return tree


def _decode(tree: Any, path: tuple[str, ...]) -> Any:
    if isinstance(tree, Mapping):
        if SPARSE_KEY in tree:
            return _decode_entry(tree[SPARSE_KEY], "/".join(path))
        return {k: _decode(v, (*path, k)) for k, v in tree.items()}
    return tree


def _decode_entry(entry: Any, name: str) -> Any:
    try:
        meta = json.loads(bytes(np.asarray(entry["meta"], np.uint8)).decode("utf-8"))
        shape = tuple(int(d) for d in meta["shape"])
        size = int(np.prod(shape))
        keep = _keep_from_index(entry, size)
        count = int(keep.sum())
        if meta["kind"] == "float":
            values = np.asarray(entry["values"])
            if values.shape != (count,):
                raise ValueError(f"{values.shape[0]} values for {count} mask bits")
            out = np.zeros(size, values.dtype)
            out[keep] = values
            return out.reshape(shape).astype(meta["dtype"])
        if meta["kind"] != "qarray" or meta["qtype"] not in _QTYPES:
            raise ValueError(f"unknown sparse entry kind {meta.get('kind')!r} / qtype {meta.get('qtype')!r}")
        raw_values = np.asarray(entry["values"])
        codes = np.asarray(unpack(raw_values, "int4", count)) if meta["qtype"] == "int4" else raw_values.astype(np.int8)
        if codes.shape != (count,) or (meta["qtype"] == "int4" and raw_values.size != (count + 1) // 2):
            raise ValueError(f"{raw_values.size} stored values for {count} mask bits")
        dense = np.zeros(size, np.int8)
        dense[keep] = codes
        dense = dense.reshape(shape)
        values = dense if meta["qtype"] == "int8" else np.asarray(pack(dense.reshape(-1), "int4"))
        return QArray(
            values,
            np.asarray(entry["scale"], np.float32),
            None,
            meta["qtype"],
            shape,
            meta["dtype"],
            meta["granularity"],
            meta["axis"],
            meta["group_size"],
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"sparse variable {name} is malformed: {err}") from err


def _index(keep: np.ndarray) -> dict[str, np.ndarray]:
    """Where the non-zeros are: a bitmask, or escape-coded gaps when those are smaller.

    Gaps are the zeros skipped before each non-zero, as uint8 tokens: a token
    of 255 skips 255 zeros and continues, a token ``t < 255`` skips ``t`` zeros
    and marks a non-zero (a relative-index CSR, as in Deep Compression).
    """
    positions = np.flatnonzero(keep)
    gaps = np.diff(positions, prepend=-1) - 1
    long_runs = gaps // 255
    tokens = np.full(int(long_runs.sum()) + gaps.size, 255, np.uint8)
    ends = np.cumsum(long_runs + 1) - 1
    tokens[ends] = (gaps % 255).astype(np.uint8)
    if tokens.size < (keep.size + 7) // 8:
        return {"gaps": tokens}
    return {"mask": np.packbits(keep)}


def _keep_from_index(entry: Mapping[str, Any], size: int) -> np.ndarray:
    if "gaps" in entry:
        tokens = np.asarray(entry["gaps"])
        if tokens.ndim != 1 or tokens.dtype != np.uint8:
            raise ValueError(f"gaps must be a 1-D uint8 array, got {tokens.dtype}{list(tokens.shape)}")
        terminal = tokens < 255
        positions = np.cumsum(tokens.astype(np.int64) + terminal)[terminal] - 1
        if positions.size and positions[-1] >= size:
            raise ValueError(f"gaps point past the end of a {size}-entry array")
        keep = np.zeros(size, bool)
        keep[positions] = True
        return keep
    mask = np.asarray(entry["mask"], np.uint8)
    if mask.shape != ((size + 7) // 8,):
        raise ValueError(f"mask has {mask.size} bytes, a {size}-entry array needs {(size + 7) // 8}")
    return np.unpackbits(mask, count=size).astype(bool)


def _meta_bytes(meta: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), np.uint8)


def _encode_layout(variables: Variables, metadata: dict[str, Any]) -> Variables:
    options = metadata.get("sparse", {})
    return encode_sparse(
        variables, min_sparsity=options.get("min_sparsity", 0.25), float_dtype=options.get("float_dtype")
    )


def _decode_layout(target: ModelConfig | Model, raw: Variables, header: dict[str, Any]) -> Variables:
    input_shape = header.get("input_shape")
    return decode_sparse(target, raw, tuple(input_shape) if input_shape is not None else None)


register_layout(LAYOUT, _decode_layout, _encode_layout)
