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

Since version 3 the exported function takes its variables as a dict keyed by
path, so the loader binds every array to the function by name: a header that
lists two same-shape variables (a batch norm's mean and variance) in swapped
order is refused instead of running with them exchanged. Versions 1 and 2
(variables by position) still load.

Loading reads regular files only (a directory, FIFO or device is refused
before any read), compares the size the header announces with the file's
before reading the rest, checks every header field's type (a ``ValueError``
naming the file and the field), and refuses variables holding NaN or inf
unless ``allow_nonfinite=True``.

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
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
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

    def __init__(
        self, header: dict[str, Any], exported: Any, leaves: list[np.ndarray], *, nan_policy: str = "propagate"
    ) -> None:
        import jax

        if nan_policy not in ("propagate", "error"):
            raise ValueError(f"nan_policy must be 'propagate' or 'error', got {nan_policy!r}")
        self.nan_policy = nan_policy
        self.header = header
        self.inputs = _input_leaves(header)
        self.num_inputs = int(header.get("num_inputs", 1))
        self.input_shape = tuple(header["input_shape"]) if "input_shape" in header else None
        self.input_dtype = np.dtype(header["input_dtype"]) if "input_dtype" in header else None
        self._exported = exported
        _check_variables(header, exported, leaves)
        leaves = [jax.device_put(leaf) for leaf in leaves]
        if _by_name(exported):  # version 3: the function binds its variables by path
            self._leaves: Any = {spec["path"]: leaf for spec, leaf in zip(_variable_specs(header), leaves)}
        else:
            self._leaves = leaves

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
        return ExportedModel(
            self.header, self._exported, [np.asarray(variables[s["path"]]) for s in specs], nan_policy=self.nan_policy
        )

    def __call__(self, *args: Any) -> Any:
        import jax

        if len(args) == 1 and self.num_inputs > 1 and isinstance(args[0], tuple) and len(args[0]) == self.num_inputs:
            args = args[0]
        inputs = tuple(args)
        if len(inputs) != self.num_inputs:
            raise ValueError(
                f"{self.header.get('model', 'the model')} takes {self.num_inputs} positional input(s), "
                f"got {len(inputs)}"
            )
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
        bad = _nonfinite_rows(checked, self.nan_policy)
        if bad is not None:  # "propagate": run as zero rows, float outputs NaN (as the engine does)
            checked = [np.where(bad.reshape(-1, *[1] * (x.ndim - 1)), np.zeros((), x.dtype), x) for x in checked]
        out = self._exported.call(self._leaves, jax.tree.unflatten(treedef, checked))
        out = jax.tree.map(np.asarray, out)
        return out if bad is None else jax.tree.map(lambda o: _nan_rows(o, bad), out)


def _nonfinite_rows(leaves: list[np.ndarray], policy: str) -> np.ndarray | None:
    """Rows with a NaN or inf in a float leaf (``None``: none); ``ValueError`` naming them under ``"error"``."""
    masks = [~np.isfinite(x.reshape(len(x), -1)).all(axis=1) for x in leaves if np.issubdtype(x.dtype, np.floating)]
    bad = np.logical_or.reduce(masks) if masks else None
    if bad is None or not bad.any():
        return None
    rows = np.flatnonzero(bad).tolist()
    text = f"rows {rows[:10]}{f' and {len(rows) - 10} more' if len(rows) > 10 else ''}"
    if policy == "error":
        raise ValueError(f"non-finite inputs (NaN or inf) in {text}")
    return bad


def _nan_rows(out: np.ndarray, bad: np.ndarray) -> np.ndarray:
    if not np.issubdtype(out.dtype, np.floating):
        raise ValueError(
            f"non-finite inputs (NaN or inf) in rows {np.flatnonzero(bad)[:10].tolist()}: this model "
            f"has {out.dtype} outputs, which cannot be NaN; remove those rows"
        )
    return np.where(bad.reshape(-1, *[1] * (out.ndim - 1)), np.asarray(np.nan, out.dtype), out)


def _input_leaves(header: dict[str, Any]) -> list[dict[str, Any]]:
    if "inputs" in header:
        return header["inputs"]
    # version 1: one array input
    return [
        {
            "name": "inputs[0]",
            "shape": [None, *header["input_shape"]],
            "dtype": header["input_dtype"],
            "length_axis": None,
        }
    ]


def _shape_text(spec: dict[str, Any]) -> str:
    dims = [
        ("length" if i == spec.get("length_axis") else "batch" if i == 0 else str(d))
        for i, d in enumerate(spec["shape"])
    ]
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
                raise ValueError(
                    f"{name}: length {x.shape[axis]} (axis {axis}) differs from the other inputs' {length}"
                )
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


def _by_name(exported: Any) -> bool:
    """Whether the exported function takes its variables as a dict keyed by path (version 3)."""
    return isinstance(_variables_arg(exported), dict)


def _variables_arg(exported: Any) -> Any:
    """The exported function's first argument with each leaf replaced by its position."""
    import jax

    try:
        (variables, _), _ = jax.tree.unflatten(exported.in_tree, range(exported.in_tree.num_leaves))
    except (TypeError, ValueError):
        return None
    return variables


def _check_variables(header: dict[str, Any], exported: Any, leaves: list[np.ndarray]) -> None:
    """Count, names, shapes and dtypes of the variables against the header and the function (errors name the path)."""
    specs = _variable_specs(header)
    avals = list(exported.in_avals)[: len(specs)]
    expected = exported.in_tree.num_leaves - len(header.get("inputs", [None]))
    if len(leaves) != len(specs) or len(specs) != expected:
        raise ValueError(
            f"the artifact holds {len(leaves)} variables, its header lists {len(specs)} and its "
            f"function takes {expected}"
        )
    arg = _variables_arg(exported)
    version = header.get("format_version", FORMAT_VERSION)
    if isinstance(arg, dict) != (version >= 3):
        raise ValueError(
            f"the header says format version {version}, but the function takes its variables "
            f"{'by path' if isinstance(arg, dict) else 'by position'}"
        )
    for spec, leaf, aval in zip(specs, leaves, avals):
        shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
        for what, want in (("header", spec), ("function", {"shape": aval.shape, "dtype": aval.dtype})):
            if want["shape"] is not None and (tuple(want["shape"]) != shape or np.dtype(want["dtype"]) != dtype):
                raise ValueError(
                    f"variable {spec['path']}: {shape} {dtype} does not match the {what}'s "
                    f"{tuple(want['shape'])} {np.dtype(want['dtype'])}"
                )
    if isinstance(arg, dict):  # sorted by path, as jax flattens a dict: the order the header must list them in
        for spec, aval, name in zip(specs, avals, list(arg)):
            if spec["path"] != name:
                raise ValueError(
                    f"variable {spec['path']}: the header lists it where the function takes {name} "
                    f"({tuple(aval.shape)} {np.dtype(aval.dtype)}); the header was altered"
                )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_dtype(value: Any) -> bool:
    try:
        return isinstance(value, str) and _numeric(np.dtype(value))
    except TypeError:
        return False


def _numeric(dtype: np.dtype) -> bool:
    return dtype.kind in "biuf" or dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def _is_shape(value: Any, *, allow_none: bool = False) -> bool:
    return isinstance(value, list) and all(_is_int(d) or (allow_none and d is None) for d in value)


def _parse_header(data: bytes, where: str) -> tuple[dict[str, Any], int]:
    """``(header, total file size it announces)`` from the bytes of the prefix and the header (fields checked)."""
    if len(data) < PREFIX.size:
        raise ValueError(f"{where} is truncated ({len(data)} bytes)")
    magic, header_len = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{where} is not an exported jaxopt_serve model (bad magic bytes {magic!r})")
    if PREFIX.size + header_len + DIGEST_BYTES > len(data):
        raise ValueError(
            f"{where} is truncated: its header needs {PREFIX.size + header_len} bytes, the file has {len(data)}"
        )
    try:
        header = json.loads(data[PREFIX.size : PREFIX.size + header_len].decode("utf-8"))
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{where} is corrupted: its header cannot be read ({err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{where} is corrupted: its header is a JSON {type(header).__name__}, not an object")
    _check_header(header, where)
    return header, PREFIX.size + header_len + header["function_bytes"] + header["variables_bytes"] + DIGEST_BYTES


def _check_header(header: dict[str, Any], where: str) -> None:
    """Every structural field of the header of the right type (``ValueError`` naming ``where`` and the field)."""

    def fail(field: str, expected: str) -> None:
        if "[" in field:
            name, index = field[:-1].split("[")
            got = _short(header[name][int(index)])
        else:
            got = _short(header[field]) if field in header else "nothing (the field is missing)"
        raise ValueError(f"{where} is corrupted: header field {field!r} must be {expected}, got {got}")

    version = header.get("format_version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise ValueError(f"{where} has format version {version!r}; this reader knows {list(READABLE_VERSIONS)}")
    for field in ("function_bytes", "variables_bytes", "num_leaves"):
        if not _is_int(header.get(field)):
            fail(field, "a non-negative integer")
    if not _is_int(header.get("num_inputs", 1), 1):
        fail("num_inputs", "a positive integer")
    if "model" in header and not isinstance(header["model"], str):
        fail("model", "a string")
    if version == 1 or "input_shape" in header:
        if not _is_shape(header.get("input_shape")):
            fail("input_shape", "a list of non-negative integers")
        if not _is_dtype(header.get("input_dtype")):
            fail("input_dtype", "a numeric dtype name")
    if version >= 2:
        variables = header.get("variables")
        if not isinstance(variables, list):
            fail("variables", "a list of {'path', 'shape', 'dtype'}")
        for i, spec in enumerate(variables):
            if not (
                isinstance(spec, dict)
                and isinstance(spec.get("path"), str)
                and _is_shape(spec.get("shape"))
                and _is_dtype(spec.get("dtype"))
            ):
                fail(f"variables[{i}]", "{'path': str, 'shape': [int, ...], 'dtype': str}")
        paths = [spec["path"] for spec in variables]
        if len(set(paths)) != len(paths):
            fail("variables", "a list of distinct paths")
        if len(variables) != header["num_leaves"]:
            fail("num_leaves", f"the number of variables listed ({len(variables)})")
        inputs = header.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            fail("inputs", "a non-empty list of {'name', 'shape', 'dtype', 'length_axis'}")
        for i, spec in enumerate(inputs):
            ok = (
                isinstance(spec, dict)
                and isinstance(spec.get("name"), str)
                and _is_shape(spec.get("shape"), allow_none=True)
                and len(spec["shape"]) >= 1
                and _is_dtype(spec.get("dtype"))
            )
            axis = spec.get("length_axis") if isinstance(spec, dict) else None
            if not ok or not (axis is None or (_is_int(axis, 1) and axis < len(spec["shape"]))):
                fail(
                    f"inputs[{i}]", "{'name': str, 'shape': [int | null, ...], 'dtype': str, 'length_axis': int | null}"
                )


def read_exported(data: bytes, where: str = "exported artifact") -> tuple[dict[str, Any], bytes, list[np.ndarray]]:
    """Verify and split the bytes of an exported artifact: ``(header, function bytes, variable arrays)``.

    Raises:
        ValueError: the bytes are truncated, corrupted (checksum), of an unknown
            version, have a header field of the wrong type, or variables that
            are not the arrays the header lists; the message starts with ``where``.
    """
    if len(data) < PREFIX.size + DIGEST_BYTES:
        raise ValueError(f"{where} is truncated ({len(data)} bytes)")
    magic, _ = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{where} is not an exported jaxopt_serve model (bad magic bytes {magic!r})")
    if hashlib.sha256(data[:-DIGEST_BYTES]).digest() != data[-DIGEST_BYTES:]:
        try:  # a readable header that announces another size: say truncated (or extended) rather than corrupted
            _, expected = _parse_header(data, where)
        except ValueError:
            expected = len(data)
        if expected != len(data):
            what = "truncated" if len(data) < expected else "corrupted"
            raise ValueError(f"{where} is {what}: its header announces {expected} bytes, the file has {len(data)}")
        raise ValueError(f"{where} is corrupted: SHA-256 checksum mismatch")
    header, expected = _parse_header(data, where)
    if expected != len(data):
        raise ValueError(f"{where} is corrupted: its header announces {expected} bytes, the file has {len(data)}")
    start = PREFIX.size + PREFIX.unpack_from(data)[1]
    function = data[start : start + header["function_bytes"]]
    blob = data[start + header["function_bytes"] : start + header["function_bytes"] + header["variables_bytes"]]
    specs = _variable_specs(header)
    names = [spec["path"] for spec in specs]
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            stored = set(npz.files)
            if stored != set(names) or len(names) != header["num_leaves"]:
                raise ValueError(
                    f"{where}: the stored variables {sorted(stored - set(names))[:5]} and the header's "
                    f"{sorted(set(names) - stored)[:5]} differ ({len(stored)} stored, "
                    f"{len(names)} listed)"
                )
            leaves = [npz[name] for name in names]
    except ValueError as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where} is corrupted: its variables cannot be read ({err})") from err
    except Exception as err:  # noqa: BLE001 - zipfile and numpy raise many types on malformed bytes
        raise ValueError(f"{where} is corrupted: its variables cannot be read ({type(err).__name__}: {err})") from err
    for spec, leaf in zip(specs, leaves):
        if not _numeric(leaf.dtype) or (
            spec["shape"] is not None and (list(leaf.shape) != spec["shape"] or leaf.dtype != np.dtype(spec["dtype"]))
        ):
            raise ValueError(
                f"{where}: variable {spec['path']} is stored as {leaf.dtype}{list(leaf.shape)}, "
                f"the header lists {spec['dtype']}{spec['shape']}"
            )
    return header, function, leaves


def _check_finite(leaves: list[np.ndarray], header: dict[str, Any], where: str) -> None:
    for spec, leaf in zip(_variable_specs(header), leaves):
        if leaf.dtype.kind == "f" or leaf.dtype.name == "bfloat16":
            finite = np.isfinite(leaf)
            if not finite.all():
                raise ValueError(
                    f"{where}: variable {spec['path']} holds {int(leaf.size - finite.sum())} non-finite "
                    f"value(s) (NaN or inf) of {leaf.size}; load_exported(..., allow_nonfinite=True) "
                    f"loads it anyway"
                )


def file_kind(mode: int) -> str:
    """What a path that is not a regular file is, from its ``st_mode`` (for error messages)."""
    import stat

    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _read_file(path: Path) -> bytes:
    """The bytes of the exported artifact at ``path``: a regular file, its size checked against its header first."""
    import os
    import stat

    where = f"exported artifact {path}"
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{where} is {file_kind(mode)}, not a file")
        size = os.fstat(fd).st_size

        def read(offset: int, length: int) -> bytes:
            os.lseek(fd, offset, os.SEEK_SET)
            chunks = []
            while length > 0:
                chunk = os.read(fd, min(length, 1 << 26))
                if not chunk:
                    raise ValueError(f"{where} changed while it was read")
                chunks.append(chunk)
                length -= len(chunk)
            return b"".join(chunks)

        head = read(0, min(size, PREFIX.size))
        if size >= PREFIX.size and head[:8] == MAGIC:
            header_len = PREFIX.unpack(head)[1]
            if PREFIX.size + header_len + DIGEST_BYTES <= size:
                try:
                    _, expected = _parse_header(head + read(PREFIX.size, header_len), where)
                except ValueError:
                    expected = size  # unreadable header: the checksum over the whole (regular, finite) file decides
                if expected != size:
                    what = "truncated" if size < expected else "corrupted"
                    raise ValueError(f"{where} is {what}: its header announces {expected} bytes, the file has {size}")
        return read(0, size)
    finally:
        os.close(fd)


def pack_exported(header: dict[str, Any], function: bytes, leaves: list[np.ndarray]) -> bytes:
    """The bytes of an exported artifact (see the module docstring); variables named by ``header["variables"]``."""
    names = [spec["path"] for spec in header.get("variables", [])] or [str(i) for i in range(len(leaves))]
    if len(names) != len(leaves) or len(set(names)) != len(names):
        raise ValueError(f"{len(leaves)} variables need {len(leaves)} distinct paths, got {len(set(names))}")
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(leaf) for name, leaf in zip(names, leaves)})
    blob = buffer.getvalue()
    header = {
        **header,
        "format_version": FORMAT_VERSION,
        "function_bytes": len(function),
        "variables_bytes": len(blob),
        "num_leaves": len(leaves),
    }
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    body = PREFIX.pack(MAGIC, len(header_bytes)) + header_bytes + bytes(function) + blob
    return body + hashlib.sha256(body).digest()


def load_exported(path: str | Path, *, nan_policy: str = "propagate", allow_nonfinite: bool = False) -> ExportedModel:
    """Load an exported artifact written by ``jaxopt_serve.engine.export_model``.

    Every error about the file (not a regular file, truncated, corrupted, a
    header field of the wrong type, variables that do not fit the function, or
    holding NaN or inf while ``allow_nonfinite`` is false) is a ``ValueError``
    whose message starts with ``exported artifact PATH``; a missing or
    unreadable file raises the usual ``OSError``.

    ``nan_policy`` decides what calls do with rows holding a NaN or inf in a
    float input, as in ``InferenceEngine``: ``"propagate"`` runs them as zero
    rows and returns NaN in their float outputs (no row depends on the other
    rows of the call); ``"error"`` raises a ``ValueError`` naming them.
    """
    from jax import export

    where = f"exported artifact {path}"
    header, function, leaves = read_exported(_read_file(Path(path)), where)
    if not allow_nonfinite:
        _check_finite(leaves, header, where)
    try:
        exported = export.deserialize(bytearray(function))
    except Exception as err:  # noqa: BLE001 - flatbuffers and jax raise many types on malformed bytes
        raise ValueError(
            f"{where} is corrupted: its function cannot be deserialized ({type(err).__name__}: {err})"
        ) from err
    try:
        return ExportedModel(header, exported, leaves, nan_policy=nan_policy)
    except ValueError as err:
        if str(err).startswith(where) or "nan_policy" in str(err):
            raise
        raise ValueError(f"{where}: {err}") from err
