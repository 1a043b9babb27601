"""Resumable batch inference over ``.npy`` / ``.npz`` files, memory-mapped, in input order.

The input is memory-mapped (``.npy``, or uncompressed members of an
``.npz``), never loaded whole. A model with a dict input reads it from an
``.npz`` whose members are the dict's keys (``input_ids.npy``,
``attention_mask.npy``): give the keys, or let an ``InferenceEngine`` name them.

Outputs go, chunk by chunk, into memory-mapped ``.npy`` files under a
temporary name next to the output; after each chunk is flushed, a small JSON
state file records how many chunks are done. Run the same command after a
crash (even SIGKILL) and it checks that the state belongs to the same job
(artifact checksum, input, sizes), then continues from the first unfinished
chunk. Chunks are fixed slices of the input computed the same way on every
run, so a resumed output is byte-identical to an uninterrupted one.

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

from jaxopt_serve.engine.pytrees import slash_names
from jaxopt_serve.fileio import atomic_write


def open_input(path: str | os.PathLike[str], key: str | None = None) -> np.ndarray:
    """A read-only memory map of the array in ``path`` (``.npy``, or member ``key`` of an uncompressed ``.npz``)."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if path.suffix != ".npz":
        raise ValueError(f"input must be a .npy or .npz file, got {path.name}")
    with zipfile.ZipFile(path) as archive:
        names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
        if key is None:
            if len(names) != 1:
                raise ValueError(f"{path.name} holds arrays {names}; choose one with --key")
            key = names[0]
        if key not in names:
            raise ValueError(f"{path.name} has no array {key!r}; it holds {names}")
        info = archive.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path.name}: array {key!r} is compressed and cannot be memory-mapped; "
                             f"save it with np.savez (not savez_compressed) or as .npy")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            raise ValueError(f"{path.name}: array {key!r} holds Python objects; refusing to load it")
        offset = f.tell()
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


def open_inputs(path: str | os.PathLike[str], key: str | Sequence[str] | None = None, *,
                predict: Any = None) -> np.ndarray | dict[str, np.ndarray]:
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
) -> dict[str, Any]:
    """Run ``predict`` over every row of the input, resumably; returns a summary (rows, seconds, rows/s, resumed_at).

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
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    x = open_inputs(input_path, key, predict=predict)
    rows = _rows(x)
    if rows == 0:
        shape = x.shape if isinstance(x, np.ndarray) else {k: a.shape for k, a in x.items()}
        raise ValueError(f"input {input_path} holds no rows (shape {shape})")
    output_path = Path(output_path)
    partial = output_path.with_name(output_path.name + ".partial")
    state_path = output_path.with_name(output_path.name + ".state.json")
    total = -(-rows // chunk_size)
    job: dict[str, Any] = {"artifact_sha256": _digest(Path(artifact_path)), "input": str(Path(input_path).resolve()),
                           "key": key if key is None or isinstance(key, str) else list(key)}
    if isinstance(x, np.ndarray):
        job.update(input_shape=list(x.shape), input_dtype=str(x.dtype))
    else:
        job.update(input_shape={k: list(a.shape) for k, a in x.items()},
                   input_dtype={k: str(a.dtype) for k, a in x.items()})
    job["chunk_size"] = chunk_size

    if state_path.exists() and partial.exists():
        state = json.loads(state_path.read_text())
        if state.get("job") != job:
            raise ValueError(f"{state_path} belongs to another job (model, input or chunk size differ); "
                             f"delete it and {partial.name} to start over")
        done = int(state["done"])
        sink = _Sink.reopen(partial, state.get("outputs"))
    else:
        first = predict(_slice(x, 0, min(chunk_size, rows)))
        sink = _Sink.create(partial, output_path, first, rows)
        sink.write(0, first)
        done = 1
        atomic_write(state_path, json.dumps(sink.state({"job": job, "done": done})).encode())
        if on_chunk is not None:
            on_chunk(done, total)
    resumed_at = done if done > 1 else 0
    start = time.perf_counter()
    rows_this_run = 0
    with _bar(progress, total, done) as advance:
        for index in range(done, total):
            lo, hi = index * chunk_size, min((index + 1) * chunk_size, rows)
            sink.write(lo, predict(_slice(x, lo, hi)))
            atomic_write(state_path, json.dumps(sink.state({"job": job, "done": index + 1})).encode())
            rows_this_run += hi - lo
            advance(index + 1)
            if on_chunk is not None:
                on_chunk(index + 1, total)
    sink.finish(output_path)
    state_path.unlink()
    seconds = time.perf_counter() - start
    return {"rows": int(rows), "chunks": total, "resumed_at_chunk": resumed_at, "seconds": seconds,
            "rows_per_second": rows_this_run / seconds if seconds > 0 else float("nan")}


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
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=leaves[0].dtype, shape=(rows, *leaves[0].shape[1:]))
            return cls(partial, None, [out])
        if output_path.suffix != ".npz":
            names = slash_names(first)
            raise ValueError(f"the model returns {len(leaves)} output arrays {names}; write them to an .npz output "
                             f"(one array per output), not {output_path.name}")
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        arrays = [np.lib.format.open_memmap(partial / f"{i}.npy", mode="w+", dtype=leaf.dtype,
                                            shape=(rows, *leaf.shape[1:])) for i, leaf in enumerate(leaves)]
        return cls(partial, slash_names(first), arrays)

    @classmethod
    def reopen(cls, partial: Path, names: list[str] | None) -> _Sink:
        if names is None:
            return cls(partial, None, [np.lib.format.open_memmap(partial, mode="r+")])
        return cls(partial, names, [np.lib.format.open_memmap(partial / f"{i}.npy", mode="r+") for i in range(len(names))])

    def state(self, state: dict[str, Any]) -> dict[str, Any]:
        return state if self.names is None else {**state, "outputs": self.names}

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

            self.progress = Progress(TextColumn("[bold]infer chunks"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn())
            self.progress.start()
            self.task = self.progress.add_task("infer", total=self.total, completed=self.completed)
        return self.advance

    def advance(self, done: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
