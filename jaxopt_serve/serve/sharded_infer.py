"""Batch inference over many input shards, split across processes: one output shard per input shard, resumable.

The JAX-native way to scale ``run_batch_inference`` past one process, without
Ray: start one process per host (or several on one machine), each with the
same list of input files; process ``i`` of ``n`` takes the files
``inputs[i::n]`` (in the order given, a glob's matches sorted) and writes,
for each, ``<output_dir>/<input stem>.npy`` (or ``.npz``). Each output shard is
written by ``run_batch_inference``, so a process killed mid-shard resumes
that shard from its last recorded chunk when the same command runs again
(checksummed chunk records, ``<output>.state.chunks``); a shard that was
finished is recognised by its ``<output>.done.json`` record (model checksum,
input path, size and chunk size) and skipped.

``jaxopt-serve infer --output-dir`` runs it; with ``--num-processes`` above 1
each process first joins ``jax.distributed`` (``--coordinator``,
``--process-id``), so the same command works where JAX requires it (TPU pods,
multi-node GPU) and the processes wait for each other at the end.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxopt_serve.engine.nonfinite import NanPolicy
from jaxopt_serve.fileio import atomic_write

INPUT_SUFFIXES = (".npy", ".npz", ".parquet")


def expand_inputs(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    what: str = "inputs",
    suffixes: Sequence[str] = INPUT_SUFFIXES,
) -> list[Path]:
    """The input shard paths: each entry a file or a glob pattern (matches sorted); ``ValueError`` naming a bad one.

    Example:
        >>> expand_inputs([])
        Traceback (most recent call last):
        ...
        ValueError: inputs: no input files given
    """
    entries = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    paths: list[Path] = []
    for entry in entries:
        text = os.fspath(entry)
        if glob.has_magic(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise ValueError(f"{what}: the pattern {text!r} matches no file")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(text))
    if not paths:
        raise ValueError(f"{what}: no input files given")
    seen: set[str] = set()
    for path in paths:
        if path.suffix not in suffixes:
            raise ValueError(f"{what}: {path} is not a {', '.join(suffixes)} file")
        if not path.is_file():
            raise ValueError(f"{what}: {path} {'is not a regular file' if path.exists() else 'does not exist'}")
        key = str(path.resolve())
        if key in seen:
            raise ValueError(f"{what}: {path} is given twice")
        seen.add(key)
    return paths


def shard_outputs(paths: Sequence[Path], output_dir: str | os.PathLike[str], suffix: str = ".npy") -> list[Path]:
    """The output shard of every input (``<output_dir>/<stem><suffix>``); ``ValueError`` when two stems collide.

    Example:
        >>> [p.name for p in shard_outputs([Path("a/x-0.npy"), Path("a/x-1.npy")], "out")]
        ['x-0.npy', 'x-1.npy']
    """
    if suffix not in (".npy", ".npz"):
        raise ValueError(f"output suffix must be '.npy' or '.npz', got {suffix!r}")
    outputs, by_name = [], {}
    for path in paths:
        out = Path(output_dir) / f"{path.stem}{suffix}"
        if out.name in by_name:
            raise ValueError(
                f"inputs {by_name[out.name]} and {path} would both write {out}; give the shards distinct file names"
            )
        by_name[out.name] = path
        outputs.append(out)
    return outputs


def process_shards(count: int, num_processes: int, process_id: int) -> list[int]:
    """The indices of the shards process ``process_id`` of ``num_processes`` takes: every ``num_processes``-th.

    Example:
        >>> process_shards(5, 2, 0), process_shards(5, 2, 1)
        ([0, 2, 4], [1, 3])
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes <= 0:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id!r}")
    return list(range(process_id, count, num_processes))


def run_sharded_inference(
    predict: Callable[[Any], Any],
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    artifact_path: str | os.PathLike[str],
    num_processes: int = 1,
    process_id: int = 0,
    key: str | Sequence[str] | None = None,
    chunk_size: int = 1024,
    suffix: str = ".npy",
    progress: bool = False,
    nan_policy: NanPolicy = "error",
    on_chunk: Callable[[Path, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run ``predict`` over this process's shards of ``inputs``, one resumable output shard each.

    Args:
        predict: ``f(batch) -> outputs`` (an ``InferenceEngine``).
        inputs: ``.npy`` / ``.npz`` shard files or glob patterns; every process must be given the same list.
        output_dir: where the output shards go (``<stem><suffix>``); it must exist.
        artifact_path: the model file (fingerprinted: a resume or a skip never mixes models).
        num_processes, process_id: this process's place; it takes shards ``process_id::num_processes``.
        key, chunk_size, progress, nan_policy: as ``run_batch_inference``.
        suffix: ``".npy"`` (one output array) or ``".npz"`` (pytree outputs).
        on_chunk: called with ``(output shard, done, total)`` after each chunk.

    Returns:
        ``shards`` (this process's output paths), ``rows`` computed now,
        ``skipped`` (shards already complete), ``resumed`` (shard name -> the chunk it resumed at).
    """
    from jaxopt_serve.serve.batch_infer import _digest, run_batch_inference  # noqa: PLC2701

    paths = expand_inputs(inputs, suffixes=(".npy", ".npz"))
    outputs = shard_outputs(paths, output_dir, suffix)
    mine = process_shards(len(paths), num_processes, process_id)
    if not Path(output_dir).is_dir():
        raise ValueError(f"output_dir {output_dir} is not a directory")
    model_digest = _digest(Path(artifact_path))
    summary: dict[str, Any] = {
        "shards": [str(outputs[i]) for i in mine],
        "rows": 0,
        "skipped": [],
        "resumed": {},
        "notes": [],
    }
    for i in mine:
        src, out = paths[i], outputs[i]
        done_path = out.with_name(out.name + ".done.json")
        record = {
            "artifact_sha256": model_digest,
            "input": str(src.resolve()),
            "input_bytes": src.stat().st_size,
            "key": key if key is None or isinstance(key, str) else list(key),
            "chunk_size": chunk_size,
        }
        if out.is_file() and _read_json(done_path) == record:
            summary["skipped"].append(str(out))
            continue
        done_path.unlink(missing_ok=True)
        callback = None if on_chunk is None else (lambda done, total, out=out: on_chunk(out, done, total))
        result = run_batch_inference(
            predict,
            src,
            out,
            artifact_path=artifact_path,
            key=key,
            chunk_size=chunk_size,
            progress=progress,
            on_chunk=callback,
            nan_policy=nan_policy,
        )
        atomic_write(done_path, json.dumps(record).encode())
        summary["rows"] += result["rows"] if not result["resumed_at_chunk"] else 0
        if result["resumed_at_chunk"]:
            summary["resumed"][out.name] = result["resumed_at_chunk"]
            summary["rows"] += result["rows"] - result["resumed_at_chunk"] * chunk_size
        summary["notes"].extend(f"{out.name}: {note}" for note in result["notes"])
    return summary


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
