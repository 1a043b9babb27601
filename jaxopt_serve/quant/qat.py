"""Quantization-aware training (QAT) with a straight-through estimator.

The forward pass sees the weights the quantized model will have (quantized,
then dequantized: ``fake_quantize``); the backward pass treats that round trip
as the identity, so the gradient updates the float "master" weights as if
nothing had been quantized. After a short fine-tune the float weights sit
where their quantized versions classify well, and ``rules.quantize`` turns
them into the real ``QArray`` tree.

Leaves are selected exactly as ``rules.quantize`` selects them: paths such as
``"params/dense_0/kernel"``, the first rule whose pattern fully matches wins,
and a rule with ``spec=None`` keeps a leaf in float.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxopt_serve.model import Model
from jaxopt_serve.models.functional import ApplyFn, Variables, make_apply
from jaxopt_serve.quant.qarray import QuantSpec, fake_quantize, is_qarray, resolve_axis
from jaxopt_serve.quant.rules import (
    QuantizeResult,
    QuantRule,
    check_quantizable,
    dequantize_tree,
    first_match,
    path_str,
    quantize,
)
from jaxopt_serve.train.batch_stats import reestimate_batch_stats as reestimate_model_batch_stats
from jaxopt_serve.train.loop import FitResult, classification_loss, fit
from jaxopt_serve.train.recipes import default_optimizer

QAT_LEARNING_RATE = 1e-3


def ternary_rules(model: Any = None) -> list[QuantRule]:
    """The ternary recipe: every weight ternary per channel, the last weight layer int8 per channel.

    Keeping the last layer at higher precision is common practice (it holds few
    weights but decides every logit); biases, batch norm and embeddings stay
    float, as with ``default_rules``. Given a ``Model``, the weights and the last
    weight layer are found from its traced program (``quant.select``); without
    one, by the reference models' names (``classifier``).

    Example:
        >>> [(rule.pattern, rule.spec.qtype) for rule in ternary_rules()]
        [('params/classifier/kernel', 'int8'), ('params/(.*/)?kernel', 'ternary')]
    """
    if model is not None:
        from jaxopt_serve.quant.select import model_rules

        return model_rules(model, QuantSpec(qtype="ternary"), last=QuantSpec(qtype="int8"))
    return [
        QuantRule(r"params/classifier/kernel", QuantSpec(qtype="int8")),
        QuantRule(r"params/(.*/)?kernel", QuantSpec(qtype="ternary")),
    ]


def selected_specs(
    tree: Mapping[str, Any], rules: Sequence[QuantRule], *, prefix: str | None = None
) -> dict[str, QuantSpec]:
    """The ``QuantSpec`` each leaf of ``tree`` gets from ``rules`` (first match wins), keyed by path.

    Leaves matched by no rule or by a ``spec=None`` rule are left out. Checks
    eagerly (before any tracing) that every selected leaf is a float array
    that fits its spec.

    Args:
        tree: a variables dict (``{"params": ...}``) or a bare params dict.
        rules: the quantization rules.
        prefix: path prefix of the leaves; by default ``""`` for a variables
            dict (it has a ``"params"`` key) and ``"params"`` otherwise.

    Raises:
        ValueError: a selected leaf is already quantized, not a float array, or
            does not fit its spec (e.g. a group size that does not divide it);
            the message names the leaf's path.

    Example:
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> params = init_variables(MLPConfig(features=(64,)), 0)["params"]
        >>> sorted(selected_specs(params, ternary_rules()))
        ['params/classifier/kernel', 'params/dense_0/kernel']
    """
    rules = list(rules)
    specs: dict[str, QuantSpec] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_qarray):
        name = _join(_prefix(tree, prefix), path_str(path))
        index = first_match(name, rules)
        spec = None if index is None else rules[index].spec
        if spec is None:
            continue
        check_quantizable(name, leaf, "a QAT rule")
        resolve_axis(tuple(leaf.shape), spec, name=name)
        specs[name] = spec
    return specs


def fake_quantize_tree(tree: Mapping[str, Any], rules: Sequence[QuantRule], *, prefix: str | None = None) -> Any:
    """``tree`` with every leaf selected by ``rules`` fake-quantized (straight-through gradient).

    Args:
        tree: a variables dict (``{"params": ..., "batch_stats": ...}``) or a bare params dict.
        rules: the quantization rules, as for ``rules.quantize``.
        prefix: see ``selected_specs``.

    Returns:
        A tree of the same structure: selected leaves hold their quantized-then-
        dequantized values, whose gradient with respect to the input leaf is
        the identity; every other leaf is returned as is.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from jaxopt_serve.quant import QuantSpec
        >>> tree = {"params": {"dense": {"kernel": jnp.array([[0.9, -0.05], [-1.1, 0.4]]), "bias": jnp.ones(2)}}}
        >>> out = fake_quantize_tree(tree, [QuantRule(r".*/kernel", QuantSpec(qtype="binary"))])
        >>> (np.asarray(out["params"]["dense"]["kernel"], np.float64).round(3).tolist(),
        ...  out["params"]["dense"]["bias"].tolist())
        ([[1.0, -0.225], [-1.0, 0.225]], [1.0, 1.0])
    """
    specs = selected_specs(tree, rules, prefix=prefix)
    base = _prefix(tree, prefix)

    def visit(path, leaf):
        spec = specs.get(_join(base, path_str(path)))
        return leaf if spec is None else fake_quantize(leaf, spec)

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_qarray)


def qat_apply(config: Any, rules: Sequence[QuantRule]) -> ApplyFn:
    """The model's training-loop apply function with the params selected by ``rules`` fake-quantized.

    ``config`` is a ``Model`` (any Linen, NNX or plain-function model) or a reference ``ModelConfig``.

    Only ``variables["params"]`` is fake-quantized; the other collections
    (``batch_stats``) pass through, and their updates are returned as usual.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> cfg = MLPConfig(features=(64,))
        >>> logits, _ = qat_apply(cfg, ternary_rules())(init_variables(cfg, 0), jnp.ones((2, 8, 8, 1)))
        >>> logits.shape
        (2, 10)
    """
    rules = _check_rules(rules)
    apply = _apply_of(config)

    def apply_fake_quantized(variables: Variables, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None):
        params = fake_quantize_tree(variables["params"], rules, prefix="params")
        return apply({**variables, "params": params}, x, train=train, rng=rng)

    return apply_fake_quantized


def qat_finetune(
    config: Any,
    variables: Variables,
    dataset: Any,
    rules: Sequence[QuantRule],
    *,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = QAT_LEARNING_RATE,
    seed: int = 0,
    progress: bool = True,
    reestimate_stats: bool = True,
    logits_of: Any = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> tuple[QuantizeResult, FitResult]:
    """Fine-tune ``variables`` with fake-quantized weights, then quantize them for real.

    Runs ``fit`` on ``classification_loss(qat_apply(config, rules))`` with
    ``default_optimizer`` (AdamW, short warm-up, cosine decay), starting from
    the trained float ``variables``; then ``rules.quantize`` turns the
    fine-tuned float weights into ``QArray`` leaves, and the batch-norm
    statistics are recomputed over the training inputs with those quantized
    weights (``reestimate_batch_stats``).

    Args:
        config: the model: a ``Model`` or a reference ``ModelConfig``.
        variables: trained float variables (the starting point).
        dataset: a ``Dataset`` (its training split is used) or ``(x, y)`` arrays.
        rules: which leaves to quantize and how (``ternary_rules()``, ``default_rules(spec)``, ...).
        steps: optimizer steps; a few hundred recover most of a ternary model's accuracy.
        batch_size: examples per step.
        learning_rate: peak learning rate; lower than training from scratch,
            since the weights start trained.
        seed: seeds the batch order and dropout.
        progress: show a progress bar.
        reestimate_stats: recompute the running statistics (batch norm) with
            the final quantized weights; without it they are moving averages
            over the last steps' ever-changing quantized weights, which costs
            several accuracy points on some seeds.
        logits_of: for a model whose output is not the logits array, the function
            that picks them (e.g. ``lambda out: out["logits"]``).
        checkpoint: a directory the fine-tune checkpoints to at every log point
            and resumes from (orbax, ``fit(..., checkpoint=)``); a resumed
            fine-tune ends with the weights of an uninterrupted one.

    Returns:
        ``(QuantizeResult, FitResult)``: the quantized variables with the
        report of ``rules.quantize``, and the fine-tune's final state (float,
        statistics as trained) and history.

    Raises:
        ValueError: a bad argument, or a selected leaf that cannot be quantized
            under its rule (named by path), raised before anything is compiled.

    Example:
        >>> import numpy as np
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> cfg = MLPConfig(features=(16,), num_classes=2, input_shape=(4,))
        >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
        >>> y = (x[:, 0] > 0).astype(np.int32)
        >>> q, fitted = qat_finetune(cfg, init_variables(cfg, 0), (x, y), ternary_rules(),
        ...                          steps=20, batch_size=16, progress=False)
        >>> sorted(q.quantized), len(fitted.history)
        (['params/classifier/kernel', 'params/dense_0/kernel'], 1)
    """
    rules = _check_rules(rules)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not (isinstance(learning_rate, (int, float)) and np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate!r}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(f"variables must be a dict with a 'params' collection, got keys {_keys(variables)}")
    data = _training_arrays(dataset)
    selected_specs(variables, rules)  # fail on a bad path/spec before compiling anything
    result = fit(
        classification_loss(qat_apply(config, rules), logits_of=logits_of),
        variables,
        data,
        optimizer=default_optimizer(steps, learning_rate=learning_rate),
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        checkpoint=checkpoint,
    )
    quantized = quantize(result.variables, rules)
    if reestimate_stats:
        # Measured on the weights that will be served (eager ``quantize`` may put a
        # few weights sitting on a ternary threshold on the other side than the
        # jit-compiled ``fake_quantize`` of the last step did).
        served = reestimate_batch_stats(
            _apply_of(config), dequantize_tree(quantized.variables), data[0], batch_size=max(batch_size, 256)
        )
        state = {name: tree for name, tree in served.items() if name != "params"}
        quantized = dataclasses.replace(quantized, variables={**quantized.variables, **state})
    return quantized, result


def reestimate_batch_stats(
    apply_fn: ApplyFn, variables: Variables, x: np.ndarray, *, batch_size: int = 256
) -> Variables:
    """``variables`` with their running statistics (``batch_stats``) recomputed over ``x``.

    Batch norm's running mean and variance are moving averages over the last
    training steps. During QAT the quantized weights keep changing (a ternary
    weight crossing its threshold flips a whole output), so those averages mix
    several networks; recomputing them once with the final weights removes
    that noise (and alone recovers much of what post-training quantization
    loses). Every leaf the train-mode ``apply_fn`` updates is taken to be a
    running statistic, updated as
    ``new = momentum * old + (1 - momentum) * batch_statistic`` (batch norm's
    mean and variance); two train-mode passes per batch, from all-zero and
    from all-one statistics, solve it for ``batch_statistic`` whatever the
    momentum. The statistics are averaged over ``len(x) // batch_size`` batches
    of ``x`` in order (one batch when ``x`` is smaller). Params and the leaves
    the apply does not update are unchanged; a model without state (or an NNX
    model, whose apply returns no updates) comes back as is.

    Args:
        apply_fn: ``make_apply(config)``, or ``qat_apply(config, rules)`` to
            measure the statistics of the fake-quantized network.
        variables: float variables (params and the state to recompute).
        x: inputs, example axis first (e.g. the training images); any pytree of arrays.
        batch_size: examples per pass.

    Raises:
        ValueError: ``x`` is empty, or an updated leaf is not a moving
            average (the message names its path).

    Example:
        >>> import numpy as np
        >>> from jaxopt_serve.models import CNNConfig, init_variables, make_apply
        >>> cfg = CNNConfig(channels=(4,), hidden=0)
        >>> x = np.random.default_rng(0).normal(size=(32, 8, 8, 1)).astype(np.float32)
        >>> v = reestimate_batch_stats(make_apply(cfg), init_variables(cfg, 0), x, batch_size=32)
        >>> np.allclose(v["batch_stats"]["bn_0"]["mean"], 0.0)
        False
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    x = jax.tree.map(np.asarray, x)
    first = jax.tree.leaves(x)[0] if jax.tree.leaves(x) else np.zeros(())
    if first.ndim == 0 or len(first) == 0:
        raise ValueError(f"x must hold at least one example, got shape {first.shape}")
    state = {name: tree for name, tree in variables.items() if name != "params"}
    if not jax.tree.leaves(state):
        return variables
    rows = len(first)
    batch_size = min(batch_size, rows)
    model = Model.function(
        lambda v, inputs: apply_fn(v, inputs)[0],
        variables,
        jax.tree.map(lambda a: a[:1], x),
        train_fn=lambda v, inputs, rng=None: apply_fn(v, inputs, train=True, rng=rng),
    )
    batches = (
        jax.tree.map(lambda a, i=i: a[i * batch_size : (i + 1) * batch_size], x) for i in range(rows // batch_size)
    )
    return reestimate_model_batch_stats(model, variables, batches, rng=None)


def _prefix(tree: Any, prefix: str | None) -> str:
    if prefix is not None:
        return prefix.strip("/")
    return "" if isinstance(tree, Mapping) and "params" in tree else "params"


def _join(prefix: str, path: str) -> str:
    return f"{prefix}/{path}" if prefix else path


def _check_rules(rules: Sequence[QuantRule]) -> list[QuantRule]:
    if isinstance(rules, QuantRule) or not isinstance(rules, Sequence):
        raise TypeError(f"rules must be a sequence of QuantRule, got {type(rules).__name__}")
    for index, rule in enumerate(rules):
        if not isinstance(rule, QuantRule):
            raise TypeError(f"rules[{index}] must be a QuantRule, got {type(rule).__name__}")
    return list(rules)


def _apply_of(config: Any) -> ApplyFn:
    from jaxopt_serve.model import Model

    return config.apply_with_mode if isinstance(config, Model) else make_apply(config)


def _training_arrays(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(dataset, "x_train") and hasattr(dataset, "y_train"):
        return dataset.x_train, dataset.y_train
    if isinstance(dataset, Sequence) and len(dataset) == 2:
        return dataset[0], dataset[1]
    raise ValueError(f"dataset must be a Dataset or an (x, y) pair, got {type(dataset).__name__}")


def _keys(tree: Any) -> list[str] | str:
    return sorted(map(str, tree)) if isinstance(tree, Mapping) else type(tree).__name__
