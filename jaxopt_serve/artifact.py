"""Model artifacts: variables in one checksummed, atomically written file, with what it takes to run them.

File layout (no pickle anywhere)::

    b"JXSERVE\\0"                      8 bytes, magic
    header length                      8 bytes, little-endian unsigned
    header                             UTF-8 JSON (see below)
    payload                            variables as msgpack (``flax.serialization``),
                                       LZMA-compressed when the header says so
    SHA-256 of everything above        32 bytes

Two kinds of header:

* Reference models (``jaxopt_serve.models``, format version 1): the model
  config, ``input_shape``, ``input_dtype``, ``layout``, ``payload_bytes``,
  ``metadata``. Loading rebuilds the model from the config and checks the
  variables against freshly initialised ones.
* Any other ``Model`` (``Model.linen`` / ``Model.nnx`` / ``Model.function``,
  format version 2, written by ``Artifact.for_model`` and by
  ``quantized_artifact`` / ``sparse_artifact`` given a ``Model``): instead of a
  config, ``"model": {"name", "kind"}``, ``"input_spec"`` (one entry per leaf
  of one example: ``path``, ``shape`` without the batch axis, ``dtype``) and
  ``"variables_spec"`` (one entry per variable leaf: ``path``, ``shape``,
  ``dtype``; quantized leaves give the float shape and dtype they stand for and
  their ``qtype``, RNG keys their ``impl``); ``layout``, ``payload_bytes`` and
  ``metadata`` as in version 1. The library cannot rebuild such a model, so
  loading needs it back: ``load_artifact(path, model=model)`` checks the
  variables against the model's own variables and returns an artifact whose
  ``.model`` runs them.

RNG keys (NNX modules keep ``nnx.Rngs`` state, e.g. for dropout, as typed key
leaves such as ``key<fry>`` under ``variables["state"]``): msgpack stores
arrays only, so each key is saved as ``jax.random.key_data(key)`` (a uint32
array) with the key implementation's name in ``variables_spec``, and wrapped
back with ``jax.random.wrap_key_data`` on load: the RNG state round-trips
exactly, so dropout draws the same masks after loading as before saving.

Loading reads regular files only (a directory, FIFO or device is refused
before any read), reads the fixed prefix and the header first, and compares
the size the header announces with the file's before reading the payload. A
file that is shorter than its header says is reported as truncated; any
changed byte fails the checksum. Every header field is checked for its type
(an ``ArtifactError`` naming the file and the field), every stored variable
must be an array, and variables holding NaN or inf are refused unless
``allow_nonfinite=True``. Writes go to a temporary file in the same directory,
are flushed to disk, then renamed over the target, so a crash never leaves a
half-written artifact under the real name (and the next save removes the
temporary file a killed save left behind).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from jaxopt_serve.fileio import NotARegularFileError, RegularFile, atomic_write
from jaxopt_serve.model import LIBRARY_COLLECTIONS, Model, plain
from jaxopt_serve.models.config import ModelConfig, config_from_dict
from jaxopt_serve.models.functional import Variables, init_variables

MAGIC = b"JXSERVE\0"
FORMAT_VERSION = 1  # headers holding a reference model's config
MODEL_FORMAT_VERSION = 2  # headers of a Model without a config: the model is passed back to load_artifact
_VERSIONS = (FORMAT_VERSION, MODEL_FORMAT_VERSION)
_PREFIX = struct.Struct("<8sQ")
_DIGEST_BYTES = 32
COMPRESSIONS = (None, "lzma")
_MAX_PAYLOAD = 1 << 36  # refuse to inflate a compressed payload past 64 GiB

# layout name -> function(target, raw variables, header) -> variables, for
# chapters that store variables in another form (quantized, sparse); target is
# the artifact's ModelConfig, or the Model passed to load_artifact.
_LAYOUTS: dict[str, Callable[[Any, Variables, dict[str, Any]], Variables]] = {}
# layout name -> function(variables) -> plain nested dict of arrays, applied by
# ``save_artifact`` (layouts whose in-memory variables are not plain arrays).
_ENCODERS: dict[str, Callable[[Variables, dict[str, Any]], Variables]] = {}


class ArtifactError(ValueError):
    """An artifact could not be read: truncated, corrupted, not an artifact, or not fitting its model."""


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A saved model: its variables, and its config (reference models) or its ``Model``.

    Attributes:
        config: rebuilds a reference model; ``None`` for a ``Model`` without a config.
        variables: ``{"params": ..., "batch_stats": ...}`` as plain nested dicts.
        input_shape: shape of one example (no batch axis); for a ``Model`` whose
            input is not one array, ``None`` (the header's ``input_spec`` lists every leaf).
        metadata: free-form JSON-ready information (training, accuracy, ...).
        layout: how ``variables`` are stored; ``"dense"`` for float arrays
            shaped like the model's own variables.
        compression: ``None``, or ``"lzma"`` to compress the payload on disk
            (Python's standard library; worth it for sparse layouts).
        model: the ``Model`` holding ``variables`` (``Artifact.for_model``, or
            ``load_artifact(path, model=...)``); ``None`` for a reference model
            loaded without one. Not compared by ``==``.
    """

    config: ModelConfig | None
    variables: Variables
    input_shape: tuple[int, ...] | None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    layout: str = "dense"
    compression: str | None = None
    model: Model | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"Artifact.compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if self.config is None and self.model is None:
            raise ValueError("an Artifact needs a reference ModelConfig or a Model (see Artifact.for_model)")

    @classmethod
    def for_model(
        cls, model: Model, variables: Variables | None = None, metadata: dict[str, Any] | None = None
    ) -> Artifact:
        """An artifact of ``variables`` (default: the model's own) for any ``Model``, ready for ``save_artifact``.

        Float variables get the ``"dense"`` layout; variables holding ``QArray``
        leaves the ``"quantized"`` one (as ``quant.quantized_artifact(model, ...)``;
        sparse files: ``prune.sparse_artifact(model, ...)``). A model without a
        config is saved with a format-2 header (module docstring) and loads with
        ``load_artifact(path, model=model)``; a reference model keeps its config.

        Args:
            model: a ``Model`` (``Model.linen`` / ``Model.nnx`` / ``Model.function`` / ``Model.from_config``).
            variables: the variables to save; they must fit the model's own
                variables (same paths, shapes and dtypes).
            metadata: free-form JSON-ready information.

        Raises:
            ArtifactError: a variable is missing, extra, or of another shape or
                dtype than the model's; the message names its path and both shapes.

        Example:
            >>> import os, tempfile
            >>> import jax.numpy as jnp
            >>> from jaxopt_serve.model import Model
            >>> f = lambda p, x: x @ p["w"] + p["b"]
            >>> model = Model.function(f, {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)}, jnp.ones((1, 4)))
            >>> path = os.path.join(tempfile.mkdtemp(), "f.jxs")
            >>> size = save_artifact(path, Artifact.for_model(model, metadata={"note": "mine"}))
            >>> loaded = load_artifact(path, model=model)
            >>> loaded.model(loaded.variables, jnp.ones((3, 4))).shape, loaded.config, loaded.metadata
            ((3, 2), None, {'note': 'mine'})
        """
        model = _require_model(model, "Artifact.for_model")
        variables = model.variables if variables is None else variables
        if not isinstance(variables, Mapping):
            raise TypeError(
                f"Artifact.for_model: variables must be a dict of collections, got {type(variables).__name__}"
            )
        variables = {str(k): plain(v) for k, v in variables.items()}
        if _has_qarrays(variables):
            from jaxopt_serve.quant.serialize import quantized_artifact

            return quantized_artifact(model, variables, metadata=metadata)
        check_model_variables(model, variables)
        return cls(
            model.config,
            variables,
            _model_input_shape(model),
            dict(metadata or {}),
            model=model.with_variables(variables),
        )


def register_layout(
    name: str,
    decode: Callable[[Any, Variables, dict[str, Any]], Variables],
    encode: Callable[[Variables, dict[str, Any]], Variables] | None = None,
) -> None:
    """Let ``load_artifact`` decode variables stored with layout ``name``.

    ``encode(variables, metadata)`` (optional) turns an ``Artifact``'s in-memory variables of that
    layout into the plain nested dict of arrays ``save_artifact`` writes;
    ``decode(target, raw, header)`` turns them back (raising ``ArtifactError``
    when they do not fit the model; ``load_artifact`` prefixes the file path).
    ``target`` is the artifact's ``ModelConfig``, or, for an artifact saved
    without a config, the ``Model`` passed to ``load_artifact`` (RNG keys in
    ``raw`` are already wrapped back into key arrays).
    """
    _LAYOUTS[name] = decode
    if encode is None:
        _ENCODERS.pop(name, None)
    else:
        _ENCODERS[name] = encode


def save_artifact(path: str | os.PathLike[str], artifact: Artifact) -> int:
    """Write ``artifact`` to ``path`` atomically; returns the file size in bytes.

    An artifact with a config gets a format-1 header; one of a ``Model``
    without a config (``Artifact.for_model``) a format-2 header with the
    model's name and kind, its input spec and its variables spec (module docstring).

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
    variables = artifact.variables
    if artifact.config is not None:
        header: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model": artifact.config.to_dict(),
            "input_shape": list(artifact.input_shape or ()),
            "input_dtype": artifact.config.input_dtype,
        }
    else:
        model = artifact.model
        header = {
            "format_version": MODEL_FORMAT_VERSION,
            "model": {"name": model.name, "kind": model.kind},
            "input_spec": _input_spec(model),
            "variables_spec": _variables_spec(variables),
        }
        variables = _unwrap_keys(variables)
    encode = _ENCODERS.get(artifact.layout)
    variables = encode(variables, artifact.metadata) if encode is not None else variables
    payload = serialization.msgpack_serialize(_to_numpy(variables))
    if artifact.compression == "lzma":
        payload = lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME)
    header.update(layout=artifact.layout, payload_bytes=len(payload), metadata=artifact.metadata)
    if artifact.compression is not None:
        header["compression"] = artifact.compression
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    body = _PREFIX.pack(MAGIC, len(header_bytes)) + header_bytes + payload
    data = body + hashlib.sha256(body).digest()
    atomic_write(path, data)
    return len(data)


def load_artifact(
    path: str | os.PathLike[str],
    *,
    check_shapes: bool = True,
    model: Model | None = None,
    allow_nonfinite: bool = False,
) -> Artifact:
    """Read an artifact written by ``save_artifact``, verifying length and checksum.

    Args:
        path: the artifact file.
        check_shapes: for the ``"dense"`` layout, check that every variable the
            model expects is present with the right shape and dtype, and that
            there are no extra ones (other layouts always check).
        model: the ``Model`` the artifact was saved from; required for an
            artifact saved without a config (``Artifact.for_model`` of a
            ``Model.linen`` / ``Model.nnx`` / ``Model.function``). The loaded
            variables are checked against the model's own variables (paths,
            shapes, dtypes; a quantized leaf against the float leaf it stands
            for) and the returned artifact's ``.model`` is the model holding
            them. Optional for reference-model artifacts (then checked against
            both the config and the model). With a model, the variables come
            back as ``jax.Array`` s (ready to run); without one, as numpy arrays.
        allow_nonfinite: load variables holding NaN or inf (refused by default:
            such a model answers NaN or garbage for every input).

    Raises:
        ArtifactError: the path is not a regular file; the file is truncated,
            corrupted, of an unknown version, has a header field of the wrong
            type, stores something else than arrays, holds non-finite
            variables, was saved without a config and ``model`` is missing, or
            its variables do not fit its model (the message names the file, and
            the field or the variable's path).
        OSError: the file is missing or cannot be read.

    Example:
        >>> import os, tempfile
        >>> import jax.numpy as jnp
        >>> from jaxopt_serve.model import Model
        >>> model = Model.function(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 2))}, jnp.ones((1, 4)))
        >>> path = os.path.join(tempfile.mkdtemp(), "w.jxs")
        >>> size = save_artifact(path, Artifact.for_model(model))
        >>> load_artifact(path)
        Traceback (most recent call last):
        ...
        jaxopt_serve.artifact.ArtifactError: artifact ...w.jxs was saved from the function model '<lambda>', ...
        >>> load_artifact(path, model=model).variables["params"]["w"].shape
        (4, 2)
    """
    path = Path(path)
    if model is not None:
        model = _require_model(model, "load_artifact")
    header, payload = _read(path)
    saved_from = _saved_from(path, header) if header["format_version"] == MODEL_FORMAT_VERSION else None
    if saved_from is not None and model is None:
        raise ArtifactError(
            f"{saved_from}, which has no config: pass that model to load it, load_artifact(path, model=model)"
        )
    compression = header.get("compression")
    if compression == "lzma":
        try:
            decompressor = lzma.LZMADecompressor()
            payload = decompressor.decompress(payload, max_length=_MAX_PAYLOAD)
        except lzma.LZMAError as err:
            raise ArtifactError(
                f"artifact {path} is corrupted: its LZMA payload cannot be decompressed ({err})"
            ) from err
        if not decompressor.eof:
            raise ArtifactError(
                f"artifact {path} is corrupted: its LZMA payload is incomplete or inflates past {_MAX_PAYLOAD:,} bytes"
            )
    elif compression is not None:
        raise ArtifactError(f"artifact {path}: unknown payload compression {compression!r}; known: ['lzma']")
    raw = _restore(path, payload)
    if not allow_nonfinite:
        _check_finite(path, raw)
    layout = header.get("layout", "dense")
    if layout != "dense" and layout not in _LAYOUTS:
        raise ArtifactError(f"artifact {path}: unknown variables layout {layout!r}; known: {['dense', *_LAYOUTS]}")
    if saved_from is not None:
        config, input_shape, where = None, _header_input_shape(path, header), saved_from
        raw = _wrap_keys(where, raw, header.get("variables_spec", []))
        target: Any = model
    else:
        try:
            config = config_from_dict(header["model"])
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ArtifactError(f"artifact {path}: header field 'model' is not a valid model config: {err!r}") from err
        input_shape, where, target = tuple(header["input_shape"]), f"artifact {path}", config
    try:
        if layout == "dense":
            variables = raw
            if check_shapes and config is not None:
                _check_variables(path, config, variables, input_shape)
            if check_shapes and model is not None:
                check_model_variables(model, variables)
        else:
            variables = _LAYOUTS[layout](target, raw, header)
            if config is not None and model is not None:
                check_model_variables(model, variables)
    except ArtifactError as err:
        if str(err).startswith(f"artifact {path}"):
            raise
        raise ArtifactError(f"{where}: {err}") from err
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        # a layout decoder or an init meeting data it did not expect: still an error naming the file
        raise ArtifactError(
            f"{where}: its {layout} variables do not fit the model ({type(err).__name__}: {err})"
        ) from err
    if model is not None:  # ready to run; immutable, so an NNX training step cannot write into the loaded arrays
        variables = jax.tree.map(jnp.asarray, variables)
    return Artifact(
        config,
        variables,
        input_shape,
        header.get("metadata", {}),
        layout,
        compression,
        model.with_variables(variables) if model is not None else None,
    )


def check_model_variables(model: Model, variables: Mapping[str, Any]) -> None:
    """Check that ``variables`` fit ``model``'s own variables: the same leaf paths, shapes and dtypes.

    A ``QArray`` leaf fits the float leaf it stands for (its shape and dtype);
    RNG key leaves must have the same key type. The quantization collections
    (``quant_act``, ``quant_smooth``, ``quant_asym``) are not compared
    (``quant.check_qvariables`` checks them).

    Raises:
        ArtifactError: a variable is missing, extra, or of another shape or
            dtype; the message names its path and both shapes.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_serve.model import Model
        >>> m = Model.function(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 2))}, jnp.ones((1, 4)))
        >>> check_model_variables(m, {"params": {"w": jnp.ones((4, 3))}})
        Traceback (most recent call last):
        ...
        jaxopt_serve.artifact.ArtifactError: variable params/w is float32[4, 3], the model expects float32[4, 2]
    """
    if not isinstance(variables, Mapping):
        raise ArtifactError(f"variables must be a dict of collections, got {type(variables).__name__}")
    name = f"the {model.kind} model {model.name!r}"
    _compare_leaves(_leaf_specs(model.variables), _model_leaves(variables), name)


# ---------------------------------------------------------------------------- helpers shared with the layouts


def _model_input_shape(model: Model) -> tuple[int, ...] | None:
    """One example's shape when ``model`` takes one array, else ``None``."""
    if len(model.example) == 1 and isinstance(model.example[0], np.ndarray):
        return tuple(int(d) for d in model.example[0].shape[1:])
    return None


def _resolve_target(
    config: Any, input_shape: Any, where: str
) -> tuple[ModelConfig | None, Model | None, tuple[int, ...] | None]:
    """``(config, model, input_shape)`` for a ``ModelConfig`` (with ``input_shape``) or a ``Model`` in its place."""
    if isinstance(config, Model):
        if config.config is None:
            return None, config, _model_input_shape(config)
        shape = input_shape if input_shape is not None else _model_input_shape(config)
        return config.config, config, tuple(int(d) for d in shape)
    if isinstance(config, ModelConfig):
        if input_shape is None:
            raise TypeError(f"{where}: a ModelConfig needs input_shape, the shape of one example")
        return config, None, tuple(int(d) for d in input_shape)
    raise TypeError(f"{where}: expected a ModelConfig or a jaxopt_serve Model, got {type(config).__name__}")


def _input_spec(model: Model) -> list[dict[str, Any]]:
    """The header's ``input_spec``: ``path``, ``shape`` (no batch axis) and ``dtype`` of every leaf of one example."""
    return [
        {"path": _path(p), "shape": [int(d) for d in s.shape], "dtype": str(s.dtype)}
        for p, s in jax.tree_util.tree_leaves_with_path(model.input_spec())
    ]


def _variables_spec(variables: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The header's ``variables_spec``: ``path``, ``shape`` and ``dtype`` of every leaf (``qtype`` / ``impl`` too)."""
    from jaxopt_serve.quant.qarray import is_qarray

    spec = []
    for p, leaf in jax.tree_util.tree_leaves_with_path(dict(variables), is_leaf=is_qarray):
        shape, dtype = _shape_dtype(leaf)
        entry: dict[str, Any] = {"path": _path(p), "shape": list(shape), "dtype": dtype}
        if is_qarray(leaf):
            entry["qtype"] = leaf.qtype
        elif _is_key(leaf):
            entry["impl"] = str(jax.random.key_impl(leaf))
        spec.append(entry)
    return spec


def _leaf_specs(variables: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{path: (shape, dtype name)}`` of the model leaves (library collections aside); quantized leaves as float."""
    return {key: _shape_dtype(leaf) for key, leaf in _model_leaves(variables).items()}


def _model_leaves(variables: Mapping[str, Any]) -> dict[str, Any]:
    """``{path: leaf}`` of ``variables`` without the library's collections; ``QArray`` s are leaves."""
    from jaxopt_serve.quant.qarray import is_qarray

    rest = {k: v for k, v in variables.items() if k not in LIBRARY_COLLECTIONS}
    return {_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(rest, is_leaf=is_qarray)}


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype name)`` of an array, a ``ShapeDtypeStruct``, an RNG key array or a ``QArray`` (float view)."""
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    name = str(dtype) if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else str(jnp.dtype(dtype))
    shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
    return tuple(int(d) for d in shape), name


def _compare_leaves(want: Mapping[str, tuple[tuple[int, ...], str]], have: Mapping[str, Any], name: str) -> None:
    """Raise ``ArtifactError`` unless ``have`` has exactly ``want``'s paths, each of its shape and dtype."""
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise ArtifactError(f"variables do not fit {name}: missing {missing}, unexpected {extra}")
    for key, (shape, dtype) in want.items():
        leaf = have[key]
        got_shape, got_dtype = _shape_dtype(leaf)
        if got_shape != tuple(shape) or got_dtype != dtype:
            qtype = getattr(leaf, "qtype", None)
            kind = f"quantized variable {key} ({qtype})" if qtype is not None else f"variable {key}"
            raise ArtifactError(f"{kind} is {got_dtype}{list(got_shape)}, the model expects {dtype}{list(shape)}")


def _require_model(model: Any, where: str) -> Model:
    if not isinstance(model, Model):
        raise TypeError(
            f"{where}: model must be a jaxopt_serve Model (Model.linen / Model.nnx / Model.function), "
            f"got {type(model).__name__}"
        )
    return model


def _has_qarrays(variables: Any) -> bool:
    from jaxopt_serve.quant.qarray import has_qarrays

    return has_qarrays(variables)


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _path(key_path: Any) -> str:
    """``"params/dense_0/kernel"`` from a jax key path (the quantization rules' path form)."""
    from jaxopt_serve.quant.rules import path_str

    return path_str(key_path)


def _unwrap_keys(variables: Mapping[str, Any]) -> dict[str, Any]:
    """RNG key leaves replaced by their ``key_data`` (uint32 arrays msgpack can store)."""
    from jaxopt_serve.quant.qarray import is_qarray

    return jax.tree.map(
        lambda x: np.asarray(jax.random.key_data(x)) if _is_key(x) else x, dict(variables), is_leaf=is_qarray
    )


def _wrap_keys(where: str, raw: Any, spec: list[dict[str, Any]]) -> Any:
    """Inverse of ``_unwrap_keys``: the leaves ``variables_spec`` marks with an ``impl`` become key arrays again."""
    impls = {entry["path"]: entry["impl"] for entry in spec if isinstance(entry, dict) and "impl" in entry}
    if not impls:
        return raw
    found = set()

    def wrap(p: Any, leaf: Any) -> Any:
        key = _path(p)
        if key not in impls:
            return leaf
        found.add(key)
        data = np.asarray(leaf)
        try:
            if data.dtype != np.uint32:
                raise TypeError(f"key data must be uint32, got {data.dtype}")
            return jax.random.wrap_key_data(data, impl=impls[key])
        except (TypeError, ValueError, KeyError) as err:
            raise ArtifactError(
                f"{where}: RNG key {key} ({impls[key]}, key data {data.dtype}{list(data.shape)}) "
                f"cannot be restored: {err}"
            ) from err

    out = jax.tree_util.tree_map_with_path(wrap, raw)
    if set(impls) - found:
        raise ArtifactError(
            f"{where}: RNG keys {sorted(set(impls) - found)} listed in the header are not in the payload"
        )
    return out


def _saved_from(path: Path, header: dict[str, Any]) -> str:
    info = header.get("model")
    if not isinstance(info, dict) or not isinstance(info.get("name"), str) or not isinstance(info.get("kind"), str):
        raise ArtifactError(
            f"artifact {path} is corrupted: its header's model must be {{'name', 'kind'}}, got {info!r}"
        )
    return f"artifact {path} was saved from the {info['kind']} model {info['name']!r}"


def _header_input_shape(path: Path, header: dict[str, Any]) -> tuple[int, ...] | None:
    spec = header["input_spec"]  # checked by _check_header
    if len(spec) == 1 and spec[0]["path"] == "0":
        return tuple(spec[0]["shape"])
    return None


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    """``(header, payload)`` of the artifact at ``path``: size checked against the header, checksum verified.

    Only the 16-byte prefix and the header are read before the file's size is
    compared with the size the header announces; a directory, FIFO or device is
    refused before any read.
    """
    try:
        file = RegularFile(path, "artifact")
    except NotARegularFileError as err:
        raise ArtifactError(str(err)) from None
    with file:
        size = file.size
        if size < _PREFIX.size:
            raise ArtifactError(f"artifact {path} is truncated: {size} bytes, not even a header")
        prefix = file.read_exact(0, _PREFIX.size, "prefix")
        magic, header_len = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise ArtifactError(f"{path} is not a jaxopt_serve artifact (bad magic bytes {magic!r})")
        if _PREFIX.size + header_len > size:
            raise ArtifactError(
                f"artifact {path} is truncated: its header needs {_PREFIX.size + header_len} bytes, file has {size}"
            )
        header_bytes = file.read_exact(_PREFIX.size, header_len, "header")
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (ValueError, RecursionError) as err:
            raise ArtifactError(f"artifact {path} is corrupted: its header cannot be read ({err})") from err
        if not isinstance(header, dict):
            raise ArtifactError(
                f"artifact {path} is corrupted: its header is a JSON {type(header).__name__}, not an object"
            )
        payload_bytes = header.get("payload_bytes")
        if not _is_int(payload_bytes) or payload_bytes < 0:
            raise ArtifactError(
                f"artifact {path} is corrupted: header field 'payload_bytes' must be a "
                f"non-negative integer, got {_short(payload_bytes)}"
            )
        expected = _PREFIX.size + header_len + payload_bytes + _DIGEST_BYTES
        if size < expected:
            raise ArtifactError(f"artifact {path} is truncated: expected {expected} bytes, found {size}")
        if size > expected:
            raise ArtifactError(
                f"artifact {path} is corrupted: {size - expected} unexpected bytes after the expected {expected}"
            )
        payload = file.read_exact(_PREFIX.size + header_len, payload_bytes, "payload")
        stored = file.read_exact(expected - _DIGEST_BYTES, _DIGEST_BYTES, "checksum")
    actual = hashlib.sha256(prefix + header_bytes + payload).digest()
    if stored != actual:
        raise ArtifactError(
            f"artifact {path} is corrupted: SHA-256 checksum mismatch (stored {stored.hex()[:16]}..., "
            f"computed {actual.hex()[:16]}...)"
        )
    version = header.get("format_version")
    if not _is_int(version) or version not in _VERSIONS:
        raise ArtifactError(
            f"artifact {path} has format version {version!r}; this version reads {' and '.join(map(str, _VERSIONS))}"
        )
    _check_header(path, header)
    return header, payload


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_shape(value: Any, *, allow_none: bool = False) -> bool:
    return isinstance(value, list) and all((_is_int(d) and d >= 0) or (allow_none and d is None) for d in value)


def _is_dtype(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    if value.startswith("key<") and value.endswith(">"):
        return True
    try:
        return _is_numeric(jnp.dtype(value))
    except (TypeError, ValueError):
        return False


def _is_numeric(dtype: np.dtype) -> bool:
    return dtype.kind in "biuf" or bool(jnp.issubdtype(dtype, jnp.floating))


def _field_error(path: Path, field: str, expected: str, value: Any) -> ArtifactError:
    return ArtifactError(
        f"artifact {path} is corrupted: header field {field!r} must be {expected}, got {_short(value)}"
    )


def _check_header(path: Path, header: dict[str, Any]) -> None:
    """Every structural header field of the right type (``ArtifactError`` naming the file and the field)."""
    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("layout", lambda v: isinstance(v, str), "a string"),
        ("compression", lambda v: v is None or isinstance(v, str), "a string"),
        ("metadata", lambda v: isinstance(v, dict), "a JSON object"),
    ]
    if header["format_version"] == FORMAT_VERSION:
        checks += [
            (
                "model",
                lambda v: (
                    isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("fields", {}), dict)
                ),
                "a model config {'name': ..., 'fields': {...}}",
            ),
            ("input_shape", _is_shape, "a list of non-negative integers"),
            ("input_dtype", _is_dtype, "a numeric dtype name"),
        ]
        required = ("model", "input_shape")
    else:
        checks += [
            (
                "model",
                lambda v: isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("kind"), str),
                "{'name': str, 'kind': str}",
            ),
            ("input_spec", lambda v: isinstance(v, list), "a list of {'path', 'shape', 'dtype'}"),
            ("variables_spec", lambda v: isinstance(v, list), "a list of {'path', 'shape', 'dtype'}"),
        ]
        required = ("model", "input_spec")
    for name in required:
        if name not in header:
            raise ArtifactError(f"artifact {path} is corrupted: its header has no {name!r} field")
    for name, check, expected in checks:
        if name in header and not check(header[name]):
            raise _field_error(path, name, expected, header[name])
    for name in ("input_spec", "variables_spec"):
        for i, entry in enumerate(header.get(name, [])):
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("path"), str)
                and _is_shape(entry.get("shape"))
                and _is_dtype(entry.get("dtype"))
                and all(isinstance(entry.get(k, ""), str) for k in ("qtype", "impl"))
            )
            if not ok:
                raise _field_error(path, f"{name}[{i}]", "{'path': str, 'shape': [int, ...], 'dtype': str}", entry)


def _restore(path: Path, payload: bytes) -> dict[str, Any]:
    """The payload's msgpack tree: nested dicts with string keys and numeric arrays (errors name the file and path)."""
    try:
        raw = serialization.msgpack_restore(payload)
    except Exception as err:  # noqa: BLE001 - msgpack raises many types on malformed bytes; all mean "corrupted"
        raise ArtifactError(
            f"artifact {path} is corrupted: its variables cannot be decoded ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(raw, dict):
        raise ArtifactError(
            f"artifact {path} is corrupted: its variables are a {type(raw).__name__}, not a dict of collections"
        )

    def check(tree: Any, where: str) -> None:
        if isinstance(tree, dict):
            for key, value in tree.items():
                if not isinstance(key, str):
                    raise ArtifactError(
                        f"artifact {path} is corrupted: variable {where or '/'} has the key {_short(key)}, not a string"
                    )
                check(value, f"{where}/{key}" if where else key)
        elif not isinstance(tree, np.ndarray) or not _is_numeric(tree.dtype):
            kind = f"a {tree.dtype} array" if isinstance(tree, np.ndarray) else f"a {type(tree).__name__}"
            raise ArtifactError(
                f"artifact {path} is corrupted: variable {where} is stored as {kind} "
                f"({_short(tree)}), not a numeric array"
            )

    check(raw, "")
    return raw


def _check_finite(path: Path, raw: Mapping[str, Any]) -> None:
    """Refuse stored float arrays holding NaN or inf (the first one found is named)."""

    def visit(tree: Any, where: str) -> None:
        if isinstance(tree, dict):
            for key, value in tree.items():
                visit(value, f"{where}/{key}" if where else key)
        elif jnp.issubdtype(tree.dtype, jnp.floating) and not np.isfinite(tree).all():
            bad = int(tree.size - np.isfinite(tree).sum())
            raise ArtifactError(
                f"artifact {path}: variable {where} holds {bad} non-finite value(s) (NaN or inf) "
                f"of {tree.size}; load_artifact(..., allow_nonfinite=True) loads it anyway"
            )

    visit(raw, "")


def _check_variables(path: Path, config: ModelConfig, variables: Variables, input_shape: tuple[int, ...]) -> None:
    expected = jax.eval_shape(lambda: init_variables(config, 0, input_shape))
    want = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(expected)}
    have = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(variables)}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise ArtifactError(
            f"artifact {path}: variables do not fit {config.name}: missing {missing}, unexpected {extra}"
        )
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
