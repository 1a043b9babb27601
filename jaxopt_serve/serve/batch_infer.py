"""Resumable batch inference over ``.npy`` / ``.npz`` files, memory-mapped, in input order.

The input is memory-mapped (``.npy``, or uncompressed members of an
``.npz``), never loaded whole. A model with a dict input reads it from an
``.npz`` whose members are the dict's keys (``input_ids.npy``,
``attention_mask.npy``): give the keys, or let an ``InferenceEngine`` name them.

The input and output paths are checked before any work (``check_paths``).
Outputs go, chunk by chunk, into memory-mapped ``.npy`` files under a
temporary name next to the output (``<output>.partial``); after each chunk is
flushed, a record of it (a BLAKE2b checksum of its input rows and one of its
output rows as stored) goes to ``<output>.state.chunks`` and a small JSON
state file, ``<output>.state.json``, records the job (artifact checksum,
input path, key, shapes, dtypes, chunk size) and how many chunks are done.
Run the same command after a crash (even SIGKILL) and it verifies what it
resumes:

* a state file that is empty, not JSON, of another version, or whose fields
  are out of range (``done`` beyond the job's chunks) is refused, naming the
  file and the field;
* a state of another job is refused, naming what differs;
* the input rows of every committed chunk are hashed again (one pass over the
  done part, no whole-file hash): any difference means the input changed
  since the interrupted run, and the resume is refused;
* the output rows of every committed chunk are hashed again: from the first
  chunk whose checksum disagrees or whose record is missing (a truncated or
  modified partial output), the chunks are computed again (reported in the
  summary's ``notes``); a partial output that is missing or whose header
  disagrees with the state is started over from chunk 0.

Chunks are fixed slices of the input computed the same way on every run, so a
resumed output is byte-identical to an uninterrupted one. Refusals are
``ValueError`` s that say which files to delete to start over.

Non-finite inputs follow ``nan_policy`` (``jaxopt_serve.engine.nonfinite``):
``"error"`` (default) stops before a chunk holding a NaN or inf, naming the
rows by their index in the file; ``"propagate"`` writes NaN outputs for them.

Output format: a model with one array output writes one ``.npy`` (renamed
into place when complete). Pytree outputs (a tuple of logits and class ids, a
dict) need an ``.npz`` output path: one uncompressed member per output leaf,
named by its path (``0``, ``1`` for a tuple; ``logits`` for a dict;
``encoder/0`` when nested; ``outputs`` for a single array), dtypes kept; the
leaves are written as ``.npy`` files in ``<output>.partial/`` and packed into
the ``.npz`` (fixed timestamps, so reruns are byte-identical) when every chunk
is done. The ``.npz`` can be memory-mapped again with ``open_input``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxopt_serve.engine.nonfinite import (
    NanPolicy,
    check_policy,
    mark_rows,
    nonfinite_error,
    nonfinite_rows,
    replace_rows,
)
from jaxopt_serve.engine.pytrees import slash_names
from jaxopt_serve.fileio import atomic_write


def open_input(path: str | os.PathLike[str], key: str | None = None) -> np.ndarray:
    """A read-only memory map of the array in ``path`` (``.npy``, or member ``key`` of an uncompressed ``.npz``).

    Every way the file can be wrong is a ``ValueError`` naming it: missing, a
    directory or another non-regular file, empty, not a ``.npy`` (no NumPy
    header, e.g. a text file) or not a zip archive, a malformed header, object
    data, or fewer bytes than the header's shape needs.
    """
    path = Path(path)
    _check_input_file(path)
    if path.suffix == ".npy":
        with open(path, "rb") as f:
            shape, fortran, dtype, offset = _npy_header(f, path.name)
        return _map(path, shape, fortran, dtype, offset, path.stat().st_size, path.name)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"input {path} is not a .npz (zip) archive: {err}") from None
    with archive:
        names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
        if key is None:
            if len(names) != 1:
                raise ValueError(f"{path.name} holds arrays {names}; choose one with --key")
            key = names[0]
        if key not in names:
            raise ValueError(f"{path.name} has no array {key!r}; it holds {names}")
        info = archive.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(
                f"{path.name}: array {key!r} is compressed and cannot be memory-mapped; "
                f"save it with np.savez (not savez_compressed) or as .npy"
            )
    where = f"{path.name}: array {key!r}"
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"{where}: the archive's member header is damaged")
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        shape, fortran, dtype, offset = _npy_header(f, where)
    return _map(path, shape, fortran, dtype, offset, start + info.file_size, where)


def _check_input_file(path: Path) -> None:
    """``ValueError`` unless ``path`` is a non-empty regular ``.npy`` / ``.npz`` file."""
    if path.suffix not in (".npy", ".npz"):
        raise ValueError(f"input must be a .npy or .npz file, got {path.name}")
    if not path.exists():
        raise ValueError(f"input {path} does not exist")
    if path.is_dir():
        raise ValueError(f"input {path} is a directory, not a {path.suffix} file")
    if not path.is_file():
        raise ValueError(f"input {path} is not a regular file")
    if path.stat().st_size == 0:
        raise ValueError(f"input {path} is empty (0 bytes)")


def _npy_header(f: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran order, dtype, data offset)`` of the ``.npy`` at ``f`` 's position, or ``ValueError``."""
    magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise ValueError(f"{where} is not a .npy array (no NumPy header; it starts with {magic!r})")
    f.seek(-6, os.SEEK_CUR)
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except Exception as err:  # noqa: BLE001 - any malformed header
        raise ValueError(f"{where} has a malformed .npy header: {err}") from None
    if dtype.hasobject:
        raise ValueError(f"{where} holds Python objects; refusing to load it")
    return shape, fortran, dtype, f.tell()


def _map(
    path: Path, shape: tuple[int, ...], fortran: bool, dtype: np.dtype, offset: int, end: int, where: str
) -> np.ndarray:
    need = offset + math.prod(shape) * dtype.itemsize
    if need > end:
        raise ValueError(
            f"{where} is truncated: shape {tuple(shape)} of {dtype} needs {need - offset:,} bytes of "
            f"data, the file holds {max(end - offset, 0):,}"
        )
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _npz_members(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]


def dict_input_keys(predict: Any) -> list[str] | None:
    """The keys of ``predict`` 's dict input, when it is an engine (or model) with one flat dict input; else ``None``.

    Example:
        >>> import numpy as np
        >>> from jaxopt_serve.model import Model
        >>> m = Model.function(lambda p, x: x["a"] * p, np.float32(2), {"a": np.zeros((1, 3)), "b": np.zeros((1,))})
        >>> dict_input_keys(m)
        ['a', 'b']
    """
    example = getattr(predict, "example", None)
    if not isinstance(example, tuple) or len(example) != 1 or not isinstance(example[0], Mapping):
        return None
    if not all(isinstance(k, str) and hasattr(v, "shape") for k, v in example[0].items()):
        return None
    return sorted(example[0])


def open_inputs(
    path: str | os.PathLike[str], key: str | Sequence[str] | None = None, *, predict: Any = None
) -> np.ndarray | dict[str, np.ndarray]:
    """The input of a batch-inference job, memory-mapped: one array, or a dict of ``.npz`` members.

    ``key`` selects one member (an array input) or several (a dict input with
    those keys); without it a one-member ``.npz`` gives its array, and a
    several-member one gives the dict input ``predict`` takes (see
    ``dict_input_keys``). Every member must have the same number of rows.
    """
    path = Path(path)
    if isinstance(key, str) or path.suffix != ".npz":
        return open_input(path, key)
    if key is None:
        names = _npz_members(path)
        if len(names) == 1:
            return open_input(path, names[0])
        key = dict_input_keys(predict)
        if key is None or not set(key) <= set(names):
            wanted = f"; the model's dict input needs {key}" if key is not None else ""
            raise ValueError(f"{path.name} holds arrays {names}; choose one with --key{wanted}")
    arrays = {k: open_input(path, k) for k in key}
    rows = {k: (len(a) if a.ndim else None) for k, a in arrays.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"{path.name}: the input arrays must have the same number of rows, got {rows}")
    return arrays


def _rows(x: Any) -> int:
    first = x if isinstance(x, np.ndarray) else next(iter(x.values()))
    return len(first) if first.ndim else 0


def _slice(x: Any, lo: int, hi: int) -> Any:
    if isinstance(x, np.ndarray):
        return np.asarray(x[lo:hi])
    return {k: np.asarray(a[lo:hi]) for k, a in x.items()}


def check_paths(
    input_path: str | os.PathLike[str], output_path: str | os.PathLike[str], *, key: str | Sequence[str] | None = None
) -> None:
    """Check the input and output paths of a batch-inference job before any work (``ValueError`` naming the path).

    The input must be a regular ``.npy`` with a valid header and all its data
    (see ``open_input``), or a zip archive (``.npz``; with ``key`` a string,
    that member is checked as well); the output must not be a directory or
    the input itself, and its directory must exist and be writable (tested by
    creating a file there).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.suffix == ".npy" or isinstance(key, str):
        open_input(input_path, key)
    else:
        _check_input_file(input_path)
        try:
            zipfile.ZipFile(input_path).close()
        except (zipfile.BadZipFile, OSError) as err:
            raise ValueError(f"input {input_path} is not a .npz (zip) archive: {err}") from None
    if output_path.is_dir():
        raise ValueError(f"output {output_path} is a directory; give a file path (e.g. {output_path / 'out.npy'})")
    parent = output_path.parent
    if not parent.exists():
        raise ValueError(f"output directory {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"output {output_path}: {parent} is not a directory")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise ValueError(f"output {output_path} is the input file; choose another output path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{output_path.name}.", suffix=".probe", dir=parent)
    except OSError as err:
        raise ValueError(f"output directory {parent} is not writable: {err.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def run_batch_inference(
    predict: Callable[[Any], Any],
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    artifact_path: str | os.PathLike[str],
    key: str | Sequence[str] | None = None,
    chunk_size: int = 1024,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
    nan_policy: NanPolicy = "error",
) -> dict[str, Any]:
    """Run ``predict`` over every row of the input, resumably; returns a summary.

    The summary holds ``rows``, ``chunks``, ``resumed_at_chunk`` (0 for a
    fresh run), ``seconds``, ``rows_per_second`` and ``notes`` (what a resume
    found and repaired).

    Args:
        predict: ``f(batch) -> outputs`` (e.g. an ``InferenceEngine``); ``batch`` is
            an array, or a dict of arrays for a dict input; outputs an array or a pytree.
        input_path: ``.npy`` or ``.npz`` (memory-mapped).
        output_path: the ``.npy`` to write for one array output, or an ``.npz``
            (one member per output leaf); it appears only when complete.
        artifact_path: the model file, fingerprinted so a resume never mixes models.
        key: the array inside an ``.npz``, or the members forming a dict input
            (default: the only member, or the keys of ``predict`` 's dict input).
        chunk_size: rows per chunk (the unit of progress and of resume).
        progress: show a progress bar.
        on_chunk: called with ``(done, total)`` after each chunk is recorded.
        nan_policy: rows with a NaN or inf in a float input: ``"error"`` (default)
            stops before computing their chunk, naming the rows (counted in the
            whole file; the chunks before it are kept for a resume);
            ``"propagate"`` runs them as zero rows and writes NaN float outputs.

    Raises:
        ValueError: a bad input or output path (before any work), a non-finite
            row under ``"error"``, or resume state that cannot be trusted (see
            the module docstring).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    check_policy(nan_policy)
    check_paths(input_path, output_path, key=key)
    x = open_inputs(input_path, key, predict=predict)
    rows = _rows(x)
    if rows == 0:
        shape = x.shape if isinstance(x, np.ndarray) else {k: a.shape for k, a in x.items()}
        raise ValueError(f"input {input_path} holds no rows (shape {shape})")
    output_path = Path(output_path)
    partial = output_path.with_name(output_path.name + ".partial")
    state_path = output_path.with_name(output_path.name + ".state.json")
    records_path = output_path.with_name(output_path.name + ".state.chunks")
    total = -(-rows // chunk_size)
    job: dict[str, Any] = {
        "artifact_sha256": _digest(Path(artifact_path)),
        "input": str(Path(input_path).resolve()),
        "key": key if key is None or isinstance(key, str) else list(key),
    }
    if isinstance(x, np.ndarray):
        job.update(input_shape=list(x.shape), input_dtype=str(x.dtype))
    else:
        job.update(
            input_shape={k: list(a.shape) for k, a in x.items()}, input_dtype={k: str(a.dtype) for k, a in x.items()}
        )
    job["chunk_size"] = chunk_size
    where = f" of {Path(input_path).name}"

    def bounds(index: int) -> tuple[int, int]:
        return index * chunk_size, min((index + 1) * chunk_size, rows)

    def compute(index: int) -> tuple[Any, bytes]:
        lo, hi = bounds(index)
        batch = _slice(x, lo, hi)
        bad = nonfinite_rows(batch)
        if bad is not None:
            if nan_policy == "error":
                raise ValueError(
                    f"{nonfinite_error(bad, offset=lo, where=where)}; pass --nonfinite propagate "
                    f"(nan_policy='propagate') to write NaN outputs for them"
                    f"{f' ({index} chunks done are kept for a resume)' if index else ''}"
                )
            batch = replace_rows(batch, bad)
        out = predict(batch)
        return (out if bad is None else mark_rows(out, bad)), _chunk_digest(batch if bad is None else _slice(x, lo, hi))

    notes: list[str] = []
    sink, done, records = None, 0, _Records(records_path)
    if state_path.exists() or state_path.is_symlink():
        state = _read_state(state_path, partial, total)
        _check_job(state, job, state_path, partial)
        sink, done = _resume(state, x, rows, bounds, records, partial, notes, nan_policy, where, state_path)
    if sink is None:
        records.close()
        first, in_digest = compute(0)
        sink = _Sink.create(partial, output_path, first, rows)
        sink.write(0, first)
        records.reset()
        records.put(0, in_digest + sink.digest(*bounds(0)))
        done = 1
        atomic_write(state_path, json.dumps(sink.state({"version": STATE_VERSION, "job": job, "done": done})).encode())
        if on_chunk is not None:
            on_chunk(done, total)
        resumed_at = 0
    else:
        resumed_at = done
    start = time.perf_counter()
    rows_this_run = 0
    try:
        with _bar(progress, total, done) as advance:
            for index in range(done, total):
                lo, hi = bounds(index)
                out, in_digest = compute(index)
                sink.write(lo, out)
                records.put(index, in_digest + sink.digest(lo, hi))
                atomic_write(
                    state_path,
                    json.dumps(sink.state({"version": STATE_VERSION, "job": job, "done": index + 1})).encode(),
                )
                rows_this_run += hi - lo
                advance(index + 1)
                if on_chunk is not None:
                    on_chunk(index + 1, total)
    finally:
        records.close()
    sink.finish(output_path)
    state_path.unlink()
    records_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    return {
        "rows": int(rows),
        "chunks": total,
        "resumed_at_chunk": resumed_at,
        "seconds": seconds,
        "rows_per_second": rows_this_run / seconds if seconds > 0 else float("nan"),
        "notes": notes,
    }


# -- resume state ----------------------------------------------------------------------------------

STATE_VERSION = 2
DIGEST_BYTES = 16  # BLAKE2b-128 of a chunk's input rows, then of its output rows: one 32-byte record per chunk


def _chunk_digest(arrays: Any) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for leaf in arrays if isinstance(arrays, list) else jax.tree.leaves(arrays):
        h.update(memoryview(np.ascontiguousarray(leaf)).cast("B"))
    return h.digest()


class _Records:
    """The per-chunk record file: 32 bytes per committed chunk (input digest, output digest), overwritten in place."""

    SIZE = 2 * DIGEST_BYTES

    def __init__(self, path: Path) -> None:
        self.path, self.file = path, None

    def read(self, count: int) -> list[bytes]:
        """The first ``count`` records (fewer when the file is shorter; none when it is missing)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(count * self.SIZE)
        except OSError:
            return []
        return [data[i : i + self.SIZE] for i in range(0, len(data) - self.SIZE + 1, self.SIZE)]

    def reset(self) -> None:
        self.close()
        if self.path.is_dir():
            shutil.rmtree(self.path)
        self.file = open(self.path, "wb")  # noqa: SIM115 - kept open across chunks

    def keep(self, count: int) -> None:
        """Keep the first ``count`` records and write the next ones after them."""
        if not self.path.is_file():
            self.reset()
            return
        self.file = open(self.path, "r+b")  # noqa: SIM115
        self.file.truncate(count * self.SIZE)

    def put(self, index: int, record: bytes) -> None:
        self.file.seek(index * self.SIZE)
        self.file.write(record)
        self.file.flush()  # reaches the OS (survives a killed process); the state file is what is fsynced

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _read_state(state_path: Path, partial: Path, total: int) -> dict[str, Any]:
    """The state file, checked field by field; ``ValueError`` saying what is wrong and how to start over."""
    fix = f"delete it and {partial.name} to start over"

    def bad(why: str) -> ValueError:
        return ValueError(f"{state_path} is not a valid resume state ({why}); {fix}")

    if not state_path.is_file():
        raise bad("not a regular file")
    try:
        text = state_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise bad(f"unreadable: {err}") from None
    if not text.strip():
        raise bad("empty file")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise bad(f"not JSON: {err}") from None
    if not isinstance(state, dict) or not isinstance(state.get("job"), dict):
        raise bad("no job record")
    if state.get("version") != STATE_VERSION:
        raise bad(f"version {state.get('version')!r}, expected {STATE_VERSION}: written by another version")
    done = state.get("done")
    if not isinstance(done, int) or isinstance(done, bool) or not 1 <= done <= total:
        raise bad(f"'done' is {done!r}, expected a chunk count from 1 to {total}")
    leaves = state.get("leaves")
    if (
        not isinstance(leaves, list)
        or not leaves
        or not all(
            isinstance(s, dict)
            and isinstance(s.get("shape"), list)
            and isinstance(s.get("dtype"), str)
            and all(isinstance(d, int) and d >= 0 for d in s["shape"])
            for s in leaves
        )
    ):
        raise bad("no valid record of the output arrays")
    names = state.get("outputs")
    if names is not None and (not isinstance(names, list) or len(names) != len(leaves)):
        raise bad("the output names do not match the output arrays")
    try:
        [np.dtype(s["dtype"]) for s in leaves]
    except TypeError as err:
        raise bad(f"bad output dtype: {err}") from None
    return state


def _check_job(state: dict[str, Any], job: dict[str, Any], state_path: Path, partial: Path) -> None:
    old = state["job"]
    differ = [k for k in job if old.get(k) != job[k]] + [k for k in old if k not in job]
    if differ:
        names = {
            "artifact_sha256": "model",
            "input": "input path",
            "key": "key",
            "input_shape": "input shape",
            "input_dtype": "input dtype",
            "chunk_size": "chunk size",
        }
        raise ValueError(
            f"{state_path} belongs to another job (different {', '.join(names.get(k, k) for k in differ)}"
            f"); delete it and {partial.name} to start over"
        )


def _resume(
    state: dict[str, Any],
    x: Any,
    rows: int,
    bounds: Callable[[int], tuple[int, int]],
    records: _Records,
    partial: Path,
    notes: list[str],
    nan_policy: str,
    where: str,
    state_path: Path,
) -> tuple[Any, int]:
    """``(sink, first chunk to compute)`` after verifying the committed chunks; ``(None, 0)``: start over.

    Every committed chunk's input rows are hashed again and compared with
    their record: a difference means the input changed, and the resume is
    refused. Then the output rows are hashed: the first chunk whose record is
    missing or disagrees (a truncated or edited partial output) and every
    chunk after it are computed again.
    """
    done = state["done"]
    saved = records.read(done)
    verified = len(saved)
    for index, record in enumerate(saved):
        lo, hi = bounds(index)
        batch = _slice(x, lo, hi)
        if _chunk_digest(batch) != record[:DIGEST_BYTES]:
            raise ValueError(
                f"the input changed since the interrupted run: rows {lo}-{hi - 1}{where} differ from "
                f"those the partial output was computed from (or its chunk records were modified); "
                f"delete {state_path} and {partial.name} to start over"
            )
        bad = nonfinite_rows(batch) if nan_policy == "error" else None
        if bad is not None:
            raise ValueError(
                f"{nonfinite_error(bad, offset=lo, where=where)} (computed by an earlier run with "
                f"--nonfinite propagate); pass --nonfinite propagate to resume it"
            )
    if verified < done:
        notes.append(f"the record of chunk {verified} is missing: recomputing from chunk {verified}")
    sink = _Sink.reopen(partial, state.get("outputs"), state["leaves"], rows)
    if sink is None:
        notes.append(f"{partial.name} is missing or unreadable: starting over from chunk 0")
        return None, 0
    for index, record in enumerate(saved):
        if sink.digest(*bounds(index)) != record[DIGEST_BYTES:]:
            notes.append(
                f"{partial.name}: chunk {index} does not match its checksum (truncated or modified): "
                f"recomputing from chunk {index}"
            )
            verified = index
            break
    if verified == 0:
        sink.arrays.clear()
        return None, 0
    records.keep(verified)
    return sink, verified


class _Sink:
    """Where outputs go: one memory-mapped ``.npy`` (one array output) or one per leaf in a directory (``.npz``)."""

    def __init__(self, partial: Path, names: list[str] | None, arrays: list[np.ndarray]) -> None:
        self.partial, self.names, self.arrays = partial, names, arrays

    @classmethod
    def create(cls, partial: Path, output_path: Path, first: Any, rows: int) -> _Sink:
        leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(first)]
        single = isinstance(first, (np.ndarray, jax.Array)) or np.isscalar(first)
        for name, leaf in zip(slash_names(first), leaves):
            if leaf.ndim == 0:
                raise ValueError(f"output {name} has no batch axis (shape ()); every output leaf needs one")
        if single and output_path.suffix != ".npz":
            _remove(partial)
            out = np.lib.format.open_memmap(
                partial, mode="w+", dtype=leaves[0].dtype, shape=(rows, *leaves[0].shape[1:])
            )
            return cls(partial, None, [out])
        if output_path.suffix != ".npz":
            names = slash_names(first)
            raise ValueError(
                f"the model returns {len(leaves)} output arrays {names}; write them to an .npz output "
                f"(one array per output), not {output_path.name}"
            )
        _remove(partial)
        partial.mkdir(parents=True)
        arrays = [
            np.lib.format.open_memmap(partial / f"{i}.npy", mode="w+", dtype=leaf.dtype, shape=(rows, *leaf.shape[1:]))
            for i, leaf in enumerate(leaves)
        ]
        return cls(partial, slash_names(first), arrays)

    @classmethod
    def reopen(cls, partial: Path, names: list[str] | None, leaves: list[dict[str, Any]], rows: int) -> _Sink | None:
        """The partial output of a resumed run, or ``None`` when it is missing or its headers disagree with the state.

        A file shorter (or longer) than its header says is brought back to that
        size; the chunk checksums then tell which rows are intact.
        """
        files = [partial] if names is None else [partial / f"{i}.npy" for i in range(len(names))]
        if len(files) != len(leaves):
            return None
        arrays = []
        for path, spec in zip(files, leaves):
            shape, dtype = (rows, *spec["shape"]), np.dtype(spec["dtype"])
            try:
                if not path.is_file():
                    return None
                with open(path, "rb") as f:
                    got_shape, fortran, got_dtype, offset = _npy_header(f, path.name)
                if tuple(got_shape) != shape or got_dtype != dtype or fortran:
                    return None
                size = offset + math.prod(shape) * dtype.itemsize
                if path.stat().st_size != size:
                    os.truncate(path, size)
                arrays.append(np.memmap(path, dtype=dtype, mode="r+", offset=offset, shape=shape))
            except (OSError, ValueError):
                return None
        return cls(partial, names, arrays)

    def state(self, state: dict[str, Any]) -> dict[str, Any]:
        leaves = [{"shape": list(a.shape[1:]), "dtype": str(a.dtype)} for a in self.arrays]
        state = {**state, "leaves": leaves}
        return state if self.names is None else {**state, "outputs": self.names}

    def digest(self, lo: int, hi: int) -> bytes:
        """The checksum of rows ``lo:hi`` of every output array, as stored."""
        return _chunk_digest([a[lo:hi] for a in self.arrays])

    def write(self, lo: int, outputs: Any) -> None:
        leaves = jax.tree.leaves(outputs)
        if len(leaves) != len(self.arrays):
            raise ValueError(f"the model returned {len(leaves)} output arrays, earlier chunks {len(self.arrays)}")
        for out, leaf in zip(self.arrays, leaves):
            leaf = np.asarray(leaf)
            out[lo : lo + len(leaf)] = leaf
        for out in self.arrays:
            out.flush()

    def finish(self, output_path: Path) -> None:
        """Move the complete output into place (pack the leaves into the ``.npz``)."""
        self.arrays.clear()  # close the memory maps
        if self.names is None:
            os.replace(self.partial, output_path)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{output_path.name}.", suffix=".tmp", dir=output_path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                    for i, name in enumerate(self.names):
                        info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                        info.compress_type = zipfile.ZIP_STORED
                        with open(self.partial / f"{i}.npy", "rb") as src:
                            with archive.open(info, "w", force_zip64=True) as dst:
                                shutil.copyfileobj(src, dst, 1 << 20)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, output_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        shutil.rmtree(self.partial)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _bar:
    def __init__(self, enabled: bool, total: int, completed: int) -> None:
        self.enabled, self.total, self.completed = enabled, total, completed
        self.progress: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]infer chunks"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
            )
            self.progress.start()
            self.task = self.progress.add_task("infer", total=self.total, completed=self.completed)
        return self.advance

    def advance(self, done: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
