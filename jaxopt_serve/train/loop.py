"""A jit-compiled, seeded optax training loop shared by fine-tuning, QAT and distillation.

The loop is generic over a loss function
``loss_fn(params, model_state, batch, rng) -> (loss, (new_model_state, metrics))``,
so later chapters plug in their own losses (fake-quantized forward passes,
distillation against a teacher) and their own optax transforms (masks,
regularizers) without a new loop. The batch order is a pure function of
``(seed, step)``, so a run resumed from a saved ``TrainState`` sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_serve.models.functional import ApplyFn, Variables

Batch = Any
Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, Variables, Batch, jax.Array], tuple[jax.Array, tuple[Variables, Metrics]]]


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


def classification_loss(apply_fn: ApplyFn, *, label_smoothing: float = 0.0) -> LossFn:
    """Softmax cross entropy on ``batch = (x, labels)``, with accuracy as a metric.

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

    def loss_fn(params: Any, model_state: Variables, batch: Batch, rng: jax.Array):
        x, labels = batch
        logits, new_state = apply_fn({"params": params, **model_state}, x, train=True, rng=rng)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = (logits.argmax(-1) == labels).mean()
        return loss, ({**model_state, **new_state}, {"loss": loss, "accuracy": accuracy})

    return loss_fn


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
    loss_fn: LossFn,
    variables: Variables,
    data: Sequence[np.ndarray],
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    batch_size: int,
    seed: int = 0,
    state: TrainState | None = None,
    log_every: int = 50,
    eval_fn: Callable[[Variables], dict[str, float]] | None = None,
    progress: bool = True,
    on_log: Callable[[TrainState, dict[str, float]], bool | None] | None = None,
) -> FitResult:
    """Train for ``steps`` optimizer steps (in total, counting a resumed ``state``'s).

    Args:
        loss_fn: see ``LossFn``; ``classification_loss`` is the usual one.
        variables: initial variables (ignored when ``state`` is given).
        data: arrays with the example axis first, e.g. ``(x_train, y_train)``;
            each batch is the tuple of their rows.
        optimizer: any optax transformation.
        steps: total number of steps to reach.
        batch_size: examples per step.
        seed: seeds the batch order and the per-step rng (dropout).
        state: a ``TrainState`` to resume from.
        log_every: steps between history entries (and ``eval_fn`` calls).
        eval_fn: ``eval_fn(variables) -> {name: value}`` merged into the history.
        progress: show a rich progress bar.
        on_log: called with the state and the history entry at each log point
            (e.g. to checkpoint); it may add keys to the entry, and returning
            ``True`` stops training there (early stopping).

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
    arrays = [np.asarray(a) for a in data]
    sizes = {len(a) for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"all data arrays need the same number of examples, got sizes {[len(a) for a in arrays]}")
    num_examples = sizes.pop()
    if not 0 < batch_size <= num_examples:
        raise ValueError(f"batch_size must be in [1, {num_examples}] (the number of examples), got {batch_size}")
    if state is None:
        state = init_state(variables, optimizer, seed=seed)
    train_step = make_train_step(loss_fn, optimizer)
    history: list[dict[str, float]] = []
    start = int(state.step)
    pending: list[Metrics] = []
    with _progress_bar(progress, total=steps, completed=start) as advance:
        for step in range(start, steps):
            idx = batch_indices(num_examples, batch_size, step, seed)
            state, metrics = train_step(state, tuple(a[idx] for a in arrays))
            pending.append(metrics)
            done = step + 1
            if done % log_every == 0 or done == steps:
                entry = {"step": float(done)}
                entry.update({k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]})
                pending.clear()
                if eval_fn is not None:
                    entry.update(eval_fn(state.variables))
                stop = bool(on_log(state, entry)) if on_log is not None else False
                history.append(entry)
                advance(done, entry)
                if stop:
                    break
    return FitResult(state=state, history=history)


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


def accuracy(
    predict: Callable[[Variables, jax.Array], jax.Array],
    variables: Variables,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of ``predict(variables, x)`` over ``(x, y)``, in fixed-size jitted batches.

    The last batch is padded, so the function compiles once whatever ``len(x)`` is.
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y must be non-empty and the same length, got {len(x)} and {len(y)}")
    batch_size = min(batch_size, len(x))
    jitted = jax.jit(predict)
    correct = 0
    for start in range(0, len(x), batch_size):
        chunk = np.asarray(x[start : start + batch_size])
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
        predictions = np.asarray(jitted(variables, chunk)).argmax(-1)[:n]
        correct += int((predictions == np.asarray(y[start : start + n])).sum())
    return correct / len(x)
