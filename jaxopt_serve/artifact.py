"""Model artifacts: module config + variables in one checksummed, atomically written file.

File layout (no pickle anywhere)::

    b"JXSERVE\\0"                      8 bytes, magic
    header length                      8 bytes, little-endian unsigned
    header                             UTF-8 JSON: format version, model config,
                                       input spec, payload length, layout, metadata
    payload                            variables as msgpack (``flax.serialization``),
                                       LZMA-compressed when the header says so
    SHA-256 of everything above        32 bytes

A file that is shorter than its header says is reported as truncated; any
changed byte fails the checksum. Writes go to a temporary file in the same
directory, are flushed to disk, then renamed over the target, so a crash never
leaves a half-written artifact under the real name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from jaxopt_serve.fileio import atomic_write
from jaxopt_serve.models.config import ModelConfig, config_from_dict
from jaxopt_serve.models.functional import Variables, init_variables

MAGIC = b"JXSERVE\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sQ")
_DIGEST_BYTES = 32
COMPRESSIONS = (None, "lzma")
_MAX_PAYLOAD = 1 << 36  # refuse to inflate a compressed payload past 64 GiB

# layout name -> function(config, raw variables, header) -> variables, for
# chapters that store variables in another form (quantized, sparse).
_LAYOUTS: dict[str, Callable[[ModelConfig, Variables, dict[str, Any]], Variables]] = {}
# layout name -> function(variables) -> plain nested dict of arrays, applied by
# ``save_artifact`` (layouts whose in-memory variables are not plain arrays).
_ENCODERS: dict[str, Callable[[Variables, dict[str, Any]], Variables]] = {}


class ArtifactError(ValueError):
    """An artifact could not be read: truncated, corrupted, or not an artifact."""


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A saved model: its config, its variables, and the shape of one input example.

    Attributes:
        config: rebuilds the module.
        variables: ``{"params": ..., "batch_stats": ...}`` as plain nested dicts.
        input_shape: shape of one example (no batch axis).
        metadata: free-form JSON-ready information (training, accuracy, ...).
        layout: how ``variables`` are stored; ``"dense"`` for float arrays
            shaped like the model's own variables.
        compression: ``None``, or ``"lzma"`` to compress the payload on disk
            (Python's standard library; worth it for sparse layouts).
    """

    config: ModelConfig
    variables: Variables
    input_shape: tuple[int, ...]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    layout: str = "dense"
    compression: str | None = None

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"Artifact.compression must be one of {COMPRESSIONS}, got {self.compression!r}")


def register_layout(
    name: str,
    decode: Callable[[ModelConfig, Variables, dict[str, Any]], Variables],
    encode: Callable[[Variables, dict[str, Any]], Variables] | None = None,
) -> None:
    """Let ``load_artifact`` decode variables stored with layout ``name``.

    ``encode(variables, metadata)`` (optional) turns an ``Artifact``'s in-memory variables of that
    layout into the plain nested dict of arrays ``save_artifact`` writes;
    ``decode(config, raw, header)`` turns them back (raising ``ArtifactError``
    when they do not fit the model; ``load_artifact`` prefixes the file path).
    """
    _LAYOUTS[name] = decode
    if encode is None:
        _ENCODERS.pop(name, None)
    else:
        _ENCODERS[name] = encode


def save_artifact(path: str | os.PathLike[str], artifact: Artifact) -> int:
    """Write ``artifact`` to ``path`` atomically; returns the file size in bytes.

    Example:
        >>> import tempfile, os
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> cfg = MLPConfig(features=(8,), num_classes=2)
        >>> art = Artifact(cfg, init_variables(cfg, 0), input_shape=(8, 8, 1))
        >>> path = os.path.join(tempfile.mkdtemp(), "mlp.jxs")
        >>> size = save_artifact(path, art)
        >>> load_artifact(path).config == cfg
        True
    """
    encode = _ENCODERS.get(artifact.layout)
    variables = encode(artifact.variables, artifact.metadata) if encode is not None else artifact.variables
    payload = serialization.msgpack_serialize(_to_numpy(variables))
    if artifact.compression == "lzma":
        payload = lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME)
    header = {
        "format_version": FORMAT_VERSION,
        "model": artifact.config.to_dict(),
        "input_shape": list(artifact.input_shape),
        "input_dtype": artifact.config.input_dtype,
        "layout": artifact.layout,
        "payload_bytes": len(payload),
        "metadata": artifact.metadata,
    }
    if artifact.compression is not None:
        header["compression"] = artifact.compression
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    body = _PREFIX.pack(MAGIC, len(header_bytes)) + header_bytes + payload
    data = body + hashlib.sha256(body).digest()
    atomic_write(path, data)
    return len(data)


def load_artifact(path: str | os.PathLike[str], *, check_shapes: bool = True) -> Artifact:
    """Read an artifact written by ``save_artifact``, verifying length and checksum.

    Args:
        path: the artifact file.
        check_shapes: for the ``"dense"`` layout, check that every variable the
            model expects is present with the right shape and dtype, and that
            there are no extra ones.

    Raises:
        ArtifactError: the file is truncated, corrupted, of an unknown version,
            or its variables do not fit its model.
    """
    path = Path(path)
    data = path.read_bytes()
    header = _parse(path, data)
    start = _PREFIX.size + _header_length(data)
    payload = data[start : start + header["payload_bytes"]]
    compression = header.get("compression")
    if compression == "lzma":
        try:
            payload = lzma.LZMADecompressor().decompress(payload, max_length=_MAX_PAYLOAD)
        except lzma.LZMAError as err:
            raise ArtifactError(f"artifact {path} is corrupted: its LZMA payload cannot be decompressed ({err})") from err
    elif compression is not None:
        raise ArtifactError(f"artifact {path}: unknown payload compression {compression!r}; known: ['lzma']")
    raw = serialization.msgpack_restore(payload)
    try:
        config = config_from_dict(header["model"])
    except (ValueError, TypeError) as err:
        raise ArtifactError(f"artifact {path}: its model config is invalid: {err}") from err
    input_shape = tuple(header["input_shape"])
    layout = header.get("layout", "dense")
    if layout == "dense":
        variables = raw
        if check_shapes:
            _check_variables(path, config, variables, input_shape)
    elif layout in _LAYOUTS:
        try:
            variables = _LAYOUTS[layout](config, raw, header)
        except ArtifactError as err:
            raise ArtifactError(f"artifact {path}: {err}") from err
    else:
        raise ArtifactError(f"artifact {path}: unknown variables layout {layout!r}; known: {['dense', *_LAYOUTS]}")
    return Artifact(config, variables, input_shape, header.get("metadata", {}), layout, compression)


def _header_length(data: bytes) -> int:
    return _PREFIX.unpack_from(data)[1]


def _parse(path: Path, data: bytes) -> dict[str, Any]:
    if len(data) < _PREFIX.size:
        raise ArtifactError(f"artifact {path} is truncated: {len(data)} bytes, not even a header")
    magic, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ArtifactError(f"{path} is not a jaxopt_serve artifact (bad magic bytes {magic!r})")
    if _PREFIX.size + header_len > len(data):
        raise ArtifactError(
            f"artifact {path} is truncated: its header needs {_PREFIX.size + header_len} bytes, file has {len(data)}"
        )
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + header_len].decode("utf-8"))
        payload_bytes = int(header["payload_bytes"])
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"artifact {path} is corrupted: its header cannot be read ({err})") from err
    expected = _PREFIX.size + header_len + payload_bytes + _DIGEST_BYTES
    if len(data) < expected:
        raise ArtifactError(f"artifact {path} is truncated: expected {expected} bytes, found {len(data)}")
    if len(data) > expected:
        raise ArtifactError(
            f"artifact {path} is corrupted: {len(data) - expected} unexpected bytes after the expected {expected}"
        )
    stored = data[-_DIGEST_BYTES:]
    actual = hashlib.sha256(data[:-_DIGEST_BYTES]).digest()
    if stored != actual:
        raise ArtifactError(
            f"artifact {path} is corrupted: SHA-256 checksum mismatch (stored {stored.hex()[:16]}..., "
            f"computed {actual.hex()[:16]}...)"
        )
    if header.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact {path} has format version {header.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    return header


def _check_variables(path: Path, config: ModelConfig, variables: Variables, input_shape: tuple[int, ...]) -> None:
    expected = jax.eval_shape(lambda: init_variables(config, 0, input_shape))
    want = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(expected)}
    have = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(variables)}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise ArtifactError(f"artifact {path}: variables do not fit {config.name}: missing {missing}, unexpected {extra}")
    for key, spec in want.items():
        leaf = have[key]
        if tuple(leaf.shape) != tuple(spec.shape) or np.dtype(leaf.dtype) != np.dtype(spec.dtype):
            raise ArtifactError(
                f"artifact {path}: variable {key} is {leaf.dtype}{list(leaf.shape)}, "
                f"the model expects {spec.dtype}{list(spec.shape)}"
            )


def _to_numpy(tree: Any, path: str = "") -> Any:
    if isinstance(tree, dict):
        return {str(k): _to_numpy(v, f"{path}/{k}" if path else str(k)) for k, v in tree.items()}
    array = np.asarray(jax.device_get(tree))
    if array.dtype == object:
        raise ValueError(
            f"variable {path} is a {type(tree).__name__}, not an array; this layout stores arrays only "
            f"(quantized variables: jaxopt_serve.quant.quantized_artifact)"
        )
    return array
