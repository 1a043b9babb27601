"""The model handle: any Flax Linen module, Flax NNX module or plain JAX function, as one pure function.

Every chapter of jaxopt_serve works on a ``Model``: an inference function
``model(variables, *inputs) -> outputs``, the ``variables`` it was built with
(a plain nested dict with a ``"params"`` collection) and example inputs that
tell the library the shapes and dtypes of one batch. Inputs and outputs are
arbitrary pytrees of arrays (a dict of ``input_ids`` and ``attention_mask``, a
tuple of logits and an embedding); axis 0 of every input leaf is the batch.

Build one from what you have::

    Model.linen(module, variables, x)                         # any nn.Module
    Model.linen(module, variables, x, eval_kwargs={"train": False},
                train_kwargs={"train": True})                 # flags are yours to name
    Model.nnx(module, x)                                      # any nnx.Module
    Model.function(f, params, x)                              # f(params, x), no Flax at all

Training-mode flags (``train=``, ``deterministic=``, ``use_running_average=``)
are passed only when you name them: a module without them works unchanged.
NNX modules are switched with ``module.eval()`` / ``module.train()``, and their
non-parameter state (BatchNorm statistics, RNG streams for dropout) flows out of
every training step.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> class Net(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))
    >>> x = jnp.ones((2, 8))
    >>> net = Net()
    >>> model = Model.linen(net, net.init(jax.random.key(0), x), x)
    >>> model(model.variables, x).shape
    (2, 3)
    >>> model.input_spec()
    (ShapeDtypeStruct(shape=(8,), dtype=float32),)
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Variables = dict[str, Any]
Kind = Literal["linen", "nnx", "function", "config"]

# Collections the library adds to a variables dict (quantization metadata): never passed to the model.
LIBRARY_COLLECTIONS = ("quant_act", "quant_smooth", "quant_asym")


@dataclasses.dataclass(frozen=True, eq=False)
class ModelSource:
    """What a Flax ``Model`` was built from: the module and its call options.

    ``Model.linen`` and ``Model.nnx`` record it as ``Model.source``, so code
    that needs the module itself (structured pruning rebuilds it at smaller
    sizes) reads it here instead of reaching into the model's functions.

    Attributes:
        module: the ``flax.linen.Module``, or for NNX the module as it was passed.
        method: the Linen method that runs (``None``: ``__call__``).
        eval_kwargs: keyword arguments of inference calls.
        train_kwargs: keyword arguments of training steps.
        rng_names: Linen RNG streams a training step gets.
        rebuild: NNX only: ``rebuild(variables)`` returns a new module holding ``variables``.
    """

    module: Any
    method: str | Callable[..., Any] | None = None
    eval_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rng_names: tuple[str, ...] = ("dropout",)
    rebuild: Callable[[Variables], Any] | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        # read-only copies: a caller's later change to its dicts does not change the recorded options
        object.__setattr__(self, "eval_kwargs", types.MappingProxyType(dict(self.eval_kwargs)))
        object.__setattr__(self, "train_kwargs", types.MappingProxyType(dict(self.train_kwargs)))


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model as pure functions of ``(variables, *inputs)``; build it with ``Model.linen/nnx/function``.

    Attributes:
        variables: the variables the model was built with (``{"params": ..., <other collections>}``).
        example: example inputs, one pytree per positional argument; axis 0 of every leaf is the batch.
        kind: ``"linen"``, ``"nnx"``, ``"function"`` or ``"config"`` (a reference model).
        name: a label for messages and artifacts.
        config: the ``ModelConfig`` of a reference model, else ``None``.
        source: the module and call options of a Linen or NNX model (``ModelSource``), else ``None``.
    """

    apply_fn: Callable[..., Any] = dataclasses.field(repr=False)
    train_fn: Callable[..., Any] | None = dataclasses.field(repr=False)
    variables: Variables = dataclasses.field(repr=False)
    example: tuple[Any, ...] = dataclasses.field(repr=False)
    kind: Kind = "function"
    name: str = "model"
    config: Any = None
    source: ModelSource | None = dataclasses.field(default=None, repr=False)

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def linen(
        cls,
        module: Any,
        variables: Mapping[str, Any],
        *example: Any,
        method: str | Callable[..., Any] | None = None,
        eval_kwargs: Mapping[str, Any] | None = None,
        train_kwargs: Mapping[str, Any] | None = None,
        rng_names: Sequence[str] = ("dropout",),
        name: str | None = None,
    ) -> Model:
        """A Flax Linen module with its variables (the output of ``module.init``).

        Args:
            module: the ``flax.linen.Module``.
            variables: ``{"params": ..., "batch_stats": ...}``.
            *example: one example batch per positional input.
            method: the method to run (default ``__call__``).
            eval_kwargs: keyword arguments for inference, e.g. ``{"train": False}``.
            train_kwargs: keyword arguments for training steps, e.g. ``{"train": True}``.
            rng_names: RNG streams a training step gets (split from the step's key).
            name: a label (default: the module's class name).
        """
        import flax.linen as nn

        if not isinstance(module, nn.Module):
            raise TypeError(f"Model.linen expects a flax.linen.Module, got {type(module).__name__}")
        variables = _check_variables(variables, "Model.linen")
        eval_kwargs, train_kwargs = dict(eval_kwargs or {}), dict(train_kwargs or {})

        def apply(variables: Variables, *inputs: Any) -> Any:
            return module.apply(_model_vars(variables), *inputs, method=method, **eval_kwargs)

        def train(variables: Variables, *inputs: Any, rng: jax.Array | None = None) -> tuple[Any, Variables]:
            vars_ = _model_vars(variables)
            mutable = [k for k in vars_ if k != "params"]
            rngs = {}
            if rng is not None:
                rngs = {n: jax.random.fold_in(rng, i) for i, n in enumerate(rng_names)}
            out, updates = module.apply(vars_, *inputs, method=method, rngs=rngs, mutable=mutable, **train_kwargs)
            return out, plain(updates)

        source = ModelSource(module, method, eval_kwargs, train_kwargs, tuple(rng_names))
        example = _check_example(example)
        return _validated(cls(apply, train, variables, example, "linen", name or type(module).__name__, source=source))

    @classmethod
    def nnx(
        cls,
        module: Any,
        *example: Any,
        eval_kwargs: Mapping[str, Any] | None = None,
        train_kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> Model:
        """A Flax NNX module: its ``nnx.Param`` s become ``variables["params"]``, all other state
        ``variables["state"]``.

        Inference runs the module after ``module.eval()``, training steps after
        ``module.train()``; a training step returns the new ``"state"``
        (BatchNorm statistics, RNG counters), so dropout draws fresh masks.
        """
        from flax import nnx

        if not isinstance(module, nnx.Module):
            raise TypeError(f"Model.nnx expects a flax.nnx.Module, got {type(module).__name__}")
        graphdef, state = nnx.split(module)
        template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), state)
        variables = nnx_state_to_variables(state)
        eval_kwargs, train_kwargs = dict(eval_kwargs or {}), dict(train_kwargs or {})

        def rebuild(variables: Variables) -> Any:
            fresh = jax.tree.map(lambda a: a, template)
            # numpy leaves become jax arrays: NNX must never write into (or fail on) the caller's buffers
            owned = jax.tree.map(
                lambda a: jnp.asarray(a) if isinstance(a, np.ndarray) else a,
                {"state": variables.get("state", {}), "params": variables["params"]},
            )
            pure = dict(plain(owned["state"]))
            _deep_update(pure, owned["params"])
            nnx.replace_by_pure_dict(fresh, pure)
            return nnx.merge(graphdef, fresh)

        def apply(variables: Variables, *inputs: Any) -> Any:
            m = rebuild(variables)
            m.eval()
            return m(*inputs, **eval_kwargs)

        def train(variables: Variables, *inputs: Any, rng: jax.Array | None = None) -> tuple[Any, Variables]:
            m = rebuild(variables)
            m.train()
            if rng is not None:
                _reseed(m, rng)
            out = m(*inputs, **train_kwargs)
            rest = nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))
            return out, ({"state": plain(rest)} if jax.tree.leaves(rest) else {})

        source = ModelSource(module, None, eval_kwargs, train_kwargs, rebuild=rebuild)
        example = _check_example(example)
        return _validated(cls(apply, train, variables, example, "nnx", name or type(module).__name__, source=source))

    @classmethod
    def function(
        cls,
        fn: Callable[..., Any],
        variables: Any,
        *example: Any,
        train_fn: Callable[..., Any] | None = None,
        name: str | None = None,
    ) -> Model:
        """A plain function ``fn(variables, *inputs) -> outputs``.

        ``variables`` is any pytree of arrays. When it is not already a dict with
        a ``"params"`` key it is stored as ``{"params": variables}`` and handed to
        ``fn`` unwrapped, so ``fn(params, x)`` works as written.

        Args:
            fn: the inference function.
            variables: its parameters (any pytree).
            *example: one example batch per positional input.
            train_fn: ``train_fn(variables, *inputs, rng=None) -> (outputs, state updates)``
                for training steps (default: ``fn`` with no state updates).
            name: a label (default: the function's name).
        """
        wrapped = not (isinstance(variables, Mapping) and "params" in variables)
        stored = {"params": variables} if wrapped else _check_variables(variables, "Model.function")
        unwrap = (lambda v: v["params"]) if wrapped else _model_vars

        def apply(variables: Variables, *inputs: Any) -> Any:
            return fn(unwrap(variables), *inputs)

        def train(variables: Variables, *inputs: Any, rng: jax.Array | None = None) -> tuple[Any, Variables]:
            if train_fn is None:
                return fn(unwrap(variables), *inputs), {}
            return train_fn(unwrap(variables), *inputs, rng=rng)

        return _validated(
            cls(apply, train, stored, _check_example(example), "function", name or getattr(fn, "__name__", "model"))
        )

    @classmethod
    def from_config(
        cls, config: Any, variables: Variables, *, input_shape: Sequence[int] | None = None, batch_size: int = 1
    ) -> Model:
        """A reference model (``jaxopt_serve.models``) from its config, with zeros as the example batch."""
        from jaxopt_serve.models.functional import make_apply

        apply_cfg = make_apply(config)

        def apply(variables: Variables, x: Any) -> Any:
            return apply_cfg(_model_vars(variables), x, train=False)[0]

        def train(variables: Variables, x: Any, rng: jax.Array | None = None) -> tuple[Any, Variables]:
            return apply_cfg(_model_vars(variables), x, train=True, rng=rng)

        shape = tuple(input_shape) if input_shape is not None else tuple(config.example_shape())
        example = (np.zeros((batch_size, *shape), config.input_dtype),)
        return cls(apply, train, dict(variables), example, "config", config.name, config)

    # -- use --------------------------------------------------------------------------------------

    def __call__(self, variables: Variables, *inputs: Any) -> Any:
        """Inference: the outputs for ``inputs`` (pure; wrap in ``jax.jit``)."""
        return self.apply_fn(variables, *inputs)

    def train_step_apply(
        self, variables: Variables, *inputs: Any, rng: jax.Array | None = None
    ) -> tuple[Any, Variables]:
        """Training mode: ``(outputs, updated non-param collections)`` (``{}`` when nothing changed)."""
        if self.train_fn is None:
            return self.apply_fn(variables, *inputs), {}
        return self.train_fn(variables, *inputs, rng=rng)

    def apply_with_mode(
        self, variables: Variables, x: Any, *, train: bool = False, rng: jax.Array | None = None
    ) -> tuple[Any, Variables]:
        """The training loop's interface, ``(outputs, state updates)``, for a model with one positional input.

        ``x`` may be any pytree (a dict of arrays, a tuple); a model with several
        positional inputs takes them as a tuple here.
        """
        inputs = tuple(x) if len(self.example) > 1 else (x,)
        if train:
            return self.train_step_apply(variables, *inputs, rng=rng)
        return self.apply_fn(variables, *inputs), {}

    def with_variables(self, variables: Variables) -> Model:
        """The same model holding other variables (e.g. pruned or fine-tuned ones)."""
        return dataclasses.replace(self, variables=dict(variables))

    def nnx_module(self, variables: Variables | None = None) -> Any:
        """An NNX model: the module rebuilt holding ``variables`` (default: the model's own)."""
        if self.kind != "nnx":
            raise ValueError(f"{self.name} is a {self.kind} model, not an NNX module")
        if self.source is None or self.source.rebuild is None:
            raise ValueError(
                f"{self.name} does not record how to rebuild its NNX module (Model.source); build it with Model.nnx"
            )
        return self.source.rebuild(self.variables if variables is None else variables)

    @property
    def batch_size(self) -> int:
        """The example's batch size."""
        return int(jax.tree.leaves(self.example)[0].shape[0])

    def input_spec(self) -> tuple[Any, ...]:
        """One example's shapes and dtypes (no batch axis), one pytree per positional input."""
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(tuple(a.shape[1:]), a.dtype), self.example)

    def batch_spec(self, batch: int | Any) -> tuple[Any, ...]:
        """``ShapeDtypeStruct`` s of a batch of ``batch`` examples (an int or a symbolic dimension)."""
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype), self.example)

    def check_inputs(self, inputs: Sequence[Any], *, cast: bool = True) -> tuple[Any, ...]:
        """``inputs`` as numpy arrays, checked against the example; ``ValueError`` naming the leaf otherwise.

        Structure, trailing shapes and the kind of dtype (float / integer / bool)
        must match the example; one batch size must hold for every leaf. Leaves of the
        same kind but another width are cast to the example's dtype.
        """
        return check_inputs(self.example, tuple(inputs), cast=cast, name=self.name)

    def outputs_spec(self, batch: int = 2) -> Any:
        """Shapes and dtypes of the outputs for a batch of ``batch`` (traced, not run)."""
        return jax.eval_shape(self.apply_fn, self.variables, *self.batch_spec(batch))


def _validated(model: Model) -> Model:
    """``model`` after one abstract call on its example (nothing runs); a failure keeps its own message.

    The exception the model raises is re-raised as it is, with a note saying
    where it came from and how training flags are passed.
    """
    try:
        jax.eval_shape(model.apply_fn, model.variables, *model.batch_spec(model.batch_size))
    except Exception as err:
        err.add_note(
            f"jaxopt_serve: calling the {model.kind} model {model.name!r} on its example inputs failed. If it needs "
            f"training-mode flags, name them: eval_kwargs={{'train': False}} (or 'deterministic': True, "
            f"'use_running_average': True) and train_kwargs={{'train': True}}."
        )
        raise
    return model


def as_model(model: Any, variables: Variables | None = None, *, input_shape: Sequence[int] | None = None) -> Model:
    """``model`` as a ``Model``: a ``Model`` as it is, a reference ``ModelConfig`` wrapped with ``variables``."""
    if isinstance(model, Model):
        return model
    from jaxopt_serve.models.config import ModelConfig

    if isinstance(model, ModelConfig):
        if variables is None:
            raise ValueError(f"a {type(model).__name__} needs its variables to make a Model")
        return Model.from_config(model, variables, input_shape=input_shape)
    raise TypeError(
        f"expected a jaxopt_serve Model (Model.linen / Model.nnx / Model.function) or a ModelConfig, "
        f"got {type(model).__name__}"
    )


def check_inputs(
    example: tuple[Any, ...], inputs: tuple[Any, ...], *, cast: bool = True, name: str = "model"
) -> tuple[Any, ...]:
    """Check a batch of ``inputs`` against ``example`` (see ``Model.check_inputs``)."""
    if len(inputs) != len(example):
        raise ValueError(f"{name} takes {len(example)} positional input(s), got {len(inputs)}")
    ex_leaves, ex_tree = jax.tree_util.tree_flatten_with_path(example)
    try:
        in_leaves = ex_tree.flatten_up_to(inputs)
    except (ValueError, TypeError) as err:
        got = jax.tree.structure(inputs)
        raise ValueError(
            f"inputs of {name} do not have the example's structure: expected {ex_tree}, got {got}"
        ) from err
    out, batch = [], None
    for (path, ex), x in zip(ex_leaves, in_leaves):
        where = "inputs" + jax.tree_util.keystr(path)
        x = np.asarray(x)
        if x.dtype == object:
            raise ValueError(f"{where}: expected an array of {ex.dtype}, got objects")
        if x.ndim != np.ndim(ex) or tuple(x.shape[1:]) != tuple(ex.shape[1:]):
            raise ValueError(f"{where}: expected shape (batch, {', '.join(map(str, ex.shape[1:]))}), got {x.shape}")
        if batch is None:
            batch = x.shape[0]
        elif x.shape[0] != batch:
            raise ValueError(f"{where}: batch size {x.shape[0]} differs from the first input's {batch}")
        want = np.dtype(ex.dtype)
        if x.dtype != want:
            if _kind(x.dtype) != _kind(want) or not cast:
                raise ValueError(f"{where}: expected {want} values, got {x.dtype}")
            x = x.astype(want)
        out.append(x)
    if batch == 0:
        raise ValueError("empty batch: expected at least one example")
    return jax.tree.unflatten(ex_tree, out)


def _kind(dtype: np.dtype) -> str:
    if np.issubdtype(dtype, np.floating):
        return "float"
    if np.issubdtype(dtype, np.bool_):
        return "bool"
    if np.issubdtype(dtype, np.integer):
        return "int"
    return str(dtype)


def _check_example(example: tuple[Any, ...]) -> tuple[Any, ...]:
    if not example:
        raise ValueError("a Model needs example inputs (one batch per positional input) to know shapes and dtypes")
    leaves = jax.tree_util.tree_leaves_with_path(example)
    if not leaves:
        raise ValueError("the example inputs hold no arrays")
    batch = None
    for path, leaf in leaves:
        if not hasattr(leaf, "shape") or len(leaf.shape) == 0:
            raise ValueError(
                f"example inputs{jax.tree_util.keystr(path)}: every input leaf needs a batch axis, got {leaf!r}"
            )
        if batch is None:
            batch = leaf.shape[0]
        elif leaf.shape[0] != batch:
            raise ValueError(f"example inputs{jax.tree_util.keystr(path)}: batch {leaf.shape[0]} differs from {batch}")
    return tuple(jax.tree.map(np.asarray, example))


def _check_variables(variables: Any, where: str) -> Variables:
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"{where}: expected variables with a 'params' collection, got {got}")
    return {k: plain(v) for k, v in variables.items()}


def _model_vars(variables: Variables) -> Variables:
    return {k: v for k, v in variables.items() if k not in LIBRARY_COLLECTIONS}


def nnx_state_to_variables(state: Any) -> Variables:
    """An NNX ``State`` as ``{"params": pure dict, "state": pure dict of everything else}``."""
    from flax import nnx

    params = nnx.to_pure_dict(nnx.filter_state(state, nnx.Param))
    rest = nnx.to_pure_dict(nnx.filter_state(state, nnx.Not(nnx.Param)))
    variables: Variables = {"params": plain(params)}
    if jax.tree.leaves(rest):
        variables["state"] = plain(rest)
    return variables


def _reseed(module: Any, rng: jax.Array) -> None:
    from flax import nnx

    try:
        nnx.reseed(module, dropout=rng)
    except (ValueError, KeyError, AttributeError):
        pass  # no dropout stream: nothing to reseed


def plain(tree: Any) -> Any:
    """Nested plain dicts with string keys (Flax may hand back FrozenDicts or int-keyed NNX dicts)."""
    if isinstance(tree, Mapping):
        return {str(k): plain(v) for k, v in tree.items()}
    return tree


def _deep_update(target: dict, source: Mapping) -> None:
    for key, value in source.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), Mapping):
            _deep_update(target[key], value)
        else:
            target[key] = value
