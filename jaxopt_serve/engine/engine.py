"""The inference engine: ahead-of-time compiled executables per batch-size bucket.

``InferenceEngine(config, variables)`` compiles the model's inference
function once per bucket (1, 2, 4, ..., ``max_batch`` by default) with
``jax.jit(...).lower(...).compile()``. A request is padded up to the smallest
bucket that holds it and the outputs are cut back; a request larger than the
largest bucket is split. After ``warmup()`` no batch size up to the limit
compiles anything (``compile_count`` counts the engine's compiles).

Float and quantized variables (``QArray`` leaves, run by
``quantized_predict_fn``) go through the same engine, optionally on a device
mesh: data parallel (batch split along ``"data"``), model parallel (variables
split by ``ShardingRule``s along ``"model"``) or both.

Inputs are checked before anything is dispatched: shape and dtype must match
the model's example, and the NaN policy decides what happens to non-finite
inputs (``"propagate"``: computed as given, the default; ``"error"``: a
``ValueError`` naming the offending rows).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxopt_serve.engine.sharding import DATA, ShardingRule, shard_variables
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables
from jaxopt_serve.quant.qarray import has_qarrays
from jaxopt_serve.quant.runtime import inference_fn

NanPolicy = Literal["propagate", "error"]


def default_buckets(max_batch: int, multiple: int = 1) -> tuple[int, ...]:
    """Powers of two up to ``max_batch`` (included), each rounded up to a multiple of ``multiple``.

    Example:
        >>> default_buckets(48)
        (1, 2, 4, 8, 16, 32, 48)
        >>> default_buckets(16, multiple=4)
        (4, 8, 16)
    """
    if max_batch <= 0:
        raise ValueError(f"max_batch must be > 0, got {max_batch}")
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    rounded = sorted({-(-s // multiple) * multiple for s in sizes})
    return tuple(rounded)


def enable_compilation_cache(directory: str | os.PathLike[str], *, min_compile_secs: float = 0.0) -> str:
    """Turn on JAX's persistent compilation cache in ``directory`` (created if missing, private to this user).

    The cache directory holds code that will be executed: it must not be
    writable by other users (checked).
    """
    path = os.path.abspath(os.fspath(directory))
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(f"compilation cache directory {path} is writable by other users; use a private directory")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class InferenceEngine:
    """Bucketed, AOT-compiled inference for one model.

    Args:
        config: the model's config.
        variables: float variables, or quantized ones (``QArray`` leaves).
        input_shape: shape of one example (default: the config's).
        max_batch: the largest bucket; larger requests are split.
        buckets: explicit bucket sizes (default: powers of two up to ``max_batch``).
        dtype: ``"float32"`` or ``"bfloat16"`` activations and float weights (outputs are float32).
        quant_mode: how quantized variables run (see ``quantized_predict_fn``).
        mesh: a ``make_mesh`` mesh; the batch is split along ``"data"``.
        rules: ``ShardingRule``s that split variables along ``"model"``.
        donate: donate the padded input buffer to the computation (``"auto"``:
            on GPU/TPU, where XLA can reuse it; the CPU backend cannot).
        nan_policy: ``"propagate"`` or ``"error"``.
        predict: ``f(variables, x) -> outputs`` to serve instead of the
            config's own inference function (e.g. a custom quantized mode).

    Example:
        >>> import numpy as np
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> cfg = MLPConfig(features=(16,))
        >>> engine = InferenceEngine(cfg, init_variables(cfg, 0), max_batch=8)
        >>> engine.warmup().compile_count
        4
        >>> engine(np.zeros((5, 8, 8, 1), np.float32)).shape, engine(np.zeros((20, 8, 8, 1), np.float32)).shape
        ((5, 10), (20, 10))
        >>> engine.compile_count
        4
    """

    def __init__(
        self,
        config: ModelConfig,
        variables: Variables,
        *,
        input_shape: Sequence[int] | None = None,
        max_batch: int = 256,
        buckets: Sequence[int] | None = None,
        dtype: Literal["float32", "bfloat16"] = "float32",
        quant_mode: str = "auto",
        mesh: Mesh | None = None,
        rules: Sequence[ShardingRule] = (),
        donate: bool | Literal["auto"] = "auto",
        nan_policy: NanPolicy = "propagate",
        predict: Any | None = None,
    ) -> None:
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        if nan_policy not in ("propagate", "error"):
            raise ValueError(f"nan_policy must be 'propagate' or 'error', got {nan_policy!r}")
        self.config = config
        self.input_shape = tuple(int(d) for d in (input_shape if input_shape is not None else config.example_shape()))
        self.input_dtype = np.dtype(config.input_dtype)
        self.mesh = mesh
        data_size = mesh.shape[DATA] if mesh is not None else 1
        self.buckets = tuple(sorted(set(buckets))) if buckets is not None else default_buckets(max_batch, data_size)
        if any(b <= 0 or b % data_size for b in self.buckets):
            raise ValueError(f"buckets {self.buckets} must be positive multiples of the mesh's data axis ({data_size})")
        self.max_batch = self.buckets[-1]
        self.dtype = dtype
        self.nan_policy = nan_policy
        self.quantized = has_qarrays(variables)
        base = predict if predict is not None else inference_fn(config, variables, mode=quant_mode)
        compute = jnp.bfloat16 if dtype == "bfloat16" else None

        def run(variables: Variables, x: jax.Array) -> jax.Array:
            if compute is not None:
                variables = jax.tree.map(lambda a: a.astype(compute) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                         variables)
                x = x.astype(compute) if jnp.issubdtype(x.dtype, jnp.floating) else x
            return base(variables, x).astype(jnp.float32)

        if donate == "auto":
            donate = jax.default_backend() != "cpu"
        self._jitted = jax.jit(run, donate_argnums=(1,) if donate else ())
        if mesh is not None:
            self.variables = shard_variables(variables, mesh, rules)
            self._input_sharding = NamedSharding(mesh, P(DATA))
        else:
            if rules:
                raise ValueError("sharding rules need a mesh (mesh=make_mesh(...))")
            self.variables = jax.device_put(dict(variables))
            self._input_sharding = None
        self._compiled: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.compile_count = 0

    # -- compilation ---------------------------------------------------------------------------

    def _executable(self, bucket: int) -> Any:
        with self._lock:
            exe = self._compiled.get(bucket)
            if exe is None:
                spec = jax.ShapeDtypeStruct((bucket, *self.input_shape), self.input_dtype, sharding=self._input_sharding)
                exe = self._jitted.lower(self.variables, spec).compile()
                self._compiled[bucket] = exe
                self.compile_count += 1
            return exe

    def warmup(self) -> InferenceEngine:
        """Compile every bucket now (after this, no request size up to the limit compiles)."""
        for bucket in self.buckets:
            self._executable(bucket)
        return self

    # -- inference -------------------------------------------------------------------------------

    def check_input(self, x: Any) -> np.ndarray:
        """``x`` as a numpy batch, or ``ValueError`` naming what is wrong (before any dispatch)."""
        x = np.asarray(x)
        if x.dtype == object or x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected a batch of shape (batch, {', '.join(map(str, self.input_shape))}) for {self.config.name!r}, "
                f"got {x.shape}{' of objects' if x.dtype == object else ''}"
            )
        if x.shape[0] == 0:
            raise ValueError("empty batch: expected at least one example")
        if x.dtype != self.input_dtype:
            same_kind = np.issubdtype(x.dtype, np.floating) and np.issubdtype(self.input_dtype, np.floating)
            same_kind |= np.issubdtype(x.dtype, np.integer) and np.issubdtype(self.input_dtype, np.integer)
            if not same_kind:
                raise ValueError(f"expected {self.input_dtype} inputs for {self.config.name!r}, got {x.dtype}")
            x = x.astype(self.input_dtype)
        if self.nan_policy == "error" and np.issubdtype(x.dtype, np.floating):
            bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
            if bad.any():
                raise ValueError(f"non-finite inputs (NaN or inf) in rows {np.flatnonzero(bad)[:10].tolist()}")
        return x

    def bucket_for(self, n: int) -> int:
        """The smallest bucket that holds ``n`` examples (``n`` <= ``max_batch``)."""
        for bucket in self.buckets:
            if bucket >= n:
                return bucket
        raise ValueError(f"{n} examples exceed the largest bucket {self.max_batch}")

    def __call__(self, x: Any) -> np.ndarray:
        """Predictions for the batch ``x`` (numpy in, numpy out)."""
        x = self.check_input(x)
        outputs = []
        for start in range(0, len(x), self.max_batch):
            chunk = x[start : start + self.max_batch]
            n = len(chunk)
            bucket = self.bucket_for(n)
            if bucket != n:
                chunk = np.concatenate([chunk, np.zeros((bucket - n, *chunk.shape[1:]), chunk.dtype)])
            if self._input_sharding is not None:  # also right with several processes: each places its own shards
                batch = jax.make_array_from_callback(chunk.shape, self._input_sharding, lambda idx, c=chunk: c[idx])
            else:
                batch = chunk
            out = self._executable(bucket)(self.variables, batch)
            if not out.is_fully_addressable:
                from jax.experimental import multihost_utils

                out = multihost_utils.process_allgather(out, tiled=True)
            outputs.append(np.asarray(out)[:n])
        return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]
