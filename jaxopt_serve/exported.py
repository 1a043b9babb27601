"""Load and run an exported model: JAX and NumPy only, no model code.

This module imports nothing else from ``jaxopt_serve``, so it also works as a
standalone file (copy it next to the artifact). An exported artifact holds a
``jax.export`` serialization of the compiled inference function, with a
symbolic batch dimension (and optionally a symbolic sequence length), plus the
model's variables::

    b"JXSEXPT\\0"                     8 bytes, magic
    header length                     8 bytes, little-endian
    header                            UTF-8 JSON: format version, model name, the input
                                      leaves (name, shape with null for the batch and
                                      length axes, dtype, length axis), the output leaves,
                                      every variable's path, shape and dtype, byte lengths
                                      of the two blobs below
    exported function                 jax.export serialization (needs the ``flatbuffers`` package)
    variables                         .npz with one array per variable, named by its path
                                      (version 1: "0", "1", ...); no pickled objects
    SHA-256 of everything above       32 bytes

Inputs and outputs are pytrees: ``model(x)`` for one input (an array or a
dict of arrays), ``model(a, b)`` (or ``model((a, b))``) for several; the
outputs come back as numpy arrays in the function's output structure.
Version 1 artifacts (one array in, one array out) still load.

Example (in a process that never imports the model)::

    from jaxopt_serve.exported import load_exported   # or: a copy of this file
    model = load_exported("cnn.jxe")
    logits = model(x)                                  # any batch size
    logits, ids = load_exported("tagger.jxe")({"input_ids": ids, "attention_mask": mask})
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"JXSEXPT\0"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PREFIX = struct.Struct("<8sQ")
DIGEST_BYTES = 32


class ExportedModel:
    """A loaded exported artifact: ``model(*inputs)`` runs the compiled function on numpy pytrees.

    Attributes:
        header: the artifact's header (model name, input and output leaves, variables).
        inputs: one dict per input leaf: ``name``, ``shape`` (``None`` for the
            batch and length axes), ``dtype``, ``length_axis``.
        input_shape, input_dtype: one example's shape and dtype for a model with one
            array input, else ``None``.
    """

    def __init__(self, header: dict[str, Any], exported: Any, leaves: list[np.ndarray]) -> None:
        import jax

        self.header = header
        self.inputs = _input_leaves(header)
        self.num_inputs = int(header.get("num_inputs", 1))
        self.input_shape = tuple(header["input_shape"]) if "input_shape" in header else None
        self.input_dtype = np.dtype(header["input_dtype"]) if "input_dtype" in header else None
        self._exported = exported
        _check_variables(header, exported, leaves)
        self._leaves = [jax.device_put(leaf) for leaf in leaves]

    def with_variables(self, variables: Mapping[str, Any]) -> ExportedModel:
        """The same function on other variables, given by path (``{"params/dense_0/kernel": array, ...}``).

        Every path of the header must be given once, with its shape and dtype
        (``ValueError`` naming the path otherwise), so leaves cannot be swapped.
        """
        specs = _variable_specs(self.header)
        missing = [s["path"] for s in specs if s["path"] not in variables]
        extra = sorted(set(variables) - {s["path"] for s in specs})
        if missing or extra:
            raise ValueError(f"variables do not match the artifact: missing {missing[:5]}, unknown {extra[:5]}")
        return ExportedModel(self.header, self._exported, [np.asarray(variables[s["path"]]) for s in specs])

    def __call__(self, *args: Any) -> Any:
        import jax

        if len(args) == 1 and self.num_inputs > 1 and isinstance(args[0], tuple) and len(args[0]) == self.num_inputs:
            args = args[0]
        inputs = tuple(args)
        if len(inputs) != self.num_inputs:
            raise ValueError(f"{self.header.get('model', 'the model')} takes {self.num_inputs} positional input(s), "
                             f"got {len(inputs)}")
        if "inputs" not in self.header:  # version 1: the function takes the one array itself
            inputs = inputs[0]
        leaves, treedef = jax.tree.flatten(inputs)
        expected = self._exported.in_tree
        got = jax.tree.structure(((self._leaves, inputs), {}))
        if got != expected or len(leaves) != len(self.inputs):
            names = [spec["name"] for spec in self.inputs]
            paths = jax.tree_util.tree_flatten_with_path(tuple(args))[0]
            got_names = ["inputs" + jax.tree_util.keystr(p) for p, _ in paths]
            raise ValueError(f"inputs do not have the exported structure: expected leaves {names}, got {got_names}")
        checked = _check_leaves(self.inputs, leaves)
        out = self._exported.call(self._leaves, jax.tree.unflatten(treedef, checked))
        return jax.tree.map(np.asarray, out)


def _input_leaves(header: dict[str, Any]) -> list[dict[str, Any]]:
    if "inputs" in header:
        return header["inputs"]
    # version 1: one array input
    return [{"name": "inputs[0]", "shape": [None, *header["input_shape"]], "dtype": header["input_dtype"],
             "length_axis": None}]


def _shape_text(spec: dict[str, Any]) -> str:
    dims = [("length" if i == spec.get("length_axis") else "batch" if i == 0 else str(d))
            for i, d in enumerate(spec["shape"])]
    return f"({', '.join(dims)})"


def _kind(dtype: np.dtype) -> str:
    for kind, base in (("bool", np.bool_), ("int", np.integer), ("float", np.floating)):
        if np.issubdtype(dtype, base):
            return kind
    return str(dtype)


def _check_leaves(specs: list[dict[str, Any]], leaves: list[Any]) -> list[np.ndarray]:
    """Every input leaf against the header: shape, dtype kind, one batch size, one length (errors name the leaf)."""
    out, batch, length = [], None, None
    for spec, leaf in zip(specs, leaves):
        name, x = spec["name"], np.asarray(leaf)
        want = spec["shape"]
        fits = x.dtype != object and x.ndim == len(want)
        fits = fits and all(w is None or w == d for w, d in zip(want, x.shape))
        if not fits:
            raise ValueError(f"{name}: expected a batch of shape {_shape_text(spec)}, got {x.shape}")
        if batch is None:
            batch = x.shape[0]
        elif x.shape[0] != batch:
            raise ValueError(f"{name}: batch size {x.shape[0]} differs from the first input's {batch}")
        axis = spec.get("length_axis")
        if axis is not None:
            if length is None:
                length = x.shape[axis]
            elif x.shape[axis] != length:
                raise ValueError(f"{name}: length {x.shape[axis]} (axis {axis}) differs from the other inputs' {length}")
        dtype = np.dtype(spec["dtype"])
        if x.dtype != dtype:
            if _kind(x.dtype) != _kind(dtype):
                raise ValueError(f"{name}: expected {dtype} inputs, got {x.dtype}")
            x = x.astype(dtype)
        out.append(x)
    if batch == 0:
        raise ValueError("empty batch: expected at least one example")
    if length == 0:
        raise ValueError("empty sequences: expected a length of at least 1")
    return out


def _variable_specs(header: dict[str, Any]) -> list[dict[str, Any]]:
    if "variables" in header:
        return header["variables"]
    return [{"path": str(i), "shape": None, "dtype": None} for i in range(header["num_leaves"])]


def _check_variables(header: dict[str, Any], exported: Any, leaves: list[np.ndarray]) -> None:
    """Count, shapes and dtypes of the variables against the header and the function (errors name the path)."""
    specs = _variable_specs(header)
    avals = list(exported.in_avals)[: len(specs)]
    expected = exported.in_tree.num_leaves - len(header.get("inputs", [None]))
    if len(leaves) != len(specs) or len(specs) != expected:
        raise ValueError(f"the artifact holds {len(leaves)} variables, its header lists {len(specs)} and its "
                         f"function takes {expected}")
    for spec, leaf, aval in zip(specs, leaves, avals):
        shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
        for what, want in (("header", spec), ("function", {"shape": aval.shape, "dtype": aval.dtype})):
            if want["shape"] is not None and (tuple(want["shape"]) != shape or np.dtype(want["dtype"]) != dtype):
                raise ValueError(f"variable {spec['path']}: {shape} {dtype} does not match the {what}'s "
                                 f"{tuple(want['shape'])} {np.dtype(want['dtype'])}")


def read_exported(data: bytes, where: str = "exported artifact") -> tuple[dict[str, Any], bytes, list[np.ndarray]]:
    """Verify and split the bytes of an exported artifact: ``(header, function bytes, variable arrays)``."""
    if len(data) < PREFIX.size + DIGEST_BYTES:
        raise ValueError(f"{where} is truncated ({len(data)} bytes)")
    magic, header_len = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{where} is not an exported jaxopt_serve model (bad magic bytes {magic!r})")
    if hashlib.sha256(data[:-DIGEST_BYTES]).digest() != data[-DIGEST_BYTES:]:
        raise ValueError(f"{where} is corrupted: SHA-256 checksum mismatch")
    header = json.loads(data[PREFIX.size : PREFIX.size + header_len].decode("utf-8"))
    if header.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{where} has format version {header.get('format_version')!r}; "
                         f"this reader knows {list(READABLE_VERSIONS)}")
    start = PREFIX.size + header_len
    function = data[start : start + header["function_bytes"]]
    blob = data[start + header["function_bytes"] : start + header["function_bytes"] + header["variables_bytes"]]
    names = [spec["path"] for spec in _variable_specs(header)]
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        stored = set(npz.files)
        if stored != set(names) or len(names) != header["num_leaves"]:
            raise ValueError(f"{where}: the stored variables {sorted(stored - set(names))[:5]} and the header's "
                             f"{sorted(set(names) - stored)[:5]} differ ({len(stored)} stored, {len(names)} listed)")
        leaves = [npz[name] for name in names]
    return header, function, leaves


def pack_exported(header: dict[str, Any], function: bytes, leaves: list[np.ndarray]) -> bytes:
    """The bytes of an exported artifact (see the module docstring); variables named by ``header["variables"]``."""
    names = [spec["path"] for spec in header.get("variables", [])] or [str(i) for i in range(len(leaves))]
    if len(names) != len(leaves) or len(set(names)) != len(names):
        raise ValueError(f"{len(leaves)} variables need {len(leaves)} distinct paths, got {len(set(names))}")
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(leaf) for name, leaf in zip(names, leaves)})
    blob = buffer.getvalue()
    header = {**header, "format_version": FORMAT_VERSION, "function_bytes": len(function),
              "variables_bytes": len(blob), "num_leaves": len(leaves)}
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    body = PREFIX.pack(MAGIC, len(header_bytes)) + header_bytes + bytes(function) + blob
    return body + hashlib.sha256(body).digest()


def load_exported(path: str | Path) -> ExportedModel:
    """Load an exported artifact written by ``jaxopt_serve.engine.export_model``."""
    from jax import export

    header, function, leaves = read_exported(Path(path).read_bytes(), str(path))
    return ExportedModel(header, export.deserialize(bytearray(function)), leaves)
