"""Batch inference on Ray Data: a compiled model in an actor pool, over ``.npy`` / ``.npz`` / Parquet shards.

Two entry points (both need the ``ray`` extra: ``pip install 'jaxopt_serve[ray]'``):

* ``EnginePredictor``: the callable class for your own pipeline,
  ``ds.map_batches(EnginePredictor, fn_constructor_kwargs={"model_path": ...},
  batch_size=..., compute=ray.data.ActorPoolStrategy(size=n))``. Each actor
  loads the model once from its path (``load_servable``: artifact or export)
  and reuses the engine's compiled buckets for every batch it gets.
* ``ray_batch_inference(model_path, inputs, output_path)``: the whole job over
  a list (or glob) of input shards, written as one output file in input
  order, identical to what ``run_batch_inference`` writes for the
  concatenated input with the same ``chunk_size`` (byte for byte: see below).

Why the job runs on chunk indices rather than on Ray's own batches: XLA
compiles a float reduction differently for different batch shapes, so a row's
output can change in the last bit with the bucket it is padded into. Ray Data
decides where its batches start and end; the helper therefore makes a dataset
of chunk indices and every actor reads the rows of its chunk itself (global
rows ``[k * chunk_size, (k + 1) * chunk_size)``, across shard boundaries), so
every row meets the engine in exactly the call it would meet in a
single-process run. A chunk that fails (an actor killed mid-chunk) is retried
by Ray on a restarted actor (Ray Data's actor pools restart actors and retry
their tasks by default) and recomputes the same bytes.

On a cluster the input shards (and the model file) must be readable at the
same path from every node (a shared file system); the outputs come back to
the driver through Ray's object store and are written there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
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
from jaxopt_serve.extras import require
from jaxopt_serve.serve.sharded_infer import expand_inputs


def _ray() -> Any:
    return require("ray", extra="ray", purpose="Batch inference on Ray Data")


def _ray_data() -> Any:
    require("pyarrow", extra="ray", purpose="Batch inference on Ray Data")
    return require("ray.data", extra="ray", purpose="Batch inference on Ray Data")


# -- the callable class for map_batches ---------------------------------------------------------------


class EnginePredictor:
    """Runs a jaxopt_serve model on Ray Data batches; one engine per actor, compiled buckets reused.

    Args:
        model_path: an artifact (``.jxs``) or exported model (``.jxe``), readable from every worker.
        input_columns: the column holding a one-array model's input (default
            ``"data"``, the column ``ray.data.read_numpy`` makes), or the
            columns forming a dict input (default: the model's own keys).
        output_column: the column for a one-array output; pytree outputs get one
            column per leaf, ``f"{output_column}/{name}"`` (``output/0``, ``output/logits``).
        max_batch: the engine's largest bucket (a larger batch is split into bucket-size calls).
        nan_policy: rows with a NaN or inf input (see ``InferenceEngine``; default: NaN outputs).

    The other columns of the batch (ids, file names) are passed through.

    Example (on a cluster; see the README for the whole recipe)::

        ds = ray.data.read_numpy("s3://bucket/images/")          # column "data"
        ds = ds.map_batches(EnginePredictor, fn_constructor_kwargs={"model_path": "/shared/cnn-int8.jxs"},
                            batch_size=256, compute=ray.data.ActorPoolStrategy(size=8))
        ds.write_parquet("s3://bucket/logits/")
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        input_columns: str | Sequence[str] | None = None,
        output_column: str = "output",
        max_batch: int = 256,
        nan_policy: NanPolicy = "propagate",
    ) -> None:
        from jaxopt_serve.serve.batch_infer import dict_input_keys
        from jaxopt_serve.serve.servable import load_servable

        self.engine = load_servable(model_path, max_batch=max_batch, nan_policy=nan_policy)
        keys = dict_input_keys(self.engine)
        if keys is None:
            if input_columns is not None and not isinstance(input_columns, str):
                raise ValueError(
                    f"input_columns: {model_path} takes one array; give one column name, got {list(input_columns)}"
                )
            self.columns: str | list[str] = input_columns or "data"
        else:
            self.columns = [input_columns] if isinstance(input_columns, str) else list(input_columns or keys)
            if sorted(self.columns) != keys:
                raise ValueError(f"input_columns {self.columns} do not match the model's dict input keys {keys}")
        self.output_column = output_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [c for c in ([self.columns] if isinstance(self.columns, str) else self.columns) if c not in batch]
        if missing:
            raise ValueError(f"the batch has no column {missing[0]!r}; it has {sorted(batch)} (set input_columns=)")
        x = batch[self.columns] if isinstance(self.columns, str) else {c: batch[c] for c in self.columns}
        outputs = self.engine(x)
        result = dict(batch)
        for name, leaf in zip(slash_names(outputs, empty=""), jax.tree.leaves(outputs)):
            result[f"{self.output_column}/{name}" if name else self.output_column] = np.asarray(leaf)
        return result


# -- input shards ---------------------------------------------------------------------------------------


class _Shards:
    """Row ranges read across a list of shards (``.npy`` / ``.npz`` memory-mapped, Parquet by row group)."""

    def __init__(self, paths: Sequence[str], key: str | Sequence[str] | None, predict: Any = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.key = key
        self.predict = predict
        self._open: dict[int, Any] = {}
        self.rows = [self._count(i) for i in range(len(self.paths))]
        self.starts = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def _source(self, i: int) -> Any:
        if i not in self._open:
            path = self.paths[i]
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                self._open[i] = pq.ParquetFile(path)
            else:
                from jaxopt_serve.serve.batch_infer import open_inputs

                self._open[i] = open_inputs(path, self.key, predict=self.predict)
        return self._open[i]

    def _count(self, i: int) -> int:
        source = self._source(i)
        if self.paths[i].suffix == ".parquet":
            return int(source.metadata.num_rows)
        first = source if isinstance(source, np.ndarray) else next(iter(source.values()))
        if first.ndim == 0:
            raise ValueError(f"input {self.paths[i]} holds a scalar, not rows")
        return len(first)

    def read(self, lo: int, hi: int) -> Any:
        """Global rows ``lo:hi`` (an array, or a dict of arrays), concatenated across shards."""
        parts = []
        for i in range(len(self.paths)):
            a, b = max(lo, int(self.starts[i])), min(hi, int(self.starts[i + 1]))
            if a < b:
                parts.append(self._read_local(i, a - int(self.starts[i]), b - int(self.starts[i])))
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], dict):
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return np.concatenate(parts)

    def _read_local(self, i: int, lo: int, hi: int) -> Any:
        source = self._source(i)
        if self.paths[i].suffix != ".parquet":
            if isinstance(source, np.ndarray):
                return np.asarray(source[lo:hi])
            return {k: np.asarray(a[lo:hi]) for k, a in source.items()}
        return self._read_parquet(i, source, lo, hi)

    def _read_parquet(self, i: int, pf: Any, lo: int, hi: int) -> Any:
        import pyarrow as pa

        groups, start, first = [], 0, None
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if start < hi and start + n > lo:
                groups.append(g)
                first = start if first is None else first
            start += n
        names = pf.schema_arrow.names
        if isinstance(self.key, str) or self.key is None:
            if self.key is None and len(names) != 1:
                raise ValueError(f"{self.paths[i].name} has columns {names}; choose one with key=")
            columns = [self.key or names[0]]
        else:
            columns = list(self.key)
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise ValueError(f"{self.paths[i].name} has no column {unknown[0]!r}; it has {names}")
        table = pf.read_row_groups(groups, columns=columns).slice(lo - first, hi - lo)

        def array(name: str) -> np.ndarray:
            column = table.column(name).combine_chunks()
            if hasattr(column, "to_numpy_ndarray"):  # Ray's tensor extension type
                return np.asarray(column.to_numpy_ndarray())
            if pa.types.is_fixed_size_list(column.type):
                values, shape = column, []
                while pa.types.is_fixed_size_list(values.type):
                    shape.append(values.type.list_size)
                    values = values.flatten()
                return values.to_numpy(zero_copy_only=False).reshape(len(column), *shape)
            return column.to_numpy(zero_copy_only=False)

        if isinstance(self.key, str) or self.key is None:
            return self._shaped(array(columns[0]))
        return {c: array(c) for c in columns}

    def _shaped(self, x: np.ndarray) -> np.ndarray:
        """A flat Parquet row (``fixed_size_list`` of the flattened example) in the engine's input shape."""
        shape = getattr(self.predict, "input_shape", None)
        if shape is not None and x.ndim == 2 and x.shape[1:] != tuple(shape) and x.shape[1] == int(np.prod(shape)):
            return x.reshape(len(x), *shape)
        return x


class _ChunkRunner:
    """The actor of ``ray_batch_inference``: loads the model once, then computes chunks by index."""

    def __init__(
        self, model_path: str, paths: list[str], key: Any, chunk_size: int, max_batch: int, nan_policy: str
    ) -> None:
        from jaxopt_serve.serve.servable import load_servable

        self.engine = load_servable(model_path, max_batch=max_batch)
        self.shards = _Shards(paths, key, self.engine)
        self.chunk_size, self.nan_policy = chunk_size, nan_policy

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, leaves = [], None
        for index in batch["chunk"].tolist():
            lo, hi = index * self.chunk_size, min((index + 1) * self.chunk_size, self.shards.total)
            out = self._compute(lo, hi)
            named = list(zip(slash_names(out, empty=""), jax.tree.leaves(out)))
            leaves = (
                [[np.asarray(a)] for _, a in named]
                if leaves is None
                else [acc + [np.asarray(a)] for acc, (_, a) in zip(leaves, named)]
            )
            rows.append(np.arange(lo, hi, dtype=np.int64))
            names = [name for name, _ in named]
        result = {"row": np.concatenate(rows)}
        for i, (name, parts) in enumerate(zip(names, leaves)):
            result[f"{i}:{name}"] = np.concatenate(parts)
        return result

    def _compute(self, lo: int, hi: int) -> Any:
        # the same steps as run_batch_inference's chunk: NaN policy, then one engine call on the chunk
        batch = self.shards.read(lo, hi)
        bad = nonfinite_rows(batch)
        if bad is not None:
            if self.nan_policy == "error":
                raise ValueError(
                    f"{nonfinite_error(bad, offset=lo, where=' of the inputs')}; pass "
                    f"nan_policy='propagate' to write NaN outputs for them"
                )
            batch = replace_rows(batch, bad)
        out = self.engine(batch)
        return out if bad is None else mark_rows(out, bad)


# -- the whole job -------------------------------------------------------------------------------------


def ray_batch_inference(
    model_path: str | os.PathLike[str],
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output_path: str | os.PathLike[str],
    *,
    key: str | Sequence[str] | None = None,
    chunk_size: int = 1024,
    max_batch: int | None = None,
    actors: int = 2,
    num_cpus: float = 1,
    nan_policy: NanPolicy = "error",
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run a model over every row of ``inputs`` on Ray Data's actor pool; one output file in input order.

    Ray must be initialized (``ray.init()``, or ``ray.init(address="auto")`` on
    a cluster). The output is byte-identical to
    ``run_batch_inference(load_servable(model_path, max_batch=max_batch), concatenated_input, ...,
    chunk_size=chunk_size)`` (and to ``jaxopt-serve infer`` with the same ``--chunk-size``).

    Args:
        model_path: artifact (``.jxs``) or exported model (``.jxe``), readable by every actor.
        inputs: shard files (``.npy``, uncompressed ``.npz``, ``.parquet``) or glob
            patterns, concatenated in the order given (a pattern's matches sorted).
        output_path: the ``.npy`` (one array output) or ``.npz`` (pytree outputs,
            one member per leaf) to write; it appears only when complete.
        key: the ``.npz`` member or Parquet column holding the input, or the
            members / columns of a dict input. A Parquet column holds one
            example per row (a fixed-size list, flattened or nested, or Ray's tensor type).
        chunk_size: rows per engine call and per Ray task.
        max_batch: the engine's largest bucket (default ``min(chunk_size, 1024)``, as the CLI).
        actors: the size of the actor pool (``ray.data.ActorPoolStrategy(size=actors)``).
        num_cpus: CPUs Ray reserves for each actor.
        nan_policy: rows with a NaN or inf input: ``"error"`` stops the job naming them;
            ``"propagate"`` writes NaN float outputs for them.
        on_chunk: called on the driver with ``(chunks done, total)`` after each chunk is written.

    Returns:
        ``rows``, ``chunks``, ``actors``, ``seconds`` (from submitting the job
        to the complete output), ``rows_per_second``.

    Raises:
        ValueError: a bad input path, shard or column, a bad argument (naming
            it), or a non-finite row under ``"error"``.
        MissingExtraError: Ray is not installed (the ``ray`` extra).
    """
    from jaxopt_serve.serve.batch_infer import _remove, _Sink  # noqa: PLC2701 - the same package's writer

    ray = _ray()
    ray_data = _ray_data()
    check_policy(nan_policy)
    for name, value in (("chunk_size", chunk_size), ("actors", actors)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch <= 0):
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    if not (isinstance(num_cpus, (int, float)) and num_cpus >= 0):
        raise ValueError(f"num_cpus must be >= 0, got {num_cpus!r}")
    model_path = Path(model_path)
    if not model_path.is_file():
        problem = "is not a regular file" if model_path.exists() else "does not exist"
        raise ValueError(f"model_path {model_path} {problem}")
    paths = expand_inputs(inputs)
    output_path = Path(output_path)
    if output_path.suffix not in (".npy", ".npz"):
        raise ValueError(f"output_path {output_path} must end in .npy (one output array) or .npz (pytree outputs)")
    if not output_path.parent.is_dir():
        raise ValueError(f"output_path {output_path}: the directory {output_path.parent} does not exist")
    if any(output_path.resolve() == p.resolve() for p in paths):
        raise ValueError(f"output_path {output_path} is one of the inputs; choose another output path")
    if not ray.is_initialized():
        raise ValueError("Ray is not initialized: call ray.init() (ray.init(address='auto') on a cluster) first")

    shards = _Shards([str(p) for p in paths], key)  # row counts (headers and Parquet metadata only)
    rows = shards.total
    if rows == 0:
        raise ValueError(f"inputs {[str(p) for p in paths]} hold no rows")
    total = -(-rows // chunk_size)
    max_batch = max_batch if max_batch is not None else min(chunk_size, 1024)

    start = time.perf_counter()
    ds = ray_data.from_items([{"chunk": k} for k in range(total)], override_num_blocks=min(total, 1000))
    ds = ds.map_batches(
        _ChunkRunner,
        batch_size=1,
        compute=ray_data.ActorPoolStrategy(size=actors),
        num_cpus=num_cpus,
        fn_constructor_kwargs={
            "model_path": str(model_path.resolve()),
            "paths": [str(p.resolve()) for p in paths],
            "key": key,
            "chunk_size": chunk_size,
            "max_batch": max_batch,
            "nan_policy": nan_policy,
        },
    )
    partial = output_path.with_name(output_path.name + ".partial")
    sink, finished = None, set()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            columns = sorted((c for c in batch if c != "row"), key=lambda c: int(c.split(":", 1)[0]))
            if sink is None:
                sink = _create_sink(
                    partial,
                    output_path,
                    [c.split(":", 1)[1] for c in columns],
                    [batch[c] for c in columns],
                    rows,
                    _remove,
                    _Sink,
                )
            index = batch["row"]
            for out, column in zip(sink.arrays, columns):
                out[index] = batch[column]
            new = set((index // chunk_size).tolist()) - finished  # a retried chunk may arrive twice: same bytes
            finished |= new
            if on_chunk is not None and new:
                on_chunk(len(finished), total)
    except Exception as err:
        cause = _user_error(err)
        if sink is not None:
            sink.arrays.clear()
        _remove(partial)
        if cause is not None:
            raise ValueError(str(cause)) from err
        raise
    if len(finished) != total:
        sink.arrays.clear()
        _remove(partial)
        missing = sorted(set(range(total)) - finished)
        raise RuntimeError(
            f"Ray Data returned {len(finished)} of {total} chunks (missing {missing[:10]}); nothing was written"
        )
    for out in sink.arrays:
        out.flush()
    sink.finish(output_path)
    seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "chunks": total,
        "actors": actors,
        "seconds": seconds,
        "rows_per_second": rows / seconds if seconds > 0 else float("nan"),
    }


def _create_sink(
    partial: Path,
    output_path: Path,
    names: list[str],
    firsts: list[np.ndarray],
    rows: int,
    remove: Callable[[Path], None],
    sink_class: Any,
) -> Any:
    """The output files, laid out as ``run_batch_inference`` lays them out (same names, dtypes, order)."""
    single = names == [""]
    if not single and output_path.suffix != ".npz":
        raise ValueError(
            f"the model returns {len(names)} output arrays {names}; write them to an .npz output_path "
            f"(one array per output), not {output_path.name}"
        )
    remove(partial)
    if single and output_path.suffix != ".npz":
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=firsts[0].dtype, shape=(rows, *firsts[0].shape[1:]))
        return sink_class(partial, None, [out])
    names = ["outputs" if n == "" else n for n in names]
    partial.mkdir(parents=True)
    arrays = [
        np.lib.format.open_memmap(partial / f"{i}.npy", mode="w+", dtype=a.dtype, shape=(rows, *a.shape[1:]))
        for i, a in enumerate(firsts)
    ]
    return sink_class(partial, names, arrays)


def _user_error(err: BaseException) -> BaseException | None:
    """The ``ValueError`` raised in an actor (a non-finite row, a bad column), found in Ray's wrapping of it."""
    import re

    seen, current = set(), err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ValueError):
            return current
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else (current.__cause__ or current.__context__)
    # Ray may carry the actor's exception only as its formatted traceback
    found = re.findall(r"^ValueError: (.+)$", str(err), flags=re.MULTILINE)
    return ValueError(found[-1]) if found else None
