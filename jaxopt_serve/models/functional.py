"""One functional interface over Linen and NNX models.

Every chapter (training, quantization, pruning, the engine) works on
``(config, variables)``: ``variables`` is a plain nested dict of arrays with a
``"params"`` collection and, for models with batch norm, ``"batch_stats"``.
For Linen that is the usual variable dict; for NNX it is the pure-dict form of
the module's state, so both kinds look the same to the rest of the library.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_serve.model import _deep_update, nnx_state_to_variables, plain as _plain
from jaxopt_serve.models.config import ModelConfig

Variables = dict[str, Any]


class ApplyFn(Protocol):
    """``apply(variables, x, *, train=False, rng=None) -> (outputs, updated_state)``.

    ``updated_state`` holds the non-param collections that changed (e.g. the
    new ``batch_stats`` after a training step); it is ``{}`` when nothing did.
    """

    def __call__(
        self, variables: Variables, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None
    ) -> tuple[jax.Array, Variables]: ...


def example_input(config: ModelConfig, batch_size: int = 1, input_shape: tuple[int, ...] | None = None) -> jax.Array:
    """Zeros shaped like a batch of inputs for ``config`` (int32 tokens for the Transformer)."""
    shape = tuple(input_shape) if input_shape is not None else config.example_shape()
    return jnp.zeros((batch_size, *shape), dtype=config.input_dtype)


def init_variables(config: ModelConfig, rng: jax.Array | int, input_shape: tuple[int, ...] | None = None) -> Variables:
    """Initialize a model's variables as a plain nested dict.

    Example:
        >>> from jaxopt_serve.models import CNNConfig, init_variables
        >>> variables = init_variables(CNNConfig(channels=(4,), hidden=0), 0)
        >>> sorted(variables), variables["params"]["conv_0"]["kernel"].shape
        (['batch_stats', 'params'], (3, 3, 1, 4))
    """
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    if config.framework == "nnx":
        return nnx_variables(config.build(rngs=nnx.Rngs(key)))
    x = example_input(config, 1, input_shape)
    params_key, dropout_key = jax.random.split(key)
    try:
        init = _cached_init(config)
    except TypeError:  # an unhashable config: compiled for this call only
        init = _compiled_init(config)
    variables = init({"params": params_key, "dropout": dropout_key}, x)
    return {name: _plain(tree) for name, tree in variables.items() if name != "intermediates"}


def _compiled_init(config: ModelConfig) -> Callable[..., Any]:
    """The Linen module's ``init`` as one compiled program (eagerly, each layer's operations compile on their own)."""
    return jax.jit(functools.partial(config.build().init, train=False))


_cached_init = functools.lru_cache(maxsize=64)(_compiled_init)


def make_apply(config: ModelConfig) -> ApplyFn:
    """The pure apply function of ``config``'s model; see ``ApplyFn``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_serve.models import MLPConfig, init_variables, make_apply
        >>> cfg = MLPConfig(features=(8,), num_classes=4)
        >>> logits, _ = make_apply(cfg)(init_variables(cfg, 0), jnp.ones((5, 8, 8, 1)))
        >>> logits.shape
        (5, 4)
    """
    if config.framework == "nnx":
        return _nnx_apply(config)
    module = config.build()

    def apply(variables: Variables, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None):
        if not train:
            return module.apply(variables, x, train=False), {}
        rngs = {"dropout": rng} if rng is not None else {}
        mutable = [name for name in variables if name != "params"]
        out, updates = module.apply(variables, x, train=True, rngs=rngs, mutable=mutable)
        return out, {name: _plain(tree) for name, tree in updates.items()}

    return apply


def predict_fn(config: ModelConfig) -> Callable[[Variables, jax.Array], jax.Array]:
    """``f(variables, x) -> outputs`` in inference mode, ready for ``jax.jit``."""
    apply = make_apply(config)

    def predict(variables: Variables, x: jax.Array) -> jax.Array:
        return apply(variables, x, train=False)[0]

    return predict


def nnx_variables(model: nnx.Module) -> Variables:
    """An NNX module's state as ``{"params": pure dict, "state": everything else}`` (see ``Model.nnx``)."""
    return nnx_state_to_variables(nnx.state(model))


def nnx_module(config: ModelConfig, variables: Variables) -> nnx.Module:
    """Rebuild an NNX module of ``config`` holding ``variables``."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: config.build(rngs=nnx.Rngs(0))))
    pure = dict(variables.get("state", {}))
    _deep_update(pure, variables["params"])
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _nnx_apply(config: ModelConfig) -> ApplyFn:
    def apply(variables: Variables, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None):
        del rng
        return nnx_module(config, variables)(x, train=train), {}

    return apply


def count_params(variables: Variables) -> int:
    """Number of scalars in the ``params`` collection."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(variables["params"])))
