"""The artifact corruption matrix: every kind of saved file, damaged in every generated way, must fail clearly.

Shared by ``test_artifact_matrix.py`` and ``benchmarks/robustness_report.py``.
Kinds: reference-model artifacts in the dense, quantized and sparse (LZMA)
layouts, a format-2 artifact of a ``Model.function``, an exported model
(``.jxe``) and a distillation checkpoint in the single-file format of earlier
versions (checkpoints are orbax directories now, whose damage cases are in
``tests/train/test_checkpoint.py``; the old files must still load, or fail
clearly); all tiny, built once by ``build_bases``. Cases:

* generic damage (``GENERIC``): an empty file, truncation at 12 offsets, byte
  and bit flips, zeroed regions, appended bytes, a pickle, a ``.npy``, JSON
  text, the other format, a header length of 2**62, and paths that are not
  regular files (a symlink to ``/dev/zero``, a FIFO, a directory, a symlink to
  one, a dangling symlink, a missing file);
* hand edits with a recomputed checksum (``EDITS``): header fields of the wrong
  type or missing, variables stored as strings, lists or of another shape,
  NaN and inf weights, malformed payloads, swapped same-shape exported
  leaves, and controls that must load (an unchanged re-pack, NaN weights with
  ``allow_nonfinite=True``).

``run_case`` classifies the outcome: ``"ok"`` (a clear error naming the file,
or a control that loaded with unchanged values), ``"traceback"`` (another
exception type, or a message without the file's path), ``"hang"`` (no answer
within the timeout) or ``"silent_wrong"`` (a damaged file loaded, or a
control loaded with other values).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import lzma
import os
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

KINDS = ("dense", "quantized", "sparse", "model", "exported", "checkpoint")
ARTIFACT_KINDS = ("dense", "quantized", "sparse", "model")
TIMEOUT_S = 20.0


@dataclasses.dataclass
class Base:
    """One tiny saved file of a kind, with how to load it and a fingerprint of what it holds."""

    kind: str
    data: bytes
    load: Callable[..., Any]  # load(path, **kwargs)
    values: Callable[[Any], list[np.ndarray]]  # the loaded object's arrays (or outputs on a probe batch)
    prefix: int  # bytes before the header (16, or 8 for checkpoints)
    expected: list[np.ndarray] = dataclasses.field(default_factory=list)

    @property
    def header_len(self) -> int:
        return int.from_bytes(self.data[self.prefix - 8 : self.prefix], "little")

    @property
    def header_end(self) -> int:
        return self.prefix + self.header_len


# ---------------------------------------------------------------------------------------------- the bases


def _leaves(tree: Any) -> list[np.ndarray]:
    from jaxopt_serve.quant.rules import dequantize_tree

    return [np.asarray(x) for x in jax.tree.leaves(dequantize_tree(tree))]


def build_bases(root: str | os.PathLike[str]) -> dict[str, Base]:
    """Save one tiny file of every kind under ``root``; ``{kind: Base}``."""
    from jaxopt_serve.artifact import Artifact, load_artifact, save_artifact
    from jaxopt_serve.distill.trainer import load_checkpoint
    from jaxopt_serve.engine import export_model
    from jaxopt_serve.exported import load_exported
    from jaxopt_serve.model import Model
    from jaxopt_serve.models import MLPConfig, init_variables
    from jaxopt_serve.prune.sparse_io import sparse_artifact
    from jaxopt_serve.quant import QuantSpec, default_rules, quantize, quantized_artifact
    from jaxopt_serve.train.loop import init_state
    from jaxopt_serve.train.recipes import default_optimizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config = MLPConfig(features=(8, 8), num_classes=3)  # dense_0 and dense_1 biases share a shape
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_variables(config, 0))
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
    shape = (8, 8, 1)

    bases: dict[str, Base] = {}

    def add(
        kind: str, path: Path, load: Callable[..., Any], values: Callable[[Any], list[np.ndarray]], prefix: int = 16
    ) -> None:
        base = Base(kind, path.read_bytes(), load, values, prefix)
        base.expected = values(load(path))
        bases[kind] = base

    artifact_values = lambda a: _leaves(a.variables)  # noqa: E731

    save_artifact(root / "dense.jxs", Artifact(config, variables, shape))
    add("dense", root / "dense.jxs", load_artifact, artifact_values)

    qvars = quantize(variables, default_rules(QuantSpec(qtype="int8"))).variables
    save_artifact(root / "quantized.jxs", quantized_artifact(config, qvars, shape))
    add("quantized", root / "quantized.jxs", load_artifact, artifact_values)

    pruned = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            np.where(np.arange(x.size).reshape(x.shape) % 2 == 0, 0, x).astype(x.dtype) if p[-1].key == "kernel" else x
        ),
        variables,
    )
    save_artifact(root / "sparse.jxs", sparse_artifact(config, pruned, shape))
    add("sparse", root / "sparse.jxs", load_artifact, artifact_values)

    model = Model.function(
        lambda p, x: jnp.tanh(x @ p["w"] + p["b"]) @ p["v"],
        {
            "w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
            "v": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
        },
        jnp.ones((1, 4), jnp.float32),
    )
    save_artifact(root / "model.jxs", Artifact.for_model(model))
    add("model", root / "model.jxs", lambda p, **kw: load_artifact(p, model=model, **kw), artifact_values)

    export_model(root / "model.jxe", config, variables)
    probe = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, *shape)
    add("exported", root / "model.jxe", load_exported, lambda m: [np.asarray(m(probe))])

    optimizer = default_optimizer(10, learning_rate=1e-3)
    template = init_state(variables, optimizer, seed=0)
    fingerprint = {"run": "robustness", "seed": 0}
    tracker = {
        "best_val_accuracy": 0.5,
        "best_step": 1,
        "bad_epochs": 0,
        "history": [],
        "stopped_early": False,
        "best_params": template.params,
        "best_state": template.model_state,
    }
    (root / "run.ckpt").write_bytes(legacy_checkpoint_bytes(template, tracker, fingerprint))
    add(
        "checkpoint",
        root / "run.ckpt",
        lambda p, **kw: load_checkpoint(p, template, fingerprint, **kw),
        lambda restored: [
            np.asarray(x)
            for x in jax.tree.leaves(
                jax.tree.map(
                    lambda v: jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v, restored[0]
                )
            )
        ],
        prefix=8,
    )
    return bases


def legacy_checkpoint_bytes(template: Any, tracker: dict[str, Any], fingerprint: dict[str, Any]) -> bytes:
    """A distillation checkpoint in the single-file format of earlier versions (2), which still loads.

    Layout: the record's length (8 bytes, little-endian), the record (JSON, with
    ``payload_bytes``), the msgpack payload of the state, the SHA-256 of all of it.
    Checkpoints are orbax directories now; this writer exists only here.
    """
    tree = {
        "step": template.step,
        "params": template.params,
        "model_state": template.model_state,
        "opt_state": template.opt_state,
        "rng": jax.random.key_data(template.rng),
        "best_params": tracker["best_params"],
        "best_state": tracker["best_state"],
    }
    payload = serialization.to_bytes(jax.device_get(tree))
    record = {
        "version": 2,
        "fingerprint": fingerprint,
        "payload_bytes": len(payload),
        **{k: v for k, v in tracker.items() if k not in ("best_params", "best_state")},
    }
    header = json.dumps(record, sort_keys=True).encode("utf-8")
    body = len(header).to_bytes(8, "little") + header + payload
    return body + hashlib.sha256(body).digest()


# ---------------------------------------------------------------------------------------------- re-packing


def split(base: Base, data: bytes | None = None) -> tuple[dict[str, Any], bytes]:
    """``(header, body after the header without the digest)`` of a well-formed file of ``base``'s kind."""
    data = base.data if data is None else data
    header_len = int.from_bytes(data[base.prefix - 8 : base.prefix], "little")
    header = json.loads(data[base.prefix : base.prefix + header_len])
    return header, data[base.prefix + header_len : -32]


def pack(base: Base, header: Any, body: bytes) -> bytes:
    """A file of ``base``'s kind holding ``header`` and ``body``, with a correct checksum (a "hand edit")."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header, sort_keys=True).encode()
    if base.prefix == 16:
        prefix = base.data[:8] + len(header_bytes).to_bytes(8, "little")
    else:
        prefix = len(header_bytes).to_bytes(8, "little")
    out = prefix + header_bytes + body
    return out + hashlib.sha256(out).digest()


def artifact_payload(base: Base) -> Any:
    """The msgpack tree of an artifact's payload (decompressed)."""
    header, body = split(base)
    if header.get("compression") == "lzma":
        body = lzma.decompress(body)
    return serialization.msgpack_restore(body)


def artifact_with_tree(base: Base, tree: Any, **header_changes: Any) -> bytes:
    """The artifact re-packed around another payload tree (its size fixed, compressed as before)."""
    header, _ = split(base)
    body = serialization.msgpack_serialize(tree) if not isinstance(tree, bytes) else tree
    if header.get("compression") == "lzma":
        body = lzma.compress(body)
    header.update(payload_bytes=len(body), **header_changes)
    return pack(base, header, body)


def artifact_with_header(base: Base, **changes: Any) -> bytes:
    header, body = split(base)
    for key, value in changes.items():
        if value is _DELETE:
            header.pop(key, None)
        else:
            header[key] = value
    return pack(base, header, body)


_DELETE = object()


def _first_float_path(tree: Any, prefix: tuple[str, ...] = ()) -> tuple[str, ...]:
    for key, value in tree.items():
        if isinstance(value, dict):
            found = _first_float_path(value, (*prefix, key))
            if found:
                return found
        elif isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size > 1:
            return (*prefix, key)
    return ()


def _first_leaf_path(tree: Any, prefix: tuple[str, ...] = ()) -> tuple[str, ...]:
    for key, value in tree.items():
        if isinstance(value, dict):
            return _first_leaf_path(value, (*prefix, key))
        return (*prefix, key)
    return prefix


def _set(tree: Any, path: tuple[str, ...], value: Any) -> Any:
    tree = dict(tree)
    if len(path) == 1:
        if value is _DELETE:
            tree.pop(path[0])
        else:
            tree[path[0]] = value
    else:
        tree[path[0]] = _set(tree[path[0]], path[1:], value)
    return tree


def _payload_edit(fn: Callable[[Any, tuple[str, ...]], Any], *, floats: bool = False) -> Callable[[Base], bytes]:
    def make(base: Base) -> bytes:
        tree = artifact_payload(base)
        path = _first_float_path(tree) if floats else _first_leaf_path(tree)
        return artifact_with_tree(base, fn(tree, path))

    return make


def _nonfinite(value: float) -> Callable[[Any, tuple[str, ...]], Any]:
    def edit(tree: Any, path: tuple[str, ...]) -> Any:
        leaf = tree
        for key in path:
            leaf = leaf[key]
        leaf = np.array(leaf)
        leaf.reshape(-1)[1] = value
        return _set(tree, path, leaf)

    return edit


def _leaf_change(fn: Callable[[np.ndarray], Any]) -> Callable[[Any, tuple[str, ...]], Any]:
    def edit(tree: Any, path: tuple[str, ...]) -> Any:
        leaf = tree
        for key in path:
            leaf = leaf[key]
        return _set(tree, path, fn(leaf))

    return edit


# exported: header, function bytes and the .npz blob


def exported_parts(base: Base) -> tuple[dict[str, Any], bytes, bytes]:
    header, body = split(base)
    fn = header["function_bytes"]
    return header, body[:fn], body[fn:]


def exported_pack(base: Base, header: dict[str, Any], function: bytes, blob: bytes, *, sizes: bool = True) -> bytes:
    if sizes:
        header = {**header, "function_bytes": len(function), "variables_bytes": len(blob)}
    return pack(base, header, function + blob)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npz_arrays(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob)) as npz:
        return {name: npz[name] for name in npz.files}


def _exported_header_edit(**changes: Any) -> Callable[[Base], bytes]:
    def make(base: Base) -> bytes:
        header, function, blob = exported_parts(base)
        for key, value in changes.items():
            if value is _DELETE:
                header.pop(key, None)
            else:
                header[key] = value
        return exported_pack(base, header, function, blob, sizes=False)

    return make


def _exported_variable_edit(fn: Callable[[dict[str, Any], dict[str, np.ndarray]], None]) -> Callable[[Base], bytes]:
    def make(base: Base) -> bytes:
        header, function, blob = exported_parts(base)
        arrays = _npz_arrays(blob)
        fn(header, arrays)
        return exported_pack(base, header, function, _npz(arrays))

    return make


def _swap_same_shape_entries(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    specs = header["variables"]
    for i in range(len(specs)):
        for j in range(i + 1, len(specs)):
            if specs[i]["shape"] == specs[j]["shape"] and specs[i]["dtype"] == specs[j]["dtype"]:
                specs[i], specs[j] = specs[j], specs[i]
                return
    raise AssertionError("no two variables of the same shape")


def _swap_same_shape_names(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """The header lists each path where its twin was, and the arrays follow their names: a pure relisting."""
    specs = header["variables"]
    for i in range(len(specs)):
        for j in range(i + 1, len(specs)):
            if specs[i]["shape"] == specs[j]["shape"]:
                a, b = specs[i]["path"], specs[j]["path"]
                specs[i] = {**specs[i], "path": b}
                specs[j] = {**specs[j], "path": a}
                return
    raise AssertionError("no two variables of the same shape")


def _first_variable(fn: Callable[[np.ndarray], Any]) -> Callable[[dict[str, Any], dict[str, np.ndarray]], None]:
    def edit(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        name = header["variables"][0]["path"]
        arrays[name] = fn(arrays[name])

    return edit


def _exported_nan(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    name = next(s["path"] for s in header["variables"] if np.prod(s["shape"]) > 1)
    leaf = arrays[name].copy()
    leaf.reshape(-1)[0] = np.nan
    arrays[name] = leaf


# checkpoints: record and msgpack payload


def checkpoint_with(
    base: Base, record_changes: dict[str, Any] | None = None, payload: bytes | None = None, record: Any = None
) -> bytes:
    header, body = split(base)
    if record is None:
        record = dict(header)
        for key, value in (record_changes or {}).items():
            if value is _DELETE:
                record.pop(key, None)
            else:
                record[key] = value
    if payload is not None:
        body = payload
        if isinstance(record, dict) and "payload_bytes" not in (record_changes or {}):
            record["payload_bytes"] = len(body)
    return pack(base, record, body)


def _checkpoint_tree_edit(fn: Callable[[Any], Any]) -> Callable[[Base], bytes]:
    def make(base: Base) -> bytes:
        _, body = split(base)
        tree = serialization.msgpack_restore(body)
        return checkpoint_with(base, payload=serialization.msgpack_serialize(fn(tree)))

    return make


# ---------------------------------------------------------------------------------------------- the cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One damaged file: ``make(base, directory) -> path to load``; ``expect`` is ``"error"`` or ``"same"``."""

    name: str
    make: Callable[[Base, Path], Path]
    expect: str = "error"
    load_kwargs: tuple[tuple[str, Any], ...] = ()


def _bytes_case(name: str, fn: Callable[[Base], bytes], expect: str = "error", **load_kwargs: Any) -> Case:
    def make(base: Base, directory: Path) -> Path:
        path = directory / f"{base.kind}-{name}.bin"
        path.write_bytes(fn(base))
        return path

    return Case(name, make, expect, tuple(load_kwargs.items()))


def _offsets(base: Base) -> dict[str, int]:
    n, h = len(base.data), base.header_end
    return {
        "1": 1,
        "7": 7,
        "8": 8,
        "prefix-1": base.prefix - 1,
        "prefix": base.prefix,
        "prefix+1": base.prefix + 1,
        "header-mid": (base.prefix + h) // 2,
        "header-end": h,
        "payload-mid": (h + n - 32) // 2,
        "digest-start-1": n - 33,
        "digest-start": n - 32,
        "last-1": n - 1,
    }


def _truncate(at: str) -> Case:
    return _bytes_case(f"truncate@{at}", lambda b: b.data[: _offsets(b)[at]])


def _flip(where: str, mask: int) -> Case:
    def fn(base: Base) -> bytes:
        n, h = len(base.data), base.header_end
        position = {
            "magic": 0,
            "header-len-low": base.prefix - 8,
            "header-len-high": base.prefix - 1,
            "header-first": base.prefix,
            "header-mid": (base.prefix + h) // 2,
            "header-last": h - 1,
            "payload-first": h,
            "payload-mid": (h + n - 32) // 2,
            "payload-last": n - 33,
            "digest-mid": n - 16,
            "digest-last": n - 1,
        }[where]
        data = bytearray(base.data)
        data[position] ^= mask
        return bytes(data)

    kind = "byte" if mask == 0xFF else f"bit{mask.bit_length() - 1}"
    return _bytes_case(f"{kind}-flip@{where}", fn)


def _zero(where: str) -> Case:
    def fn(base: Base) -> bytes:
        n, h = len(base.data), base.header_end
        start, stop = {
            "prefix": (0, base.prefix),
            "header": (base.prefix, h),
            "payload-64": (h, min(h + 64, n - 32)),
            "digest": (n - 32, n),
            "all": (0, n),
        }[where]
        data = bytearray(base.data)
        data[start:stop] = bytes(stop - start)
        return bytes(data)

    return _bytes_case(f"zeroed@{where}", fn)


def _special(name: str) -> Case:
    def make(base: Base, directory: Path) -> Path:
        path = directory / f"{base.kind}-{name}"
        if name == "symlink-to-dev-zero":
            path.symlink_to("/dev/zero")
        elif name == "fifo":
            os.mkfifo(path)
        elif name == "directory":
            path.mkdir()
        elif name == "symlink-to-directory":
            path.symlink_to(directory)
        elif name == "dangling-symlink":
            path.symlink_to(directory / "nothing-here")
        elif name == "missing":
            pass
        return path

    return Case(name, make)


def _other_format(base: Base) -> bytes:
    from jaxopt_serve.exported import MAGIC as EXPORT_MAGIC

    if base.kind == "exported":  # an artifact's bytes under the exported loader
        return b"JXSERVE\0" + base.data[8:]
    if base.kind == "checkpoint":
        return b"JXSERVE\0" + (10).to_bytes(8, "little") + b'{"a": 1}xx' + bytes(64)
    return EXPORT_MAGIC + base.data[8:]


GENERIC: list[Case] = [
    _bytes_case("empty", lambda b: b""),
    *[
        _truncate(at)
        for at in (
            "1",
            "7",
            "8",
            "prefix-1",
            "prefix",
            "prefix+1",
            "header-mid",
            "header-end",
            "payload-mid",
            "digest-start-1",
            "digest-start",
            "last-1",
        )
    ],
    *[
        _flip(where, 0xFF)
        for where in (
            "magic",
            "header-len-low",
            "header-len-high",
            "header-first",
            "header-mid",
            "header-last",
            "payload-first",
            "payload-mid",
            "payload-last",
            "digest-last",
        )
    ],
    *[
        _flip(where, mask)
        for where, mask in (
            ("magic", 1 << 3),
            ("header-len-low", 1 << 0),
            ("header-mid", 1 << 0),
            ("header-mid", 1 << 5),
            ("payload-mid", 1 << 7),
            ("payload-last", 1 << 2),
            ("digest-mid", 1 << 3),
        )
    ],
    *[_zero(where) for where in ("prefix", "header", "payload-64", "digest", "all")],
    _bytes_case("appended-zero-byte", lambda b: b.data + b"\0"),
    _bytes_case("appended-1000-bytes", lambda b: b.data + np.random.default_rng(1).bytes(1000)),
    _bytes_case(
        "header-length-2**62", lambda b: b.data[: b.prefix - 8] + (1 << 62).to_bytes(8, "little") + b.data[b.prefix :]
    ),
    _bytes_case("a-pickle", lambda b: pickle.dumps({"params": {"w": np.ones(3)}, "kind": b.kind})),
    _bytes_case("a-npy", lambda b: _npy(np.ones((4, 4), np.float32))),
    _bytes_case("json-text", lambda b: b'{"format_version": 1, "payload_bytes": 0}\n'),
    _bytes_case("the-other-format", _other_format),
    *[
        _special(name)
        for name in ("symlink-to-dev-zero", "fifo", "directory", "symlink-to-directory", "dangling-symlink", "missing")
    ],
]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _artifact_edits(kind: str) -> list[Case]:
    v1 = kind != "model"
    shape_field = "input_shape" if v1 else "input_spec"
    cases = [
        _bytes_case("repacked-unchanged", lambda b: pack(b, *split(b)), expect="same"),
        _bytes_case(f"{shape_field}-as-string", lambda b: artifact_with_header(b, **{shape_field: "8,8,1"})),
        _bytes_case(f"{shape_field}-missing", lambda b: artifact_with_header(b, **{shape_field: _DELETE})),
        _bytes_case("format_version-as-string", lambda b: artifact_with_header(b, format_version="1")),
        _bytes_case("format_version-99", lambda b: artifact_with_header(b, format_version=99)),
        _bytes_case(
            "payload_bytes-as-string",
            lambda b: artifact_with_header(b, payload_bytes=str(split(b)[0]["payload_bytes"])),
        ),
        _bytes_case("payload_bytes-negative", lambda b: artifact_with_header(b, payload_bytes=-1)),
        _bytes_case("payload_bytes-missing", lambda b: artifact_with_header(b, payload_bytes=_DELETE)),
        _bytes_case("layout-as-int", lambda b: artifact_with_header(b, layout=7)),
        _bytes_case("layout-unknown", lambda b: artifact_with_header(b, layout="bogus")),
        _bytes_case("compression-as-list", lambda b: artifact_with_header(b, compression=["lzma"])),
        _bytes_case("compression-unknown", lambda b: artifact_with_header(b, compression="zstd")),
        _bytes_case("metadata-as-list", lambda b: artifact_with_header(b, metadata=[1, 2])),
        _bytes_case("model-as-string", lambda b: artifact_with_header(b, model="mlp")),
        _bytes_case("model-missing", lambda b: artifact_with_header(b, model=_DELETE)),
        _bytes_case("header-a-json-list", lambda b: pack(b, b"[1, 2, 3]", split(b)[1])),
        _bytes_case("header-not-json", lambda b: pack(b, b"{not json", split(b)[1])),
        _bytes_case("header-not-utf8", lambda b: pack(b, b"\xff\xfe{}", split(b)[1])),
        _bytes_case("payload-garbage", lambda b: artifact_with_tree(b, b"\xc1" * 40)),
        _bytes_case(
            "payload-half-msgpack",
            lambda b: artifact_with_tree(
                b,
                serialization.msgpack_serialize(artifact_payload(b))[
                    : len(serialization.msgpack_serialize(artifact_payload(b))) // 2
                ],
            ),
        ),
        _bytes_case("payload-a-list", lambda b: artifact_with_tree(b, [1, 2, 3])),
        _bytes_case("variable-as-string", _payload_edit(lambda t, p: _set(t, p, "not an array"))),
        _bytes_case("variable-as-int", _payload_edit(lambda t, p: _set(t, p, 7))),
        _bytes_case("variable-as-list", _payload_edit(lambda t, p: _set(t, p, [1.0, 2.0]))),
        _bytes_case("variable-missing", _payload_edit(lambda t, p: _set(t, p, _DELETE))),
        _bytes_case(
            "variable-extra",
            lambda b: artifact_with_tree(b, {**artifact_payload(b), "params_extra": {"x": np.ones(2, np.float32)}}),
        ),
        _bytes_case(
            "variable-reshaped",
            _payload_edit(_leaf_change(lambda x: np.asarray(x).reshape(-1)[:-1].copy()), floats=True),
        ),
        # the sparse layout restores float leaves to the model's dtype: a float64 copy loads the same values
        _bytes_case(
            "variable-float64",
            _payload_edit(_leaf_change(lambda x: np.asarray(x, np.float64)), floats=True),
            expect="same" if kind == "sparse" else "error",
        ),
        _bytes_case("nan-weights", _payload_edit(_nonfinite(np.nan), floats=True)),
        _bytes_case("inf-weights", _payload_edit(_nonfinite(-np.inf), floats=True)),
        _bytes_case(
            "nan-weights-allowed", _payload_edit(_nonfinite(np.nan), floats=True), expect="loads", allow_nonfinite=True
        ),
    ]
    if v1:
        cases += [
            _bytes_case("input_shape-negative", lambda b: artifact_with_header(b, input_shape=[-8, 8, 1])),
            _bytes_case("input_shape-other-size", lambda b: artifact_with_header(b, input_shape=[8, 9, 1])),
            _bytes_case("input_shape-huge", lambda b: artifact_with_header(b, input_shape=[1 << 40, 1 << 40, 1])),
            _bytes_case("input_dtype-as-int", lambda b: artifact_with_header(b, input_dtype=32)),
            _bytes_case(
                "model-fields-as-string", lambda b: artifact_with_header(b, model={"name": "mlp", "fields": "x"})
            ),
            _bytes_case("model-unknown-name", lambda b: artifact_with_header(b, model={"name": "bogus", "fields": {}})),
            _bytes_case(
                "model-field-wrong-type",
                lambda b: artifact_with_header(
                    b, model={**split(b)[0]["model"], "fields": {**split(b)[0]["model"]["fields"], "features": "8"}}
                ),
            ),
        ]
    else:
        cases += [
            _bytes_case(
                "input_spec-entry-shape-as-string",
                lambda b: artifact_with_header(b, input_spec=[{"path": "0", "shape": "4", "dtype": "float32"}]),
            ),
            _bytes_case("variables_spec-as-dict", lambda b: artifact_with_header(b, variables_spec={"a": 1})),
            _bytes_case("variables_spec-entry-int", lambda b: artifact_with_header(b, variables_spec=[1])),
            _bytes_case("model-kind-missing", lambda b: artifact_with_header(b, model={"name": "f"})),
        ]
    return cases


def _exported_edits() -> list[Case]:
    return [
        _bytes_case("repacked-unchanged", lambda b: exported_pack(b, *exported_parts(b)), expect="same"),
        _bytes_case("num_leaves-missing", _exported_header_edit(num_leaves=_DELETE)),
        _bytes_case("num_leaves-as-string", _exported_header_edit(num_leaves="8")),
        _bytes_case("num_leaves-wrong", _exported_header_edit(num_leaves=3)),
        _bytes_case("function_bytes-as-string", _exported_header_edit(function_bytes="12")),
        _bytes_case("function_bytes-negative", _exported_header_edit(function_bytes=-5)),
        _bytes_case("variables_bytes-missing", _exported_header_edit(variables_bytes=_DELETE)),
        _bytes_case("format_version-99", _exported_header_edit(format_version=99)),
        _bytes_case("format_version-2-on-a-version-3-function", _exported_header_edit(format_version=2)),
        _bytes_case("variables-as-string", _exported_header_edit(variables="params")),
        _bytes_case(
            "variables-entry-path-int",
            lambda b: _exported_header_edit(
                variables=[{**exported_parts(b)[0]["variables"][0], "path": 5}, *exported_parts(b)[0]["variables"][1:]]
            )(b),
        ),
        _bytes_case(
            "variables-entry-shape-string",
            lambda b: _exported_header_edit(
                variables=[
                    {**exported_parts(b)[0]["variables"][0], "shape": "8"},
                    *exported_parts(b)[0]["variables"][1:],
                ]
            )(b),
        ),
        _bytes_case("inputs-empty", _exported_header_edit(inputs=[])),
        _bytes_case(
            "inputs-entry-shape-string",
            lambda b: _exported_header_edit(inputs=[{**exported_parts(b)[0]["inputs"][0], "shape": "x"}])(b),
        ),
        _bytes_case("input_shape-as-string", _exported_header_edit(input_shape="8,8,1")),
        _bytes_case("num_inputs-zero", _exported_header_edit(num_inputs=0)),
        _bytes_case("model-as-list", _exported_header_edit(model=["mlp"])),
        _bytes_case("header-a-json-list", lambda b: pack(b, b"[1, 2]", split(b)[1])),
        _bytes_case("header-not-json", lambda b: pack(b, b"{oops", split(b)[1])),
        _bytes_case("swapped-same-shape-leaves", _exported_variable_edit(_swap_same_shape_entries)),
        _bytes_case("same-shape-paths-relisted", _exported_variable_edit(_swap_same_shape_names)),
        _bytes_case(
            "function-garbage",
            lambda b: exported_pack(b, exported_parts(b)[0], b"\x00\x01garbage" * 20, exported_parts(b)[2]),
        ),
        _bytes_case(
            "variables-not-a-zip",
            lambda b: exported_pack(b, exported_parts(b)[0], exported_parts(b)[1], b"PK\x03\x04 not really a zip" * 4),
        ),
        _bytes_case(
            "variables-pickled-object",
            _exported_variable_edit(_first_variable(lambda x: np.array([{"a": 1}], dtype=object))),
        ),
        _bytes_case("variable-missing", _exported_variable_edit(lambda h, a: a.pop(h["variables"][0]["path"]))),
        _bytes_case("variable-reshaped", _exported_variable_edit(_first_variable(lambda x: x.reshape(-1)[:-1].copy()))),
        _bytes_case("variable-float64", _exported_variable_edit(_first_variable(lambda x: x.astype(np.float64)))),
        _bytes_case("variable-as-string-array", _exported_variable_edit(_first_variable(lambda x: np.array(["abc"])))),
        _bytes_case("nan-weights", _exported_variable_edit(_exported_nan)),
        _bytes_case(
            "nan-weights-allowed", _exported_variable_edit(_exported_nan), expect="loads", allow_nonfinite=True
        ),
    ]


def _checkpoint_edits() -> list[Case]:
    return [
        _bytes_case("repacked-unchanged", lambda b: checkpoint_with(b), expect="same"),
        _bytes_case("record-a-json-list", lambda b: checkpoint_with(b, record=[1, 2])),
        _bytes_case("record-not-json", lambda b: pack(b, b"{nope", split(b)[1])),
        _bytes_case("fingerprint-missing", lambda b: checkpoint_with(b, {"fingerprint": _DELETE})),
        _bytes_case("fingerprint-as-string", lambda b: checkpoint_with(b, {"fingerprint": "x"})),
        _bytes_case(
            "fingerprint-of-another-run", lambda b: checkpoint_with(b, {"fingerprint": {"run": "other", "seed": 0}})
        ),
        _bytes_case("version-99", lambda b: checkpoint_with(b, {"version": 99})),
        _bytes_case("payload_bytes-as-string", lambda b: checkpoint_with(b, {"payload_bytes": "10"})),
        _bytes_case("payload_bytes-missing", lambda b: checkpoint_with(b, {"payload_bytes": _DELETE})),
        _bytes_case("payload-garbage", lambda b: checkpoint_with(b, payload=b"\xc1" * 64)),
        _bytes_case("payload-half", lambda b: checkpoint_with(b, payload=split(b)[1][: len(split(b)[1]) // 2])),
        _bytes_case("state-leaf-as-string", _checkpoint_tree_edit(lambda t: {**t, "step": "seven"})),
        _bytes_case(
            "state-leaf-reshaped",
            _checkpoint_tree_edit(
                lambda t: {**t, "params": _set(t["params"], ("dense_0", "kernel"), np.zeros((8, 64), np.float32))}
            ),
        ),
        _bytes_case(
            "state-leaf-float64", _checkpoint_tree_edit(lambda t: {**t, "step": np.asarray(t["step"], np.float64)})
        ),
        _bytes_case(
            "state-collection-missing",
            _checkpoint_tree_edit(lambda t: {k: v for k, v in t.items() if k != "opt_state"}),
        ),
        _bytes_case("nan-weights", _checkpoint_tree_edit(_nan_kernel)),
        _bytes_case("nan-weights-allowed", _checkpoint_tree_edit(_nan_kernel), expect="loads", allow_nonfinite=True),
    ]


def _nan_kernel(tree: Any) -> Any:
    """The checkpoint state with one NaN in the first Dense kernel."""
    kernel = np.array(tree["params"]["dense_0"]["kernel"])
    kernel.reshape(-1)[0] = np.nan
    return {**tree, "params": _set(tree["params"], ("dense_0", "kernel"), kernel)}


EDITS: dict[str, list[Case]] = {
    **{kind: _artifact_edits(kind) for kind in ARTIFACT_KINDS},
    "exported": _exported_edits(),
    "checkpoint": _checkpoint_edits(),
}


def cases(kind: str) -> list[Case]:
    """Every case for ``kind``: the generic damage, then the kind's hand edits."""
    return [*GENERIC, *EDITS[kind]]


def all_cases() -> list[tuple[str, str]]:
    """``(kind, case name)`` of the whole matrix (the test's parameters)."""
    return [(kind, case.name) for kind in KINDS for case in cases(kind)]


def find_case(kind: str, name: str) -> Case:
    return next(case for case in cases(kind) if case.name == name)


# ---------------------------------------------------------------------------------------------- running


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: str  # "ok", "traceback", "hang", "silent_wrong"
    detail: str


def _run_with_timeout(fn: Callable[[], Any], timeout: float) -> tuple[str, Any]:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - classified by the caller
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return "hang", None
    return ("error", result["error"]) if "error" in result else ("value", result.get("value"))


def _unblock(path: Path) -> None:
    """Give a reader blocked on a FIFO its end of file (so a hung case does not leave a thread behind)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


def run_case(base: Base, case: Case, directory: str | os.PathLike[str], timeout: float = TIMEOUT_S) -> Outcome:
    """Make ``case``'s file from ``base`` in ``directory``, load it, and classify what happened."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = case.make(base, directory)
    kind, value = _run_with_timeout(lambda: base.load(path, **dict(case.load_kwargs)), timeout)
    if kind == "hang":
        if case.name == "fifo":
            _unblock(path)
        return Outcome("hang", f"no answer within {timeout:.0f} s")
    if kind == "error":
        err = value
        message = str(err)
        clear = isinstance(err, (ValueError, OSError)) and not isinstance(err, (UnicodeError,))
        named = str(path) in message or getattr(err, "filename", None) in (str(path), path)
        if case.expect != "error":
            return Outcome("traceback", f"a loadable file failed: {type(err).__name__}: {message[:300]}")
        if clear and named and "\n" not in message.strip():
            return Outcome("ok", f"{type(err).__name__}: {message[:300]}")
        return Outcome("traceback", f"{type(err).__name__}: {message[:300]}")
    if case.expect == "error":
        return Outcome("silent_wrong", "loaded without an error")
    if case.expect == "same":
        got = base.values(value)
        same = len(got) == len(base.expected) and all(
            a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
            for a, b in zip(got, base.expected)
        )
        return Outcome("ok" if same else "silent_wrong", "loaded unchanged" if same else "loaded other values")
    return Outcome("ok", "loaded")


def run_matrix(root: str | os.PathLike[str], timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """Build the bases and run every case; counts per outcome, per kind, and the failures."""
    root = Path(root)
    bases = build_bases(root / "bases")
    counts = {
        "artifact_cases_total": 0,
        "artifact_cases_tracebacks": 0,
        "artifact_cases_hangs": 0,
        "artifact_cases_silent_wrong": 0,
    }
    per_kind: dict[str, int] = {}
    failures = []
    key = {
        "traceback": "artifact_cases_tracebacks",
        "hang": "artifact_cases_hangs",
        "silent_wrong": "artifact_cases_silent_wrong",
    }
    for kind in KINDS:
        for i, case in enumerate(cases(kind)):
            outcome = run_case(bases[kind], case, root / kind / str(i), timeout)
            counts["artifact_cases_total"] += 1
            per_kind[kind] = per_kind.get(kind, 0) + 1
            if outcome.status != "ok":
                counts[key[outcome.status]] += 1
                failures.append({"kind": kind, "case": case.name, "status": outcome.status, "detail": outcome.detail})
    return {**counts, "artifact_cases_per_kind": per_kind, "artifact_failures": failures}
