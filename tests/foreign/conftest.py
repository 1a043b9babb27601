"""The foreign-model zoo, trained once per session on the digits.

``foreign_models`` maps each name in ``FOREIGN`` to a ``ForeignCase``: a
``jaxopt_serve.model.Model`` holding trained variables, a held-out batch in
the model's input structure, training examples, and how to read logits from
the outputs. The models live in ``models.py`` (no jaxopt_serve imports there);
training here goes through ``Model.train_step_apply`` only, so BatchNorm
statistics and NNX state (RNG counters) are updated the way a user's loop
would update them, and is independent of ``jaxopt_serve.train``.

This directory is a package (``__init__.py``) so that this ``conftest`` does
not shadow ``tests/conftest.py`` for test files that ``from conftest import``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_serve.data import load_digits
from jaxopt_serve.model import Model

from . import models

FOREIGN = ["resnet", "vit", "nnx_attn", "raw_params", "plain_fn", "multi_out"]

TRAIN_STEPS = 150
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
HELD_OUT = 64  # examples in ForeignCase.inputs
TRAIN_SUBSET = 256  # examples in ForeignCase.train_inputs
LOG_EVERY = 10
MASK_KEEP = 0.9  # fraction of ViT patches left visible


@dataclasses.dataclass(frozen=True, eq=False)
class ForeignCase:
    """One trained foreign model and its data.

    Attributes:
        model: the ``Model``, holding the trained variables.
        inputs: a held-out batch of ``HELD_OUT`` examples, in the model's input structure.
        labels: their int labels.
        train_inputs: ``TRAIN_SUBSET`` training examples (same structure).
        train_labels: their labels.
        is_classifier: whether ``logits_of(outputs)`` are class logits.
        logits_of: maps the model's output pytree to the logits array.
        test_inputs: the whole held-out split (``inputs`` is its head).
        test_labels: its labels.
        initial_variables: the variables before training.
        history: mean training loss over each ``LOG_EVERY`` steps.
        test_accuracy: accuracy on the whole held-out split after training.
        train_seconds: wall time of training (compile included).
    """

    model: Model
    inputs: Any
    labels: np.ndarray
    train_inputs: Any
    train_labels: np.ndarray
    is_classifier: bool
    logits_of: Callable[[Any], jax.Array]
    test_inputs: Any
    test_labels: np.ndarray
    initial_variables: dict
    history: list[float]
    test_accuracy: float
    train_seconds: float


def take(tree: Any, index: Any) -> Any:
    """Rows ``index`` of every leaf of an input pytree."""
    return jax.tree.map(lambda a: a[index], tree)


def patch_mask(n: int, seed: int) -> np.ndarray:
    """``(n, NUM_PATCHES)`` bool: each patch visible with probability ``MASK_KEEP``, at least one per example."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n, models.NUM_PATCHES)) < MASK_KEEP
    mask[np.arange(n), rng.integers(0, models.NUM_PATCHES, n)] = True
    return mask


def _identity(out: Any) -> Any:
    return out


def _dict_logits(out: Any) -> Any:
    return out["logits"]


def build(name: str, example: Any) -> tuple[Model, Callable[[Any], Any]]:
    """The untrained ``Model`` called ``name`` and its ``logits_of``."""
    key = jax.random.key(0)
    if name == "resnet":
        net = models.ResNet()
        variables = jax.jit(functools.partial(net.init, train=False))(key, example)
        model = Model.linen(net, variables, example, eval_kwargs={"train": False}, train_kwargs={"train": True})
        return model, _identity
    if name == "vit":
        net = models.ViT()
        return Model.linen(net, jax.jit(net.init)(key, example), example), _identity
    if name == "nnx_attn":
        return Model.nnx(models.NNXAttention(rngs=nnx.Rngs(params=0, dropout=1)), example), _identity
    if name == "raw_params":
        net = models.RawParams()
        return Model.linen(net, jax.jit(net.init)(key, example), example), _identity
    if name == "plain_fn":
        return Model.function(models.plain_mlp, jax.jit(models.init_plain_mlp)(key), example), _identity
    if name == "multi_out":
        net = models.MultiOut()
        return (
            Model.linen(net, jax.jit(net.init)(key, example), example, train_kwargs={"deterministic": False}),
            _dict_logits,
        )
    raise KeyError(name)


def train(
    model: Model,
    inputs: Any,
    labels: np.ndarray,
    logits_of: Callable[[Any], Any],
    *,
    steps: int = TRAIN_STEPS,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    seed: int = 0,
) -> tuple[dict, list[float]]:
    """Adam on softmax cross entropy through ``model.train_step_apply``; returns (variables, loss history).

    Works for any of the zoo: a pytree input, a pytree output read by
    ``logits_of``, and whatever non-param state the training step returns
    (Linen ``batch_stats``, NNX ``state``) is carried to the next step.
    """
    optimizer = optax.adam(learning_rate)
    variables = model.variables
    opt_state = optimizer.init(variables["params"])

    @jax.jit
    def step(variables, opt_state, x, y, rng):
        def loss_fn(params):
            out, updates = model.apply_with_mode({**variables, "params": params}, x, train=True, rng=rng)
            return optax.softmax_cross_entropy_with_integer_labels(logits_of(out), y).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        deltas, opt_state = optimizer.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], deltas)
        return {**variables, **updates, "params": params}, opt_state, loss

    n = len(labels)
    per_epoch = n // batch_size
    key = jax.random.key(seed)
    losses = []
    order = None
    for i in range(steps):
        epoch, pos = divmod(i, per_epoch)
        if pos == 0:
            order = np.random.default_rng([seed, epoch]).permutation(n)
        idx = order[pos * batch_size : (pos + 1) * batch_size]
        rng = jax.random.fold_in(key, i)
        variables, opt_state, loss = step(variables, opt_state, take(inputs, idx), labels[idx], rng)
        losses.append(loss)
    losses = np.asarray(jax.device_get(losses))
    history = [float(chunk.mean()) for chunk in np.split(losses, range(LOG_EVERY, steps, LOG_EVERY))]
    return variables, history


def evaluate(model: Model, variables: dict, inputs: Any, labels: np.ndarray, logits_of: Callable[[Any], Any]) -> float:
    """Top-1 accuracy of the inference function over ``inputs`` (one jitted call)."""
    logits = jax.jit(lambda v, x: logits_of(model(v, x)))(variables, inputs)
    return float((np.asarray(logits).argmax(-1) == labels).mean())


def model_inputs(name: str, images: np.ndarray, seed: int) -> Any:
    """The digits as ``name`` takes them: the images, or the ViT's ``{"pixels", "mask"}``."""
    if name == "vit":
        return {"pixels": images, "mask": patch_mask(len(images), seed)}
    return images


@pytest.fixture(scope="session")
def foreign_models() -> dict[str, ForeignCase]:
    """Every model in ``FOREIGN``, trained for ``TRAIN_STEPS`` steps (about 30 s for all six on two cores)."""
    digits = load_digits()
    cases = {}
    for name in FOREIGN:
        x_train = model_inputs(name, digits.x_train, seed=1)
        x_test = model_inputs(name, digits.x_test, seed=2)
        model, logits_of = build(name, take(x_train, slice(0, 2)))
        start = time.perf_counter()
        variables, history = train(model, x_train, digits.y_train, logits_of)
        jax.block_until_ready(variables)
        seconds = time.perf_counter() - start
        cases[name] = ForeignCase(
            model=model.with_variables(variables),
            inputs=take(x_test, slice(0, HELD_OUT)),
            labels=digits.y_test[:HELD_OUT],
            train_inputs=take(x_train, slice(0, TRAIN_SUBSET)),
            train_labels=digits.y_train[:TRAIN_SUBSET],
            is_classifier=True,
            logits_of=logits_of,
            test_inputs=x_test,
            test_labels=digits.y_test,
            initial_variables=model.variables,
            history=history,
            test_accuracy=evaluate(model, variables, x_test, digits.y_test, logits_of),
            train_seconds=seconds,
        )
    return cases
