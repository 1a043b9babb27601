"""The inference engine: ahead-of-time compiled executables per batch-size bucket, for any model.

``InferenceEngine(model)`` takes a ``Model`` (``Model.linen / .nnx / .function``;
``InferenceEngine(config, variables)`` for the reference models) and compiles
its inference function once per bucket (1, 2, 4, ..., ``max_batch`` by
default) with ``jax.jit(...).lower(...).compile()``. Inputs and outputs are
pytrees (a dict of ``input_ids`` and ``attention_mask``, a tuple of logits and
class ids); axis 0 of every input leaf is the batch. A request is padded with
zero rows up to the smallest bucket that holds it, leaf by leaf, and every
output leaf is cut back to the request's rows; a request larger than the
largest bucket is split and the chunks' outputs concatenated leaf by leaf.
Float output leaves come back as float32, integer and bool leaves keep their
dtype. After ``warmup()`` no batch size up to the limit compiles anything
(``compile_count`` counts the engine's compiles).

Calling: ``engine(x)`` for a model with one positional input (a plain array or
any pytree, e.g. ``engine({"input_ids": ids, "attention_mask": mask})``);
``engine(a, b)`` (or ``engine((a, b))``) for a model with several.

Sequence models can bucket a second axis: ``length_buckets=(16, 32, 64, 128)``
with ``length_axes``, a pytree prefix of the inputs giving the padded axis of
each leaf (``None``: none), e.g. ``{"input_ids": 1, "attention_mask": 1}``. All
leaves with a length axis share one length per request; it is zero-padded up
to the smallest length bucket that holds it (a zero attention mask marks
padding, so the model must ignore zero padding), and a length beyond the
largest bucket is an error. The executables are then one per (batch bucket,
length bucket): ``len(buckets) * len(length_buckets)`` after ``warmup()``.
``output_length_axes`` (a prefix of the outputs) names output axes to cut
back to the request's length (per-token outputs).

Float and quantized variables (``QArray`` leaves, run quantized by
``jaxopt_serve.quant.runtime.inference_fn``) go through the same engine,
optionally on a device mesh: data parallel (every input leaf split along
``"data"`` on axis 0), model parallel (variables split by ``ShardingRule`` s
along ``"model"``) or both.

Inputs are checked before anything is dispatched (``Model.check_inputs``:
structure, trailing shapes and dtype kind, naming the leaf), and the NaN
policy decides what happens to rows with a non-finite float input
(``jaxopt_serve.engine.nonfinite``): ``"propagate"`` (the default) runs them
as zero rows and returns NaN in their float outputs, so no row's output
depends on the other rows of its bucket; ``"error"`` raises a ``ValueError``
naming the leaf and the offending rows.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxopt_serve.engine.nonfinite import (
    NanPolicy,
    check_markable,
    check_policy,
    mark_rows,
    nonfinite_rows,
    replace_rows,
)
from jaxopt_serve.engine.pytrees import (
    axes_per_leaf,
    batch_rows,
    concat_rows,
    cut_axes,
    leaf_names,
    pad_axes,
    pad_rows,
    take_rows,
)
from jaxopt_serve.engine.sharding import DATA, MODEL, ShardingRule, shard_variables
from jaxopt_serve.model import Model, as_model, check_inputs
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables
from jaxopt_serve.quant.qarray import has_qarrays
from jaxopt_serve.quant.runtime import inference_fn, leading_contractions, serving_layout


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


def _example_of(example: Any, input_shape: Sequence[int] | None, input_dtype: Any) -> tuple[Any, ...]:
    """Example inputs for ``predict=`` without a model: ``example`` (a tuple: one per input) or one array."""
    if example is not None:
        return tuple(example) if isinstance(example, tuple) else (example,)
    if input_shape is None:
        raise ValueError(
            "InferenceEngine needs to know the inputs: pass a model (Model.linen / Model.nnx / Model.function, or a "
            "ModelConfig with its variables), or with predict= pass example inputs (example=batch, or a tuple with "
            "one batch per positional input) or input_shape= (one example's shape) and input_dtype="
        )
    return (np.zeros((1, *(int(d) for d in input_shape)), np.dtype(input_dtype or "float32")),)


def _checked_compiler_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` as a dict, each name and value accepted by XLA: one tiny program is compiled with them, so
    a misspelt option fails here with its name rather than at the first request."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"compiler_options must be a mapping of XLA option names to values, got {options!r}")
    options = dict(options)
    for name, value in options.items():
        if not isinstance(name, str) or not isinstance(value, (str, bool, int, float)):
            raise ValueError(
                f"compiler_options[{name!r}] = {value!r}: names are strings and values str, bool, int or float"
            )
    if options:
        try:
            jax.jit(lambda x: x + 1).lower(np.zeros((1,), np.float32)).compile(options)
        except Exception as error:  # XLA's own message names the option or the value
            raise ValueError(f"compiler_options {options}: {error}") from None
    return options


class InferenceEngine:
    """Bucketed, AOT-compiled inference for one model, pytrees in and out.

    Args:
        model: a ``Model``; or a reference ``ModelConfig`` (with ``variables``);
            or ``None`` with ``predict=`` and ``example=`` / ``input_shape=``.
        variables: float variables, or quantized ones (``QArray`` leaves)
            (default: the ``Model`` 's own).
        example: with ``predict=`` and no model: example inputs (a batch, or a
            tuple with one batch per positional input) giving shapes and dtypes.
        input_shape: one example's shape, for a ``ModelConfig`` (default: the
            config's) or for ``predict=`` without a model (with ``input_dtype``).
        input_dtype: the input dtype with ``input_shape`` (default float32).
        max_batch: the largest bucket; larger requests are split.
        buckets: explicit bucket sizes (default: powers of two up to ``max_batch``).
        length_buckets: sizes of the second bucketed axis (sequence length), e.g. ``(16, 32, 64, 128)``.
        length_axes: with ``length_buckets``: a pytree prefix of the inputs (as
            passed to the engine) giving each leaf's length axis or ``None``,
            e.g. ``{"input_ids": 1, "attention_mask": 1}``.
        output_length_axes: a pytree prefix of the outputs: axes cut back to the request's length.
        dtype: ``"float32"`` or ``"bfloat16"`` activations and float weights (float outputs are float32).
        quant_mode: how quantized variables run (see ``quantized_predict_fn``).
        mesh: a ``make_mesh`` mesh; every input leaf is split along ``"data"`` on axis 0.
        rules: ``ShardingRule`` s that split variables along ``"model"``, or ``"auto"``: the
            rules ``model_parallel_rules(model, size=...)`` derives from the model's traced program.
        donate: donate the padded input buffers to the computation (``"auto"``:
            on GPU/TPU, where XLA can reuse them; the CPU backend cannot).
        nan_policy: rows with a NaN or inf in a float input: ``"propagate"`` runs them as zero
            rows and returns NaN in their float outputs (bit-identical outputs for the other
            rows, whatever shares their bucket); ``"error"`` raises a ``ValueError`` naming them.
        predict: ``f(variables, *inputs) -> outputs`` to serve instead of the
            model's own inference function (e.g. a custom quantized mode).
        compiler_options: XLA options for this engine's executables only (what
            ``XLA_FLAGS`` sets for the whole process, before JAX starts), e.g.
            ``{"xla_cpu_experimental_ynn_fusion_type": ""}``, which keeps XLA:CPU
            from handing whole convolution graphs to YNNPACK; an unknown option
            or value is a ``ValueError`` here, before any compile of the model.

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

        Any function of pytrees (here a dict in, a tuple out):

        >>> from jaxopt_serve.model import Model
        >>> f = lambda w, x: (x["a"] @ w, (x["a"] @ w).argmax(-1))
        >>> m = Model.function(f, np.eye(3, dtype=np.float32), {"a": np.zeros((1, 3), np.float32)})
        >>> logits, ids = InferenceEngine(m, max_batch=4)({"a": np.eye(3, dtype=np.float32)[[2, 0]]})
        >>> logits.dtype, ids.dtype, ids.tolist()
        (dtype('float32'), dtype('int32'), [2, 0])
    """

    def __init__(
        self,
        model: Model | ModelConfig | None = None,
        variables: Variables | None = None,
        *,
        example: Any = None,
        input_shape: Sequence[int] | None = None,
        input_dtype: Any = None,
        max_batch: int = 256,
        buckets: Sequence[int] | None = None,
        length_buckets: Sequence[int] | None = None,
        length_axes: Any = None,
        output_length_axes: Any = None,
        dtype: Literal["float32", "bfloat16"] = "float32",
        quant_mode: str = "auto",
        mesh: Mesh | None = None,
        rules: Sequence[ShardingRule] | Literal["auto"] = (),
        donate: bool | Literal["auto"] = "auto",
        nan_policy: NanPolicy = "propagate",
        predict: Callable[..., Any] | None = None,
        compiler_options: Mapping[str, str | bool | int | float] | None = None,
    ) -> None:
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        self.compiler_options = _checked_compiler_options(compiler_options)
        check_policy(nan_policy)
        self.model, variables, self.example, base = self._resolve(
            model,
            variables,
            example=example,
            input_shape=input_shape,
            input_dtype=input_dtype,
            quant_mode=quant_mode,
            predict=predict,
        )
        self.config = self.model.config if self.model is not None else None
        self.name = self.model.name if self.model is not None else getattr(predict, "__name__", "predict")
        self.num_inputs = len(self.example)
        single = self.num_inputs == 1 and isinstance(self.example[0], np.ndarray)
        # the one-array view older callers use (the HTTP endpoint, the CLI); None for pytree inputs
        self.input_shape = tuple(self.example[0].shape[1:]) if single else None
        self.input_dtype = self.example[0].dtype if single else None
        self._single_array = single

        self.mesh = mesh
        data_size = mesh.shape[DATA] if mesh is not None else 1
        self.buckets = tuple(sorted(set(buckets))) if buckets is not None else default_buckets(max_batch, data_size)
        if any(b <= 0 or b % data_size for b in self.buckets):
            raise ValueError(f"buckets {self.buckets} must be positive multiples of the mesh's data axis ({data_size})")
        self.max_batch = self.buckets[-1]
        self._init_lengths(length_buckets, length_axes, output_length_axes)
        self.dtype = dtype
        self.nan_policy = nan_policy
        self.quantized = has_qarrays(variables)
        split_weights = mesh is not None and mesh.shape.get(MODEL, 1) > 1
        if (
            self.quantized
            and quant_mode != "weight_only"
            and jax.default_backend() == "cpu"
            and predict is None
            and not split_weights
        ):
            # int8 kernels packed once for the native CPU kernels (a model-parallel mesh keeps the split layout);
            # those of more than two axes (DenseGeneral's) as the model contracts them
            contractions = (
                leading_contractions(self.model, variables, *self.example) if self.model is not None else None
            )
            variables = serving_layout(variables, contractions)
        compute = jnp.bfloat16 if dtype == "bfloat16" else None

        def cast(tree: Any, to: Any) -> Any:
            return jax.tree.map(lambda a: a.astype(to) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)

        def run(variables: Variables, inputs: tuple[Any, ...]) -> Any:
            if compute is not None:
                variables, inputs = cast(variables, compute), cast(inputs, compute)
            return cast(base(variables, *inputs), jnp.float32)

        if donate == "auto":
            donate = jax.default_backend() != "cpu"
        self._jitted = jax.jit(run, donate_argnums=(1,) if donate else ())
        if isinstance(rules, str):
            if rules != "auto":
                raise ValueError(f"rules must be a sequence of ShardingRule or 'auto', got {rules!r}")
            if self.model is None or mesh is None:
                raise ValueError("rules='auto' needs a model and a mesh (mesh=make_mesh(...))")
            from jaxopt_serve.engine.sharding import model_parallel_rules

            size = mesh.shape[MODEL]
            rules = model_parallel_rules(self.model.with_variables(variables), size=size) if size > 1 else []
        if mesh is not None:
            self.variables = shard_variables(variables, mesh, rules)
            self._input_sharding = NamedSharding(mesh, P(DATA))
        else:
            if rules:
                raise ValueError("sharding rules need a mesh (mesh=make_mesh(...))")
            self.variables = jax.device_put(dict(variables))
            self._input_sharding = None
        self._compiled: dict[tuple[int, int | None], Any] = {}
        self._lock = threading.Lock()
        self.compile_count = 0

    @staticmethod
    def _resolve(
        model: Any, variables: Any, *, example: Any, input_shape: Any, input_dtype: Any, quant_mode: str, predict: Any
    ) -> tuple[Model | None, Any, tuple[Any, ...], Callable[..., Any]]:
        """``(Model or None, variables, example inputs, inference function)`` from the constructor's arguments."""
        if model is None:
            if predict is None:
                raise ValueError(
                    "InferenceEngine needs a model: a Model (Model.linen / Model.nnx / Model.function), a ModelConfig "
                    "with its variables, or predict=f(variables, *inputs) with example= or input_shape="
                )
            if variables is None:
                raise ValueError(
                    "predict= without a model needs the variables it runs on: "
                    "InferenceEngine(None, variables, predict=...)"
                )
            return None, variables, _example_of(example, input_shape, input_dtype), predict
        if example is not None or input_dtype is not None:
            raise ValueError(
                "example= and input_dtype= are for predict= without a model; a Model or ModelConfig knows its inputs"
            )
        if isinstance(model, Model):
            if input_shape is not None:
                raise ValueError("input_shape= is for a ModelConfig; a Model carries its example inputs")
            variables = model.variables if variables is None else variables
        elif isinstance(model, ModelConfig) and variables is None:
            raise ValueError(f"a {type(model).__name__} needs its variables: InferenceEngine(config, variables)")
        handle = as_model(model, variables, input_shape=input_shape)
        base = predict if predict is not None else inference_fn(model, variables, mode=quant_mode)
        return handle, variables, handle.example, base

    def _init_lengths(self, length_buckets: Any, length_axes: Any, output_length_axes: Any) -> None:
        if (length_buckets is None) != (length_axes is None):
            raise ValueError(
                "length_buckets= and length_axes= go together: the sizes, and which axis of which input leaf"
            )
        if output_length_axes is not None and length_buckets is None:
            raise ValueError("output_length_axes= needs length_buckets= and length_axes=")
        self.length_buckets: tuple[int, ...] | None = None
        self._length_axes: list[int | None] = [None] * len(jax.tree.leaves(self.example))
        self.length_axes, self.output_length_axes = length_axes, output_length_axes
        if length_buckets is None:
            return
        self.length_buckets = tuple(sorted({int(b) for b in length_buckets}))
        if not self.length_buckets or self.length_buckets[0] <= 0:
            raise ValueError(f"length_buckets must be positive sizes, got {tuple(length_buckets)}")
        self._length_axes = axes_per_leaf(self._as_inputs(length_axes, what="length_axes"), self.example)
        for name, leaf, axis in zip(leaf_names(self.example), jax.tree.leaves(self.example), self._length_axes):
            if axis is not None and axis >= leaf.ndim:
                raise ValueError(
                    f"length_axes: {name} has shape (batch, {', '.join(map(str, leaf.shape[1:]))}), no axis {axis}"
                )
        if all(axis is None for axis in self._length_axes):
            raise ValueError(f"length_axes {length_axes!r} selects no input leaf")

    def _as_inputs(self, tree: Any, *, what: str) -> tuple[Any, ...]:
        """A tree in the calling convention (one input, or a tuple of them) as the tuple of positional inputs."""
        if self.num_inputs == 1:
            return (tree,)
        if isinstance(tree, (tuple, list)) and len(tree) == self.num_inputs:
            return tuple(tree)
        if isinstance(tree, int) or tree is None:
            return (tree,) * self.num_inputs
        raise ValueError(f"{what} for a model with {self.num_inputs} inputs must be a tuple with one entry per input")

    # -- compilation ---------------------------------------------------------------------------

    def _spec(self, bucket: int, length: int | None) -> tuple[Any, ...]:
        leaves, treedef = jax.tree.flatten(self.example)
        specs = []
        for leaf, axis in zip(leaves, self._length_axes):
            shape = [bucket, *leaf.shape[1:]]
            if axis is not None:
                shape[axis] = length
            specs.append(jax.ShapeDtypeStruct(tuple(shape), leaf.dtype, sharding=self._input_sharding))
        return jax.tree.unflatten(treedef, specs)

    def _executable(self, bucket: int, length: int | None = None) -> Any:
        with self._lock:
            exe = self._compiled.get((bucket, length))
            if exe is None:
                exe = self._jitted.lower(self.variables, self._spec(bucket, length)).compile(
                    self.compiler_options or None
                )
                self._compiled[(bucket, length)] = exe
                self.compile_count += 1
            return exe

    def warmup(self) -> InferenceEngine:
        """Compile every bucket now (after this, no request size up to the limits compiles)."""
        for length in self.length_buckets or (None,):
            for bucket in self.buckets:
                self._executable(bucket, length)
        return self

    # -- inputs ----------------------------------------------------------------------------------

    def inputs_of(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The positional inputs of a call: ``(x,)``, ``(a, b)``, or ``((a, b),)`` unpacked for a multi-input model."""
        if len(args) == 1 and self.num_inputs > 1 and isinstance(args[0], tuple) and len(args[0]) == self.num_inputs:
            return args[0]
        return tuple(args)

    def pack(self, inputs: tuple[Any, ...]) -> Any:
        """The positional inputs as one request: the input itself, or a tuple of several."""
        return inputs[0] if self.num_inputs == 1 else tuple(inputs)

    def check_inputs(self, *args: Any) -> tuple[Any, ...]:
        """The inputs as numpy arrays of the example's dtypes, or ``ValueError`` naming the leaf (before dispatch)."""
        return self._check(self.inputs_of(args))[0]

    def check_input(self, x: Any) -> Any:
        """One request (``x``, or a tuple of inputs for a multi-input model) checked: see ``check_inputs``."""
        return self.pack(self._check(self.inputs_of((x,)))[0])

    def _check(self, inputs: tuple[Any, ...]) -> tuple[tuple[Any, ...], int | None]:
        if self._single_array and len(inputs) == 1:
            x = self._check_single_array(inputs[0])
            if self.length_buckets is None and x.dtype == self.example[0].dtype and x.shape[0] > 0:
                # the common request (one array, the model's dtype): nothing left for the generic check
                if self.nan_policy == "error":
                    self._check_finite((x,))
                return (x,), None
        example, length = self.example, None
        if self.length_buckets is not None:
            length = self._length_of(inputs)
            example = self._spec(1, length)
        inputs = check_inputs(example, inputs, name=self.name)
        if self.nan_policy == "error":
            self._check_finite(inputs)
        return inputs, length

    def _shape_text(self, leaf: Any, axis: int | None) -> str:
        dims = ["batch", *map(str, leaf.shape[1:])]
        if axis is not None:
            dims[axis] = "length"
        return f"({', '.join(dims)})"

    def _check_single_array(self, x: Any) -> np.ndarray:
        """``x`` as an array, checked with the one-array engine's messages: shape and dtype for the model by name."""
        x, ex, axis = np.asarray(x), self.example[0], self._length_axes[0]
        same = (
            x.dtype != object
            and x.ndim == ex.ndim
            and all(d == e for i, (d, e) in enumerate(zip(x.shape[1:], ex.shape[1:]), 1) if i != axis)
        )
        if not same:
            raise ValueError(
                f"expected a batch of shape {self._shape_text(ex, axis)} for {self.name!r}, "
                f"got {x.shape}{' of objects' if x.dtype == object else ''}"
            )
        if x.dtype == ex.dtype:  # the common case, without the kind comparison below
            return x
        kinds = [np.issubdtype(d, k) for d in (x.dtype, ex.dtype) for k in (np.floating, np.bool_, np.integer)]
        if kinds[:3] != kinds[3:]:
            raise ValueError(f"expected {ex.dtype} inputs for {self.name!r}, got {x.dtype}")
        return x

    def _length_of(self, inputs: tuple[Any, ...]) -> int:
        """The one length shared by every leaf with a length axis (``ValueError`` naming the leaf otherwise)."""
        try:
            leaves = jax.tree.structure(self.example).flatten_up_to(inputs)
        except (ValueError, TypeError):
            check_inputs(self.example, inputs, name=self.name)  # raises the structure error
            raise
        length, first = None, None
        for name, leaf, ex, axis in zip(
            leaf_names(self.example), leaves, jax.tree.leaves(self.example), self._length_axes
        ):
            if axis is None:
                continue
            shape = np.shape(leaf)
            if len(shape) != ex.ndim:
                raise ValueError(f"{name}: expected shape {self._shape_text(ex, axis)}, got {shape}")
            if length is None:
                length, first = shape[axis], name
            elif shape[axis] != length:
                raise ValueError(f"{name}: length {shape[axis]} (axis {axis}) differs from {first}'s length {length}")
        if length == 0:
            raise ValueError(f"{first}: empty sequences (length 0)")
        if length > self.length_buckets[-1]:
            raise ValueError(f"{first}: length {length} exceeds the largest length bucket {self.length_buckets[-1]}")
        return int(length)

    def _check_finite(self, inputs: tuple[Any, ...]) -> None:
        for name, x in zip(leaf_names(inputs), jax.tree.leaves(inputs)):
            if np.issubdtype(x.dtype, np.floating):
                bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
                if bad.any():
                    rows = np.flatnonzero(bad)[:10].tolist()
                    where = "" if self._single_array else f" of {name}"
                    raise ValueError(f"non-finite inputs (NaN or inf) in rows {rows}{where}")

    # -- buckets ---------------------------------------------------------------------------------

    def bucket_for(self, n: int) -> int:
        """The smallest bucket that holds ``n`` examples (``n`` <= ``max_batch``)."""
        for bucket in self.buckets:
            if bucket >= n:
                return bucket
        raise ValueError(f"{n} examples exceed the largest bucket {self.max_batch}")

    def length_bucket_for(self, length: int) -> int:
        """The smallest length bucket that holds ``length`` (with ``length_buckets``)."""
        if self.length_buckets is None:
            raise ValueError("this engine has no length buckets (length_buckets=...)")
        for bucket in self.length_buckets:
            if bucket >= length:
                return bucket
        raise ValueError(f"length {length} exceeds the largest length bucket {self.length_buckets[-1]}")

    # -- requests of several lengths (the dynamic batcher) ---------------------------------------

    def request_length(self, request: Any) -> int | None:
        """The length of a checked request (``check_input``'s result); ``None`` without length buckets."""
        if self.length_buckets is None:
            return None
        return self._length_of(self.inputs_of((request,)))

    def pad_request(self, request: Any, length: int) -> Any:
        """A checked request zero-padded along its length axes to ``length``."""
        return self.pack(pad_axes(self.inputs_of((request,)), self._length_axes, length))

    def cut_outputs(self, outputs: Any, length: int) -> Any:
        """Outputs cut back to ``length`` along ``output_length_axes`` (unchanged without them)."""
        if self.output_length_axes is None:
            return outputs
        return cut_axes(outputs, axes_per_leaf(self.output_length_axes, outputs, what="output_length_axes"), length)

    # -- inference -------------------------------------------------------------------------------

    def __call__(self, *args: Any) -> Any:
        """Outputs for the batch (numpy pytrees in, numpy pytrees out): ``engine(x)``, ``engine(a, b)``."""
        inputs, length = self._check(self.inputs_of(args))
        # "propagate": run as zero rows, their float outputs set to NaN below ("error": _check refused them)
        bad = nonfinite_rows(inputs) if self.nan_policy == "propagate" else None
        if bad is not None:
            inputs = replace_rows(inputs, bad)
        padded_length = None
        if length is not None:
            padded_length = self.length_bucket_for(length)
            inputs = pad_axes(inputs, self._length_axes, padded_length)
        total = batch_rows(inputs)
        outputs = []
        for start in range(0, total, self.max_batch):
            chunk = take_rows(inputs, start, start + self.max_batch, root="inputs")
            n = batch_rows(chunk)
            bucket = self.bucket_for(n)
            exe = self._executable(bucket, padded_length)
            if bad is not None:
                check_markable(jax.tree.map(lambda o: o.dtype, exe.out_info), bad)  # before dispatch
            chunk = pad_rows(chunk, bucket)
            if self._input_sharding is not None:  # also right with several processes: each places its own shards
                chunk = jax.tree.map(
                    lambda c: jax.make_array_from_callback(c.shape, self._input_sharding, lambda idx, c=c: c[idx]),
                    chunk,
                )
            out = jax.tree.map(_to_host, exe(self.variables, chunk))
            outputs.append(take_rows(out, 0, n))
        out = concat_rows(outputs)
        if bad is not None:
            out = mark_rows(out, bad)
        return self.cut_outputs(out, length) if length is not None else out


def _to_host(out: jax.Array) -> np.ndarray:
    if not out.is_fully_addressable:
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)
    return np.asarray(out)
