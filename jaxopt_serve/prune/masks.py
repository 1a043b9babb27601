"""Unstructured pruning masks: which weights to zero, chosen by a score, per rule.

A mask tree has the structure of ``params``: a boolean array (``True`` = keep)
for every pruned leaf and ``None`` for leaves that stay dense. Leaves are
selected by ``PruneRule`` path patterns (first match wins, as in quantization;
paths start with the collection: ``"params/dense_0/kernel"``). Each selected
leaf loses exactly ``round(sparsity * size)`` entries (ties broken by
position), or keeps ``N`` of every ``M`` along an axis for N:M rules.

Scores decide what goes: ``magnitude_scores`` (|w|), ``importance_scores``
(|w x gradient| averaged over calibration batches, Taylor first order) or
``random_scores`` (a baseline). ``scope="global"`` ranks all leaves that share a
target sparsity together, so sensitive small layers keep more of their weights.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_serve.quant.rules import path_str

Scope = Literal["layer", "global"]
PREFIX = "params"


class UnusedPruneRuleWarning(UserWarning):
    """A pruning rule matched no parameter."""


@dataclasses.dataclass(frozen=True)
class PruneRule:
    """Prune the leaves whose path fully matches ``pattern``.

    Attributes:
        pattern: regex over ``"params/<module>/.../<name>"``.
        sparsity: fraction of entries to remove, in ``[0, 1)``; ``None`` keeps the leaf dense.
        n_m: ``(N, M)``: keep the ``N`` highest-scoring entries of every ``M``
            consecutive ones along ``axis`` (2:4, 4:8); replaces ``sparsity``.
        axis: the N:M axis; default the contraction axis (0 for a Dense kernel
            ``(in, out)`` and a DenseGeneral kernel, the input-channel axis for
            a conv kernel ``(h, w, in, out)``).

    Example:
        >>> PruneRule(r"params/.*/kernel", 0.9).matches("params/dense_0/kernel")
        True
        >>> PruneRule(r".*", n_m=(2, 4)).n_m
        (2, 4)
    """

    pattern: str
    sparsity: float | None = 0.5
    n_m: tuple[int, int] | None = None
    axis: int | None = None

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"PruneRule pattern {self.pattern!r} is not a valid regex: {err}") from err
        if self.n_m is not None:
            n_m = tuple(self.n_m)
            if len(n_m) != 2 or not all(isinstance(v, int) and v > 0 for v in n_m):
                raise ValueError(f"PruneRule {self.pattern!r}: n_m must be two positive ints (N, M), got {self.n_m!r}")
            if n_m[0] > n_m[1]:
                raise ValueError(f"PruneRule {self.pattern!r}: N:M needs N <= M, got N={n_m[0]} > M={n_m[1]}")
            object.__setattr__(self, "n_m", n_m)
            object.__setattr__(self, "sparsity", 1.0 - n_m[0] / n_m[1])
        elif self.sparsity is not None:
            check_sparsity(self.sparsity, f"PruneRule {self.pattern!r}")

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None


def check_sparsity(value: Any, where: str) -> float:
    """``value`` as a float in ``[0, 1)``, or a ``ValueError`` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{where}: sparsity must be a number in [0, 1), got {value!r}")
    return float(value)


def default_prune_rules(sparsity: float = 0.5) -> list[PruneRule]:
    """Every Dense / DenseGeneral / Conv ``kernel``; biases, norms and embeddings stay dense."""
    return [PruneRule(r"params/(.*/)?kernel", sparsity)]


def model_prune_rules(model: Any, sparsity: float = 0.5, *, n_m: tuple[int, int] | None = None) -> list[PruneRule]:
    """Rules pruning every weight of a ``Model``, found from its traced program (``quant.select``).

    A weight is a parameter used as the weight of a dot product or convolution;
    N:M groups run along the axis the weight is contracted on (its input
    features), whatever the layer is called. With ``n_m``, weights whose input
    axis ``M`` does not divide (a first conv on one channel) stay dense.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_serve.model import Model
        >>> m = Model.function(lambda p, x: x @ p["w"].T, {"w": jnp.ones((8, 4))}, jnp.ones((1, 4)))
        >>> [(r.pattern, r.n_m, r.axis) for r in model_prune_rules(m, n_m=(2, 4))]
        [('params/w', (2, 4), 1)]
    """
    from jaxopt_serve.quant.select import weight_axes, weight_paths

    axes = weight_axes(model)
    leaves = {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(model.variables)}
    rules = []
    for path in weight_paths(model):
        axis = axes[path].input if path in axes else None
        if n_m is not None and (axis is None or np.shape(leaves[path])[axis] % n_m[1]):
            continue
        if n_m is not None:
            rules.append(PruneRule(re.escape(path), n_m=n_m, axis=axis))
        else:
            rules.append(PruneRule(re.escape(path), sparsity))
    return rules


@dataclasses.dataclass(frozen=True)
class Selection:
    """A leaf chosen by a rule: its path, its rule, and its N:M axis (resolved)."""

    name: str
    rule: PruneRule
    shape: tuple[int, ...]
    axis: int | None


def select(params: Mapping[str, Any], rules: Sequence[PruneRule]) -> dict[str, Selection]:
    """The leaves of ``params`` that ``rules`` prune, by path; warns about rules that matched nothing.

    Raises:
        ValueError: a selected leaf is not a float array, or an N:M axis does
            not exist or its length is not a multiple of M (message names the path).
    """
    used: set[int] = set()
    chosen: dict[str, Selection] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = f"{PREFIX}/{path_str(path)}"
        index = next((i for i, rule in enumerate(rules) if rule.matches(name)), None)
        if index is None:
            continue
        used.add(index)
        rule = rules[index]
        if rule.sparsity is None:
            continue
        if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            kind = getattr(leaf, "dtype", type(leaf).__name__)
            raise ValueError(f"{name}: rule {rule.pattern!r} selects a {kind} leaf; only float arrays can be pruned")
        shape = tuple(leaf.shape)
        axis = _nm_axis(name, shape, rule) if rule.n_m is not None else None
        chosen[name] = Selection(name, rule, shape, axis)
    for index, rule in enumerate(rules):
        if index not in used:
            warnings.warn(f"pruning rule {rule.pattern!r} matched no parameter", UnusedPruneRuleWarning, stacklevel=3)
    return chosen


def _nm_axis(name: str, shape: tuple[int, ...], rule: PruneRule) -> int:
    n, m = rule.n_m
    if rule.axis is not None:
        axis = rule.axis
    else:
        axis = len(shape) - 2 if len(shape) >= 4 else 0
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"{name}: N:M axis {axis} does not exist in a leaf of shape {shape}")
    axis %= len(shape)
    if shape[axis] % m:
        raise ValueError(
            f"{name}: N:M sparsity {n}:{m} needs axis {axis} (length {shape[axis]}) to be a multiple of M={m}; "
            f"shape {shape}"
        )
    return axis


def magnitude_scores(params: Any) -> Any:
    """``|w|`` for every leaf: the classic magnitude criterion."""
    return jax.tree.map(jnp.abs, params)


def random_scores(params: Any, *, seed: int = 0) -> Any:
    """Uniform random scores: pruning with them is the baseline every criterion must beat."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    return jax.tree.unflatten(treedef, [jax.random.uniform(k, jnp.shape(x)) for k, x in zip(keys, leaves)])


def mean_gradients(grad_fn: Callable[[Any, Any], Any], params: Any, batches: Iterable[Any]) -> Any:
    """The mean of ``grad_fn(params, batch)`` over calibration batches (at least one)."""
    total, count = None, 0
    for batch in batches:
        grads = grad_fn(params, batch)
        total = grads if total is None else jax.tree.map(jnp.add, total, grads)
        count += 1
    if count == 0:
        raise ValueError("need at least one calibration batch to average gradients over")
    return jax.tree.map(lambda g: g / count, total)


def importance_scores(grad_fn: Callable[[Any, Any], Any], params: Any, batches: Iterable[Any]) -> Any:
    """Taylor first-order importance ``mean_b |w * dL/dw|`` over calibration batches.

    The absolute value is taken per batch, so gradients of opposite sign in
    different batches (common once a model has converged) do not cancel.

    Args:
        grad_fn: ``grad_fn(params, batch) -> grads`` (shaped like ``params``);
            ``classification_grad_fn`` builds one for a reference classifier.
        params: the parameters to score.
        batches: calibration batches (at least one).

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"w": jnp.array([1.0, -2.0, 3.0])}
        >>> grad_fn = lambda p, batch: {"w": batch * jnp.ones(3)}
        >>> importance_scores(grad_fn, params, [1.0, 3.0])["w"].tolist()
        [2.0, 4.0, 6.0]
    """
    per_batch = (jax.tree.map(lambda w, g: jnp.abs(w * g), params, grad_fn(params, b)) for b in batches)
    return mean_gradients(lambda p, scores: scores, params, per_batch)


def calibration_batches(
    x: np.ndarray, y: np.ndarray, *, batch_size: int = 128, limit: int | None = None
) -> list[tuple]:
    """``(x, y)`` split into full batches (the remainder is dropped), at most ``limit`` of them."""
    count = max(1, len(x) // batch_size)
    if limit is not None:
        count = min(count, limit)
    size = min(batch_size, len(x))
    return [(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(count)]


def classification_grad_fn(config: Any, model_state: Mapping[str, Any] | None = None) -> Callable[[Any, Any], Any]:
    """``grad_fn(params, (x, labels))`` of the softmax cross-entropy of a reference classifier (eval mode)."""
    from jaxopt_serve.models.functional import make_apply

    apply = make_apply(config)
    state = dict(model_state or {})

    @jax.jit
    def grad_fn(params: Any, batch: Any) -> Any:
        x, labels = batch

        def loss(p):
            logits, _ = apply({"params": p, **state}, x, train=False)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))

        return jax.grad(loss)(params)

    return grad_fn


def compute_masks(
    params: Mapping[str, Any],
    rules: Sequence[PruneRule],
    scores: Any | None = None,
    *,
    scope: Scope = "layer",
    sparsity_at: Callable[[float], float | jax.Array] | None = None,
    selection: Mapping[str, Selection] | None = None,
) -> Any:
    """Boolean keep-masks for the leaves ``rules`` select (``None`` elsewhere).

    Args:
        params: the parameter tree.
        rules: ``PruneRule`` list; first match wins.
        scores: a tree like ``params``; higher means keep. Default ``|w|``.
        scope: ``"layer"``: each leaf loses its own share; ``"global"``: leaves
            with the same target sparsity are ranked together.
        sparsity_at: maps a rule's target sparsity to the sparsity to apply now
            (a gradual schedule passes one; the result may be traced). N:M
            leaves ignore it. Default: the target itself.
        selection: a precomputed ``select(params, rules)``.

    Example:
        >>> import numpy as np
        >>> params = {"dense": {"kernel": np.arange(1.0, 9.0).reshape(4, 2)}}
        >>> masks = compute_masks(params, [PruneRule(r".*kernel", 0.75)])
        >>> np.asarray(masks["dense"]["kernel"]).astype(int).tolist()
        [[0, 0], [0, 0], [0, 0], [1, 1]]
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    chosen = select(params, rules) if selection is None else selection
    sparsity_at = sparsity_at or (lambda target: target)
    scores = magnitude_scores(params) if scores is None else scores
    named = {f"{PREFIX}/{path_str(p)}": s for p, s in jax.tree_util.tree_leaves_with_path(scores)}
    masks: dict[str, jax.Array] = {}
    pools: dict[float, list[str]] = {}
    for name, sel in chosen.items():
        if name not in named:
            raise ValueError(f"{name}: no score for this parameter (scores must be shaped like params)")
        score = jnp.asarray(named[name])
        if score.shape != sel.shape:
            raise ValueError(f"{name}: score shape {score.shape} differs from the parameter's {sel.shape}")
        if sel.rule.n_m is not None:
            masks[name] = nm_mask(score, *sel.rule.n_m, axis=sel.axis)
        elif scope == "layer":
            masks[name] = _topk_keep([score], sparsity_at(sel.rule.sparsity))[0]
        else:
            pools.setdefault(sel.rule.sparsity, []).append(name)
    for sparsity, names in pools.items():
        for name, mask in zip(names, _topk_keep([jnp.asarray(named[n]) for n in names], sparsity_at(sparsity))):
            masks[name] = mask

    def leaf_mask(path, _leaf):
        return masks.get(f"{PREFIX}/{path_str(path)}")

    return jax.tree_util.tree_map_with_path(leaf_mask, params)


def _topk_keep(scores: list[jax.Array], sparsity: float | jax.Array) -> list[jax.Array]:
    """Masks that drop exactly ``round(sparsity * total)`` lowest scores across ``scores`` (stable ties)."""
    flat = jnp.concatenate([s.reshape(-1).astype(jnp.float32) for s in scores])
    drop = jnp.round(jnp.asarray(sparsity, jnp.float32) * flat.size).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    keep = jnp.ones(flat.size, bool).at[order].set(jnp.arange(flat.size) >= drop)
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.size].reshape(s.shape))
        start += s.size
    return out


def nm_mask(scores: jax.Array, n: int, m: int, *, axis: int = 0) -> jax.Array:
    """Keep the ``n`` highest scores in every run of ``m`` consecutive entries along ``axis``.

    Example:
        >>> import jax.numpy as jnp
        >>> nm_mask(jnp.array([[4.0, 1.0, 3.0, 2.0]]), 2, 4, axis=1).astype(int).tolist()
        [[1, 0, 1, 0]]
    """
    if n > m:
        raise ValueError(f"N:M sparsity needs N <= M, got {n}:{m}")
    scores = jnp.moveaxis(jnp.asarray(scores), axis, -1)
    if scores.shape[-1] % m:
        raise ValueError(f"N:M sparsity {n}:{m}: axis length {scores.shape[-1]} is not a multiple of M={m}")
    groups = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    ranks = jnp.argsort(jnp.argsort(-groups, axis=-1, stable=True), axis=-1, stable=True)
    keep = (ranks < n).reshape(scores.shape)
    return jnp.moveaxis(keep, -1, axis)


def is_nm_sparse(x: Any, n: int, m: int, *, axis: int = 0) -> bool:
    """Whether every run of ``m`` entries along ``axis`` has at most ``n`` non-zeros."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    if x.shape[-1] % m:
        return False
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    return bool(((groups != 0).sum(-1) <= n).all())


def apply_masks(params: Any, masks: Any) -> Any:
    """``params`` with masked-out entries set to exactly zero (leaves with a ``None`` mask unchanged)."""
    return jax.tree.map(
        lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros_like(p)), masks, params, is_leaf=lambda x: x is None
    )


@dataclasses.dataclass
class PruneResult:
    """Pruned params, their masks, and the sparsity of each pruned leaf."""

    params: Any
    masks: Any
    sparsity: dict[str, float]

    @property
    def overall(self) -> float:
        """Fraction of zeros over all pruned leaves together."""
        sizes = {n: int(np.prod(np.shape(m))) for n, m in _named_masks(self.masks).items()}
        total = sum(sizes.values())
        return sum(self.sparsity[n] * sizes[n] for n in sizes) / max(total, 1)


def prune(
    params: Mapping[str, Any],
    rules: Sequence[PruneRule] | None = None,
    *,
    scores: Any | None = None,
    scope: Scope = "layer",
) -> PruneResult:
    """One-shot unstructured pruning: masks from ``scores`` (default ``|w|``), applied to ``params``.

    Raises:
        ValueError: a selected leaf is not float or holds NaN/inf, or an N:M
            rule does not fit its leaf; the message names the path.

    Example:
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> params = init_variables(MLPConfig(features=(64,)), 0)["params"]
        >>> result = prune(params, [PruneRule(r"params/dense_0/kernel", 0.9)])
        >>> round(result.sparsity["params/dense_0/kernel"], 3), result.masks["classifier"]["kernel"] is None
        (0.9, True)
    """
    rules = list(default_prune_rules() if rules is None else rules)
    chosen = select(params, rules)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = f"{PREFIX}/{path_str(path)}"
        if name in chosen and not bool(jnp.isfinite(leaf).all()):
            raise ValueError(f"{name}: holds NaN or inf values; cannot rank its weights")
    masks = compute_masks(params, rules, scores, scope=scope, selection=chosen)
    pruned = apply_masks(params, masks)
    sparsity = {name: 1.0 - float(jnp.mean(m)) for name, m in _named_masks(masks).items()}
    return PruneResult(pruned, masks, sparsity)


def _named_masks(masks: Any) -> dict[str, Any]:
    return {
        f"{PREFIX}/{path_str(p)}": m
        for p, m in jax.tree_util.tree_leaves_with_path(masks, is_leaf=lambda x: x is None)
        if m is not None
    }


def tree_sparsity(tree: Any) -> float:
    """Fraction of exact zeros over every array in ``tree``."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    total = sum(x.size for x in leaves)
    return sum(int((x == 0).sum()) for x in leaves) / max(total, 1)
