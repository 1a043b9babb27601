"""A jit-compiled, seeded optax training loop shared by fine-tuning, QAT and distillation.

The loop is generic over a loss function
``loss_fn(params, model_state, batch, rng) -> (loss, (new_model_state, metrics))``,
so later chapters plug in their own losses (fake-quantized forward passes,
distillation against a teacher) and their own optax transforms (masks,
regularizers) without a new loop. The batch order is a pure function of
``(seed, step)``, so a run resumed from a saved ``TrainState`` sees the same
batches as an uninterrupted one; ``fit(..., checkpoint=DIR)`` saves one
(orbax, ``jaxopt_serve.train.checkpoint``) at every log point and resumes
from it.

Any model works: ``classification_loss``, ``accuracy`` and ``fit`` take a
``jaxopt_serve.model.Model`` (a Linen or NNX module or a plain function, with
pytree inputs and outputs) as well as a reference ``ModelConfig`` or an
``ApplyFn``; ``fit`` also takes an iterable of ready-made batches instead of
in-memory arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_serve.model import Model
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import ApplyFn, Variables, make_apply, predict_fn

Batch = Any
Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, Variables, Batch, jax.Array], tuple[jax.Array, tuple[Variables, Metrics]]]
LogitsOf = Callable[[Any], jax.Array]
BN_BATCHES = 8  # training batches that re-estimate BatchNorm statistics at the end of ``fit``
BN_RNG_SALT = 0xB47C4  # folded into the seed for the re-estimation passes (their dropout masks)


class TrainState(NamedTuple):
    """Everything a training run needs to continue: a pytree, so it can be checkpointed."""

    step: jax.Array
    params: Any
    model_state: Variables
    opt_state: optax.OptState
    rng: jax.Array

    @property
    def variables(self) -> Variables:
        """``params`` and the other collections merged back into one variables dict."""
        return {"params": self.params, **self.model_state}


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns: the final state and a metrics history (one dict per log point)."""

    state: TrainState
    history: list[dict[str, float]]

    @property
    def variables(self) -> Variables:
        return self.state.variables


def init_state(variables: Variables, optimizer: optax.GradientTransformation, *, seed: int = 0) -> TrainState:
    """A fresh ``TrainState`` at step 0 for ``variables``."""
    params = variables["params"]
    model_state = {name: tree for name, tree in variables.items() if name != "params"}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=optimizer.init(params),
        rng=jax.random.key(seed),
    )


def classification_loss(
    model: ApplyFn | Model | ModelConfig,
    *,
    label_smoothing: float = 0.0,
    logits_of: LogitsOf | None = None,
) -> LossFn:
    """Softmax cross entropy on ``batch = (inputs, labels)``, with accuracy as a metric.

    Args:
        model: a ``Model`` (inputs may be any pytree: a dict, or a tuple for
            several positional inputs), a reference ``ModelConfig``, or an
            ``ApplyFn`` ``apply(variables, x, *, train, rng) -> (outputs, state updates)``.
        label_smoothing: in ``[0, 1)``.
        logits_of: maps the model's outputs to the logits (default: the outputs
            themselves when they are an array, ``outputs["logits"]`` for a dict).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from jaxopt_serve.models import MLPConfig, init_variables, make_apply
        >>> cfg = MLPConfig(features=(8,), num_classes=3)
        >>> v = init_variables(cfg, 0)
        >>> loss_fn = classification_loss(make_apply(cfg))
        >>> batch = (jnp.ones((4, 8, 8, 1)), jnp.array([0, 1, 2, 0]))
        >>> loss, (_, metrics) = loss_fn(v["params"], {}, batch, jax.random.key(0))
        >>> sorted(metrics)
        ['accuracy', 'loss']
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    apply_fn = apply_of(model)
    name = model.name if isinstance(model, Model) else "the model"

    def loss_fn(params: Any, model_state: Variables, batch: Batch, rng: jax.Array):
        x, labels = batch
        outputs, new_state = apply_fn({"params": params, **model_state}, x, train=True, rng=rng)
        logits = select_logits(outputs, logits_of, name)
        labels = jnp.asarray(labels)
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"{name}: logits of shape {logits.shape} do not match labels of shape {labels.shape}")
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = (logits.argmax(-1) == labels).mean()
        return loss, ({**model_state, **new_state}, {"loss": loss, "accuracy": accuracy})

    return loss_fn


def apply_of(model: ApplyFn | Model | ModelConfig) -> ApplyFn:
    """The training loop's ``ApplyFn`` for a ``Model``, a ``ModelConfig`` or an ``ApplyFn`` (returned as is)."""
    if isinstance(model, Model):
        return model.apply_with_mode
    if isinstance(model, ModelConfig):
        return make_apply(model)
    if callable(model):
        return model
    raise TypeError(f"expected a Model, a ModelConfig or an apply function, got {type(model).__name__}")


def select_logits(outputs: Any, logits_of: LogitsOf | None, name: str = "the model") -> jax.Array:
    """``logits_of(outputs)``, or by default the outputs when they are one array, ``outputs["logits"]`` for a dict.

    Raises:
        ValueError: the outputs are another pytree and no ``logits_of`` is given,
            or ``logits_of`` does not return an array.
    """
    if logits_of is not None:
        logits = logits_of(outputs)
        if not _is_array(logits):
            raise ValueError(f"logits_of must return the logits array of {name}, got {type(logits).__name__}")
        return logits
    if _is_array(outputs):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs and _is_array(outputs["logits"]):
        return outputs["logits"]
    raise ValueError(
        f"{name} returns {jax.tree.structure(outputs)}, not one logits array: "
        f"pass logits_of= (e.g. lambda out: out[0]) to pick the logits"
    )


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Mapping)


def make_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """One jit-compiled optimization step: ``step(state, batch) -> (state, metrics)``."""

    @jax.jit
    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (model_state, metrics)), grads = grad_fn(state.params, state.model_state, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state._replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state)
        return new_state, metrics

    return step


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the examples in batch number ``step``: a pure function of its arguments.

    Each epoch is a fresh permutation seeded by ``(seed, epoch)``; the last
    incomplete batch of an epoch is dropped so every batch has one shape.

    Example:
        >>> batch_indices(10, 4, 0, seed=1).shape
        (4,)
        >>> bool((batch_indices(10, 4, 3, seed=1) == batch_indices(10, 4, 3, seed=1)).all())
        True
    """
    if not 0 < batch_size <= num_examples:
        raise ValueError(f"batch_size must be in [1, {num_examples}] (the number of examples), got {batch_size}")
    per_epoch = num_examples // batch_size
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return order[position * batch_size : (position + 1) * batch_size]


def fit(
    loss_fn: LossFn | Model,
    variables: Variables | None = None,
    data: Sequence[Any] | None = None,
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    batch_size: int | None = None,
    batches: Iterable[Batch] | None = None,
    seed: int = 0,
    state: TrainState | None = None,
    log_every: int = 50,
    eval_fn: Callable[[Variables], dict[str, float]] | None = None,
    progress: bool = True,
    on_log: Callable[[TrainState, dict[str, float]], bool | None] | None = None,
    logits_of: LogitsOf | None = None,
    reestimate_bn: bool | int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> FitResult:
    """Train for ``steps`` optimizer steps (in total, counting a resumed ``state``'s).

    Args:
        loss_fn: see ``LossFn``; ``classification_loss`` is the usual one. A
            ``Model`` stands for ``classification_loss(model, logits_of=logits_of)``.
        variables: initial variables (ignored when ``state`` is given; default
            for a ``Model``: its own).
        data: in-memory data with the example axis first, e.g. ``(x_train, y_train)``;
            each item may be a pytree (a dict of inputs); each batch is the
            tuple of their rows, drawn by ``batch_indices``.
        optimizer: any optax transformation.
        steps: total number of steps to reach.
        batch_size: examples per step, with ``data``.
        batches: instead of ``data``, an iterable of ready-made batches (what
            ``loss_fn`` takes, e.g. ``(inputs, labels)``). A re-iterable (a list)
            is cycled; an iterator or generator that runs out ends training
            early (the last history entry says at which step). Batches are
            taken from where the iterable stands, also when resuming.
        seed: seeds the batch order (``data``) and the per-step rng (dropout).
        state: a ``TrainState`` to resume from.
        log_every: steps between history entries (and ``eval_fn`` calls).
        eval_fn: ``eval_fn(variables) -> {name: value}`` merged into the history.
        progress: show a rich progress bar.
        on_log: called with the state and the history entry at each log point
            (e.g. to checkpoint); it may add keys to the entry, and returning
            ``True`` stops training there (early stopping).
        logits_of: with a ``Model``: maps its outputs to the logits.
        reestimate_bn: re-estimate BatchNorm statistics at the end over the
            first ``BN_BATCHES`` training batches (an int: that many), with the
            final weights (``reestimate_batch_stats``); done before the last
            history entry, so its ``eval_fn`` sees them. Default: on when
            ``loss_fn`` is a ``Model``; other loss functions cannot (a ``Model``
            is needed to run the forward passes).
        checkpoint: a directory to checkpoint to (orbax, ``jaxopt_serve.train.checkpoint``)
            at every log point, with the history so far; when it already holds a
            checkpoint of this run (same ``seed``, ``batch_size`` and ``log_every``),
            training resumes from it, onto the shardings of ``state`` (or of
            ``variables``), and ends with exactly the state of an uninterrupted run.

    Returns:
        ``FitResult`` with the final ``TrainState`` and the history.

    Example:
        >>> import numpy as np, optax
        >>> from jaxopt_serve.models import MLPConfig, init_variables, make_apply
        >>> cfg = MLPConfig(features=(16,), num_classes=2, input_shape=(4,))
        >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
        >>> y = (x[:, 0] > 0).astype(np.int32)
        >>> result = fit(classification_loss(make_apply(cfg)), init_variables(cfg, 0), (x, y),
        ...              optimizer=optax.adam(1e-2), steps=40, batch_size=16, progress=False, log_every=20)
        >>> result.history[-1]["loss"] < result.history[0]["loss"]
        True
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if log_every <= 0:
        raise ValueError(f"log_every must be > 0, got {log_every}")
    model = loss_fn if isinstance(loss_fn, Model) else None
    if model is not None:
        loss_fn = classification_loss(model, logits_of=logits_of)
        variables = model.variables if variables is None else variables
    elif logits_of is not None:
        raise ValueError("logits_of is for fit(model, ...); pass it to classification_loss(..., logits_of=) instead")
    bn_batches = _bn_batches(reestimate_bn, model)
    if state is None and variables is None:
        raise ValueError("fit needs the initial variables (or a state to resume from)")
    if (data is None) == (batches is None):
        raise ValueError(
            "fit takes either data= (in-memory arrays) or batches= (an iterable of batches), not both or neither"
        )
    if data is not None:
        if batch_size is None:
            raise ValueError("batch_size is required with data=")
        draw, calibration = _array_batches(data, batch_size, seed, bn_batches)
    else:
        if batch_size is not None:
            raise ValueError("batch_size is for data=; batches= are already batched")
        draw, calibration = _iter_batches(batches, bn_batches)
    if state is None:
        state = init_state(variables, optimizer, seed=seed)
    history: list[dict[str, float]] = []
    fingerprint = {"seed": seed, "batch_size": batch_size, "log_every": log_every}
    if checkpoint is not None:
        from jaxopt_serve.train import checkpoint as ckpt

        ckpt.check_checkpoint_path(checkpoint)
        if ckpt.latest_step(checkpoint) is not None:
            restored = ckpt.restore_checkpoint(checkpoint, state, fingerprint=fingerprint)
            state, history = restored.state, list(restored.record.get("history", []))
            if restored.record.get("stopped"):
                return FitResult(state=state, history=history)
    train_step = make_train_step(loss_fn, optimizer)
    start = int(state.step)
    saved_state = state

    def save(stopped: bool) -> None:
        nonlocal saved_state
        if checkpoint is not None:
            ckpt.save_checkpoint(
                checkpoint, state, record={"history": history, "stopped": stopped}, fingerprint=fingerprint
            )
            saved_state = state

    pending: list[Metrics] = []
    reestimated = bn_batches == 0

    def log(done: int, final: bool) -> bool:
        nonlocal state, reestimated
        if final and not reestimated:
            state = _reestimate(model, state, calibration(), seed)
            reestimated = True
        entry = {"step": float(done)}
        if pending:
            entry.update({k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]})
        pending.clear()
        if eval_fn is not None:
            entry.update(eval_fn(state.variables))
        stop = bool(on_log(state, entry)) if on_log is not None else False
        history.append(entry)
        save(stop)
        advance(done, entry)
        return stop

    with _progress_bar(progress, total=steps, completed=start) as advance:
        for step in range(start, steps):
            batch = draw(step)
            if batch is None:  # the iterator ran out
                if pending:
                    log(step, final=True)
                break
            state, metrics = train_step(state, batch)
            pending.append(metrics)
            done = step + 1
            if done % log_every == 0 or done == steps:
                if log(done, final=done == steps):
                    break
    if not reestimated and start < int(state.step):
        state = _reestimate(model, state, calibration(), seed)
    if state is not saved_state and start < int(state.step):  # re-estimated after the last log point
        save(True)
    return FitResult(state=state, history=history)


def _bn_batches(reestimate_bn: bool | int | None, model: Model | None) -> int:
    """How many batches re-estimate BatchNorm statistics at the end of ``fit`` (0: none)."""
    if reestimate_bn is None:
        return BN_BATCHES if model is not None else 0
    if isinstance(reestimate_bn, bool):
        count = BN_BATCHES if reestimate_bn else 0
    elif isinstance(reestimate_bn, int) and reestimate_bn >= 0:
        count = reestimate_bn
    else:
        raise ValueError(f"reestimate_bn must be a bool or a number of batches >= 0, got {reestimate_bn!r}")
    if count and model is None:
        raise ValueError("reestimate_bn needs fit(model, ...) with a Model: a loss function cannot run the model")
    return count


def _array_batches(data: Sequence[Any], batch_size: int, seed: int, bn_batches: int):
    """``draw(step) -> batch`` over in-memory data, and the calibration batches (the first ones)."""
    items = [jax.tree.map(np.asarray, item) for item in data]
    sizes = {}
    for i, item in enumerate(items):
        for path, leaf in jax.tree_util.tree_leaves_with_path(item):
            if np.ndim(leaf) == 0:
                raise ValueError(f"data[{i}]{jax.tree_util.keystr(path)}: expected an example axis, got a scalar")
            sizes[f"data[{i}]{jax.tree_util.keystr(path)}"] = len(leaf)
    if not sizes:
        raise ValueError("data holds no arrays")
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"all data arrays need the same number of examples, got sizes {list(sizes.values())} for {list(sizes)}"
        )
    num_examples = next(iter(sizes.values()))
    if not 0 < batch_size <= num_examples:
        raise ValueError(f"batch_size must be in [1, {num_examples}] (the number of examples), got {batch_size}")

    def draw(step: int) -> tuple[Any, ...]:
        idx = batch_indices(num_examples, batch_size, step, seed)
        return tuple(jax.tree.map(lambda a: a[idx], item) for item in items)

    return draw, lambda: [draw(step) for step in range(bn_batches)]


def _iter_batches(batches: Iterable[Batch], bn_batches: int):
    """``draw(step) -> batch or None`` over an iterable, and the first ``bn_batches`` batches it gave."""
    iterator: Iterator[Batch] = iter(batches)
    reiterable = iterator is not batches
    kept: list[Batch] = []

    def draw(step: int) -> Batch | None:
        nonlocal iterator
        del step
        batch = next(iterator, _END)
        if batch is _END and reiterable:
            iterator = iter(batches)
            batch = next(iterator, _END)
            if batch is _END:
                raise ValueError("batches is empty")
        if batch is _END:
            return None
        if len(kept) < bn_batches:
            kept.append(batch)
        return batch

    return draw, lambda: kept


_END = object()


def _reestimate(model: Model | None, state: TrainState, calibration: list[Batch], seed: int) -> TrainState:
    from jaxopt_serve.train.batch_stats import reestimate_batch_stats

    if model is None or not calibration:
        return state
    inputs = [batch[0] for batch in calibration]
    rng = jax.random.fold_in(jax.random.key(seed), BN_RNG_SALT)
    variables = reestimate_batch_stats(model, state.variables, inputs, rng=rng)
    return state._replace(model_state={k: v for k, v in variables.items() if k != "params"})


class _progress_bar:
    """A rich progress bar, or nothing when disabled."""

    def __init__(self, enabled: bool, *, total: int, completed: int) -> None:
        self.enabled, self.total, self.completed = enabled, total, completed
        self.bar: Any = None

    def __enter__(self) -> Callable[[int, dict[str, float]], None]:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, completed=self.completed, metrics="")
        return self.advance

    def advance(self, done: int, entry: dict[str, float]) -> None:
        if self.bar is not None:
            text = " ".join(f"{k}={v:.4f}" for k, v in entry.items() if k != "step")
            self.bar.update(self.task, completed=done, metrics=text)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _padded_chunk(a: Any, *, start: int, count: int, batch_size: int) -> np.ndarray:
    """Rows ``start:start + count`` of ``a``, zero-padded to ``batch_size`` rows (one compiled shape)."""
    chunk = np.asarray(a[start : start + count])
    if count < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - count, *chunk.shape[1:]), chunk.dtype)])
    return chunk


def accuracy(
    predict: Callable[[Variables, Any], Any] | Model | ModelConfig,
    variables: Variables | None,
    x: Any,
    y: np.ndarray,
    *,
    batch_size: int = 256,
    logits_of: LogitsOf | None = None,
) -> float:
    """Top-1 accuracy of ``predict(variables, x)`` over ``(x, y)``, in fixed-size jitted batches.

    ``predict`` may be a ``Model`` (``variables=None``: its own; ``x`` any
    pytree of inputs, a tuple for several positional inputs) or a reference
    ``ModelConfig``. The last batch is padded, so the function compiles once
    whatever ``len(y)`` is.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from jaxopt_serve.model import Model
        >>> model = Model.function(lambda p, x: {"logits": x @ p}, jnp.eye(2), np.zeros((1, 2), np.float32))
        >>> accuracy(model, None, np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 0]))
        0.5
    """
    name = "the model"
    if isinstance(predict, Model):
        model = predict
        variables = model.variables if variables is None else variables
        name = model.name

        def predict(variables, x):
            return model.apply_with_mode(variables, x)[0]
    elif isinstance(predict, ModelConfig):
        predict = predict_fn(predict)
    if variables is None:
        raise ValueError("accuracy needs the variables (None only for a Model)")
    leaves = jax.tree.leaves(x)
    if not leaves:
        raise ValueError("x holds no arrays")
    n = len(y)
    for path, leaf in jax.tree_util.tree_leaves_with_path(x):
        if len(leaf) != n:
            raise ValueError(f"x{jax.tree_util.keystr(path)} has {len(leaf)} examples and y has {n}: they must match")
    if n == 0:
        raise ValueError("x and y must be non-empty")
    batch_size = min(batch_size, n)
    jitted = jax.jit(lambda v, chunk: select_logits(predict(v, chunk), logits_of, name))
    correct = 0
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        chunk_of = functools.partial(_padded_chunk, start=start, count=count, batch_size=batch_size)
        predictions = np.asarray(jitted(variables, jax.tree.map(chunk_of, x))).argmax(-1)[:count]
        correct += int((predictions == np.asarray(y[start : start + count])).sum())
    return correct / n
