"""Resumable batch inference over ``.npy`` / ``.npz`` files, memory-mapped, in input order.

The input is memory-mapped (``.npy``, or an uncompressed member of an
``.npz``), never loaded whole. Outputs go, chunk by chunk, into a memory-mapped
``.npy`` under a temporary name next to the output; after each chunk is
flushed, a small JSON state file records how many chunks are done. Run the
same command after a crash (even SIGKILL) and it checks that the state
belongs to the same job (artifact checksum, input, sizes), then continues
from the first unfinished chunk. When every chunk is done the output is
renamed into place and the state file removed. Chunks are fixed slices of
the input computed the same way on every run, so a resumed output is
byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

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


def run_batch_inference(
    predict: Callable[[np.ndarray], np.ndarray],
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    artifact_path: str | os.PathLike[str],
    key: str | None = None,
    chunk_size: int = 1024,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run ``predict`` over every row of the input, resumably; returns a summary (rows, seconds, rows/s, resumed_at).

    Args:
        predict: ``f(batch) -> outputs`` (e.g. an ``InferenceEngine``).
        input_path: ``.npy`` or ``.npz`` (memory-mapped).
        output_path: the ``.npy`` to write (appears only when complete).
        artifact_path: the model file, fingerprinted so a resume never mixes models.
        key: the array inside an ``.npz``.
        chunk_size: rows per chunk (the unit of progress and of resume).
        progress: show a progress bar.
        on_chunk: called with ``(done, total)`` after each chunk is recorded.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    x = open_input(input_path, key)
    if x.ndim < 1 or len(x) == 0:
        raise ValueError(f"input {input_path} holds no rows (shape {x.shape})")
    output_path = Path(output_path)
    partial = output_path.with_name(output_path.name + ".partial")
    state_path = output_path.with_name(output_path.name + ".state.json")
    total = -(-len(x) // chunk_size)
    job = {"artifact_sha256": _digest(Path(artifact_path)), "input": str(Path(input_path).resolve()),
           "key": key, "input_shape": list(x.shape), "input_dtype": str(x.dtype), "chunk_size": chunk_size}

    done = 0
    if state_path.exists() and partial.exists():
        state = json.loads(state_path.read_text())
        if state.get("job") != job:
            raise ValueError(f"{state_path} belongs to another job (model, input or chunk size differ); "
                             f"delete it and {partial.name} to start over")
        done = int(state["done"])
        out = np.lib.format.open_memmap(partial, mode="r+")
    else:
        first = np.asarray(predict(np.asarray(x[: min(chunk_size, len(x))])))
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=first.dtype, shape=(len(x), *first.shape[1:]))
        out[: len(first)] = first
        out.flush()
        done = 1
        atomic_write(state_path, json.dumps({"job": job, "done": done}).encode())
        if on_chunk is not None:
            on_chunk(done, total)
    resumed_at = done if done > 1 else 0
    start = time.perf_counter()
    rows_this_run = 0
    with _bar(progress, total, done) as advance:
        for index in range(done, total):
            lo, hi = index * chunk_size, min((index + 1) * chunk_size, len(x))
            out[lo:hi] = np.asarray(predict(np.asarray(x[lo:hi])))
            out.flush()
            atomic_write(state_path, json.dumps({"job": job, "done": index + 1}).encode())
            rows_this_run += hi - lo
            advance(index + 1)
            if on_chunk is not None:
                on_chunk(index + 1, total)
    del out
    os.replace(partial, output_path)
    state_path.unlink()
    seconds = time.perf_counter() - start
    return {"rows": int(len(x)), "chunks": total, "resumed_at_chunk": resumed_at, "seconds": seconds,
            "rows_per_second": rows_this_run / seconds if seconds > 0 else float("nan")}


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
