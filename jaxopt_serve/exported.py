"""Load and run an exported model: JAX and NumPy only, no model code.

This module imports nothing else from ``jaxopt_serve``, so it also works as a
standalone file (copy it next to the artifact). An exported artifact holds a
``jax.export`` serialization of the compiled inference function, with a
symbolic batch dimension, plus the model's variables as flat arrays::

    b"JXSEXPT\\0"                     8 bytes, magic
    header length                     8 bytes, little-endian
    header                            UTF-8 JSON: format version, input shape and dtype,
                                      model name, byte lengths of the two blobs below
    exported function                 jax.export serialization (needs the ``flatbuffers`` package)
    variables                         .npz of arrays "0", "1", ... (no pickled objects)
    SHA-256 of everything above       32 bytes

Example (in a process that never imports the model)::

    from jaxopt_serve.exported import load_exported   # or: a copy of this file
    model = load_exported("cnn.jxe")
    logits = model(x)                                  # any batch size
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"JXSEXPT\0"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<8sQ")
DIGEST_BYTES = 32


class ExportedModel:
    """A loaded exported artifact: ``model(x)`` runs the compiled function on a numpy batch."""

    def __init__(self, header: dict[str, Any], exported: Any, leaves: list[np.ndarray]) -> None:
        import jax

        self.header = header
        self.input_shape = tuple(header["input_shape"])
        self.input_dtype = np.dtype(header["input_dtype"])
        self._exported = exported
        self._leaves = [jax.device_put(leaf) for leaf in leaves]

    def __call__(self, x: Any) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected a batch of shape (batch, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        if x.dtype != self.input_dtype:
            if np.issubdtype(x.dtype, np.floating) != np.issubdtype(self.input_dtype, np.floating):
                raise ValueError(f"expected {self.input_dtype} inputs, got {x.dtype}")
            x = x.astype(self.input_dtype)
        return np.asarray(self._exported.call(self._leaves, x))


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
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where} has format version {header.get('format_version')!r}; this reader knows {FORMAT_VERSION}")
    start = PREFIX.size + header_len
    function = data[start : start + header["function_bytes"]]
    blob = data[start + header["function_bytes"] : start + header["function_bytes"] + header["variables_bytes"]]
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        leaves = [npz[str(i)] for i in range(header["num_leaves"])]
    return header, function, leaves


def pack_exported(header: dict[str, Any], function: bytes, leaves: list[np.ndarray]) -> bytes:
    """The bytes of an exported artifact (see the module docstring)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{str(i): np.asarray(leaf) for i, leaf in enumerate(leaves)})
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
