"""Structured pruning: remove whole neurons, channels and heads, so the dense model itself shrinks.

A unit (a Dense output neuron, a conv output channel, an attention head, a
feed-forward neuron) lives in several arrays at once: the columns that produce
it, its bias, its batch-norm entries, and the rows of the next layer that
consume it. A ``Group`` lists those ``Slice``\\ s; removing unit ``i`` removes
index ``i`` along each slice's axis. The reference models ship their coupling
(``register_coupling``) together with the config rewrite that makes the
pruned variables an ordinary, smaller model; other models pass ``groups=``.

Anything not described is an error, never a silently broken model: a layer
named for pruning without a group, slices whose sizes disagree, and (when the
config is rewritten) variables that do not match the smaller model's shapes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_serve.models.cnn import CNNConfig
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables, init_variables
from jaxopt_serve.models.mlp import MLPConfig
from jaxopt_serve.models.nnx_mlp import NNXMLPConfig
from jaxopt_serve.models.transformer import TransformerConfig
from jaxopt_serve.prune.masks import check_sparsity
from jaxopt_serve.quant.rules import path_str

Criterion = Literal["l1", "l2", "taylor"]


@dataclasses.dataclass(frozen=True)
class Slice:
    """Unit ``i`` of a group is index ``i`` along ``axis`` of the variable at ``path``.

    ``repeat`` > 1 describes a flatten: the axis holds ``repeat`` blocks of
    ``n`` units (unit ``i`` at ``r * n + i``), e.g. the Dense rows after
    flattening an NHWC feature map of ``repeat = H * W`` positions.

    The general form, found by the automatic analysis (``prune.coupling``):
    unit ``i`` is the indices ``offset + r * period + i * block + j`` for
    ``r < repeat`` and ``j < block``; ``period`` 0 means ``n * block``. A
    head axis folded into a projection's columns is ``block = head size``;
    one half of a projection that a ``split`` cuts in two is ``offset``; a
    fused query/key/value projection is ``repeat = 3`` with ``period = heads
    * head size``. Several slices may name the same path and axis (a gated
    projection whose two halves belong to one unit).
    """

    path: str
    axis: int
    repeat: int = 1
    block: int = 1
    offset: int = 0
    period: int = 0

    def __post_init__(self) -> None:
        if self.repeat < 1 or self.block < 1 or self.offset < 0 or self.period < 0:
            raise ValueError(f"slice of {self.path}: repeat and block must be >= 1 and offset, period >= 0, got {self}")

    def units_in(self, length: int) -> int:
        """How many units an axis of ``length`` holds when the slice fills it (no offset, no explicit period)."""
        return (length - self.offset) // (self.repeat * self.block)

    def indices(self, n: int) -> np.ndarray:
        """``(n, repeat * block)`` indices along the axis: row ``i`` holds unit ``i``."""
        period = self.period or n * self.block
        base = self.offset + np.arange(self.repeat)[:, None] * period + np.arange(self.block)[None, :]
        return (np.arange(n)[:, None, None] * self.block + base[None]).reshape(n, -1)


@dataclasses.dataclass(frozen=True)
class Group:
    """Units that are removed together: every slice loses the same indices.

    ``size`` is the number of units; by default it is read from the first
    slice (its axis length divided by ``repeat * block``).
    """

    name: str
    slices: tuple[Slice, ...]
    size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "slices", tuple(self.slices))
        if not self.slices:
            raise ValueError(f"group {self.name!r} has no slices")


@dataclasses.dataclass(frozen=True)
class Coupling:
    """How a model family is pruned: its groups, and the config of the smaller model."""

    groups: Callable[[Any], list[Group]]
    rewrite: Callable[[Any, dict[str, int]], ModelConfig]


_COUPLINGS: dict[type, Coupling] = {}


def register_coupling(
    config_type: type, groups: Callable[[Any], list[Group]], rewrite: Callable[[Any, dict[str, int]], ModelConfig]
) -> None:
    """Teach ``structured_prune`` a model family: ``groups(config)`` and ``rewrite(config, kept_sizes)``."""
    _COUPLINGS[config_type] = Coupling(groups, rewrite)


def model_groups(config: ModelConfig) -> list[Group]:
    """The built-in groups of a reference model config.

    Example:
        >>> [g.name for g in model_groups(MLPConfig(features=(8, 8)))]
        ['dense_0', 'dense_1']
    """
    coupling = _COUPLINGS.get(type(config))
    if coupling is None:
        raise ValueError(
            f"model {config.name!r} ({type(config).__name__}) has no built-in coupling description; "
            f"pass groups=[Group(...)] listing which parameters are coupled "
            f"(and register_coupling for a config rewrite)"
        )
    return coupling.groups(config)


@dataclasses.dataclass
class StructuredResult:
    """A structurally pruned model.

    Attributes:
        config: the smaller model's config (``None`` when groups were given
            for a model without a registered rewrite).
        variables: the smaller dense variables.
        kept: kept unit indices per group (sorted).
        sizes: ``(before, after)`` unit counts per group.
    """

    config: ModelConfig | None
    variables: Variables
    kept: dict[str, np.ndarray]
    sizes: dict[str, tuple[int, int]]


def group_scores(
    variables: Variables, groups: Sequence[Group], *, criterion: Criterion = "l1", grads: Any | None = None
) -> dict[str, np.ndarray]:
    """One importance score per unit of every group (higher = keep).

    ``"l1"`` / ``"l2"``: the norm of all the unit's parameters across its
    slices; ``"taylor"``: ``|sum(w * dL/dw)|`` over them (first-order change of
    the loss when the unit is removed), which needs ``grads`` shaped like
    ``variables["params"]``. Batch statistics are not scored.
    """
    if criterion not in ("l1", "l2", "taylor"):
        raise ValueError(f"criterion must be 'l1', 'l2' or 'taylor', got {criterion!r}")
    if criterion == "taylor" and grads is None:
        raise ValueError("criterion 'taylor' (gradient x weight) needs grads= shaped like variables['params']")
    leaves = _named(variables)
    grad_leaves = _named({"params": grads}) if grads is not None else {}
    sizes = check_groups(variables, groups)
    scores = {}
    for group in groups:
        n = sizes[group.name]
        total = np.zeros(n, np.float64)
        for sl in group.slices:
            if not sl.path.startswith("params/"):
                continue
            w = _units(np.asarray(leaves[sl.path], np.float64), sl, n)
            if criterion == "l1":
                total += np.abs(w).sum(axis=1)
            elif criterion == "l2":
                total += (w**2).sum(axis=1)
            else:
                g = _units(np.asarray(grad_leaves[sl.path], np.float64), sl, n)
                total += (w * g).sum(axis=1)
        scores[group.name] = np.sqrt(total) if criterion == "l2" else np.abs(total)
    return scores


def _units(x: np.ndarray, sl: Slice, n: int) -> np.ndarray:
    """``x`` as ``(n, rest)``: row ``i`` holds every entry of unit ``i`` in this slice."""
    moved = np.moveaxis(x, sl.axis, 0)
    return moved[sl.indices(n)].reshape(n, -1)


def check_groups(variables: Variables, groups: Sequence[Group]) -> dict[str, int]:
    """Units per group; ``ValueError`` naming the path when a slice does not fit the variables."""
    leaves = _named(variables)
    sizes: dict[str, int] = {}
    names = [g.name for g in groups]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"group names must be unique, got duplicates {duplicates}")
    for group in groups:
        n = group.size
        for sl in group.slices:
            if sl.path not in leaves:
                raise ValueError(
                    f"group {group.name!r}: no variable at {sl.path}; variables have {sorted(leaves)[:8]}..."
                )
            shape = np.shape(leaves[sl.path])
            if not -len(shape) <= sl.axis < len(shape):
                raise ValueError(f"group {group.name!r}: {sl.path} has shape {shape}, no axis {sl.axis}")
            length = shape[sl.axis]
            if n is None and sl.offset == 0 and sl.period == 0 and length % (sl.repeat * sl.block):
                raise ValueError(
                    f"group {group.name!r}: {sl.path} axis {sl.axis} (length {length}) is not {sl.repeat} "
                    f"blocks of units of {sl.block}"
                )
            units = sl.units_in(length) if n is None else n
            if n is None:
                n = units
            elif sl.offset == 0 and sl.period == 0 and sl.units_in(length) != n and group.size is None:
                raise ValueError(
                    f"group {group.name!r}: {sl.path} axis {sl.axis} holds {sl.units_in(length)} units, "
                    f"the group's first "
                    f"slice {group.slices[0].path} holds {n}; coupled slices must agree"
                )
            if n and sl.indices(n).max() >= length:
                raise ValueError(
                    f"group {group.name!r}: {sl.path} axis {sl.axis} (length {length}) is too short for "
                    f"{n} units of {sl}"
                )
        sizes[group.name] = n
    return sizes


def kept_count(n: int, sparsity: float, *, multiple: int = 1) -> int:
    """Units left of ``n`` after removing ``round(sparsity * n)``, rounded to a multiple of ``multiple``.

    At least one unit (``multiple`` when it fits) stays; a group of at most
    ``multiple`` units is kept whole.

    Example:
        >>> kept_count(64, 0.5), kept_count(100, 0.5, multiple=8), kept_count(6, 0.5, multiple=8)
        (32, 48, 6)
    """
    keep = n - int(round(sparsity * n))
    if multiple > 1 and keep < n:
        keep = multiple * max(1, int(round(keep / multiple)))
    return int(min(n, max(1, keep)))


def plan(
    variables: Variables,
    groups: Sequence[Group],
    sparsity: float | Mapping[str, float],
    *,
    criterion: Criterion = "l1",
    grads: Any | None = None,
    multiple: int = 1,
    scope: Literal["layer", "global"] = "layer",
) -> dict[str, np.ndarray]:
    """Which units to keep in each group: the highest-scoring ``n - round(s * n)`` (at least one).

    ``sparsity`` is one fraction for every group, or ``{group-name regex: fraction}``
    (first match wins; groups matched by no key are kept whole). A key that
    matches no group is an error: that layer has no coupling description.
    ``multiple`` rounds every kept count to a multiple (8 or 128 suit CPU and
    accelerator tiles). ``scope="global"`` ranks the units of all groups
    together (each group's scores divided by their mean, so layers of
    different scales compare) and removes the lowest ``round(s * total)``;
    it needs one fraction for every group.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    names = [g.name for g in groups]
    if isinstance(sparsity, Mapping):
        if scope == "global":
            raise ValueError("scope='global' ranks all groups against one fraction: pass a float sparsity")
        targets: dict[str, float] = {}
        for pattern, value in sparsity.items():
            check_sparsity(value, f"structured sparsity for {pattern!r}")
            matched = [n for n in names if re.fullmatch(pattern, n)]
            if not matched:
                raise ValueError(
                    f"structured pruning of {pattern!r}: no coupling description matches this layer; "
                    f"known groups: {names}. Describe it with groups=[Group(...)]"
                )
            for name in matched:
                targets.setdefault(name, float(value))
    else:
        value = check_sparsity(sparsity, "structured sparsity")
        targets = {n: value for n in names}
    scores = group_scores(variables, groups, criterion=criterion, grads=grads)
    if scope == "global" and names:
        targets = _global_targets(scores, float(sparsity))
    kept = {}
    for name in names:
        n = len(scores[name])
        keep = kept_count(n, targets.get(name, 0.0), multiple=multiple)
        kept[name] = np.sort(np.argsort(-scores[name], kind="stable")[:keep])
    return kept


def _global_targets(scores: Mapping[str, np.ndarray], sparsity: float) -> dict[str, float]:
    """Per-group fractions that remove the globally lowest mean-normalized scores."""
    names = list(scores)
    normed = [scores[n] / max(float(np.mean(scores[n])), 1e-30) for n in names]
    owner = np.concatenate([np.full(len(s), i) for i, s in enumerate(normed)])
    order = np.argsort(np.concatenate(normed), kind="stable")
    removed = np.zeros(len(names), int)
    budget = int(round(sparsity * len(order)))
    for k in order:
        if budget == 0:
            break
        if removed[owner[k]] + 1 < len(normed[owner[k]]):
            removed[owner[k]] += 1
            budget -= 1
    return {n: removed[i] / len(normed[i]) for i, n in enumerate(names)}


def _removed(
    variables: Variables, groups: Sequence[Group], kept: Mapping[str, np.ndarray]
) -> dict[str, dict[int, np.ndarray]]:
    """Per path and axis, the indices that the removed units occupy (all groups and slices together)."""
    sizes = check_groups(variables, groups)
    leaves = _named(variables)
    removed: dict[str, dict[int, list[np.ndarray]]] = {}
    for group in groups:
        n = sizes[group.name]
        dropped = np.setdiff1d(np.arange(n), np.asarray(kept[group.name], dtype=int))
        for sl in group.slices:
            axis = sl.axis % np.ndim(leaves[sl.path])
            removed.setdefault(sl.path, {}).setdefault(axis, []).append(sl.indices(n)[dropped].ravel())
    return {p: {a: np.unique(np.concatenate(ix)) for a, ix in axes.items()} for p, axes in removed.items()}


def apply_plan(variables: Variables, groups: Sequence[Group], kept: Mapping[str, np.ndarray]) -> Variables:
    """The smaller variables: every slice keeps only its group's kept units."""
    removed = _removed(variables, groups, kept)

    def leaf(path, x):
        for axis, index in removed.get(path_str(path), {}).items():
            keep = np.setdiff1d(np.arange(np.shape(x)[axis]), index)
            x = jnp.take(x, jnp.asarray(keep), axis=axis)
        return x

    return jax.tree_util.tree_map_with_path(leaf, variables)


def mask_plan(variables: Variables, groups: Sequence[Group], kept: Mapping[str, np.ndarray]) -> Variables:
    """The full-size variables with every removed unit's slices set to zero (same function as ``apply_plan``'s
    model)."""
    removed = _removed(variables, groups, kept)

    def leaf(path, x):
        for axis, index in removed.get(path_str(path), {}).items():
            shape = [1] * np.ndim(x)
            shape[axis] = np.shape(x)[axis]
            keep = np.ones(np.shape(x)[axis], bool)
            keep[index] = False
            x = jnp.where(jnp.asarray(keep.reshape(shape)), x, jnp.zeros_like(x))
        return x

    return jax.tree_util.tree_map_with_path(leaf, variables)


def structured_prune(
    config: ModelConfig | None,
    variables: Variables,
    sparsity: float | Mapping[str, float],
    *,
    criterion: Criterion = "l1",
    grads: Any | None = None,
    groups: Sequence[Group] | None = None,
    rewrite: Callable[[Any, dict[str, int]], ModelConfig] | None = None,
) -> StructuredResult:
    """Remove the least important units of each group; returns the smaller model.

    Args:
        config: the model's config (a reference model, or any config when ``groups`` is given).
        variables: ``{"params": ..., "batch_stats": ...}``.
        sparsity: fraction of units to remove, or ``{group-name regex: fraction}``.
        criterion: ``"l1"``, ``"l2"`` (norms) or ``"taylor"`` (gradient x weight, needs ``grads``).
        grads: gradients shaped like ``variables["params"]`` (see ``masks.mean_gradients``).
        groups: the coupling description, for models without a built-in one.
        rewrite: ``rewrite(config, {group: kept units}) -> smaller config``, for such models.

    Raises:
        ValueError: a layer without coupling information, slices that do not
            agree, or a result that does not match the rewritten config's shapes.

    Example:
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> cfg = MLPConfig(features=(32, 16))
        >>> result = structured_prune(cfg, init_variables(cfg, 0), 0.5)
        >>> result.config.features, result.variables["params"]["dense_1"]["kernel"].shape
        ((16, 8), (16, 8))
    """
    if groups is None:
        if config is None:
            raise ValueError("structured_prune needs a config or groups=")
        groups = model_groups(config)
        rewrite = rewrite or _COUPLINGS[type(config)].rewrite
    elif rewrite is None and config is not None and type(config) in _COUPLINGS:
        rewrite = _COUPLINGS[type(config)].rewrite
    groups = list(groups)
    kept = plan(variables, groups, sparsity, criterion=criterion, grads=grads)
    sizes = check_groups(variables, groups)
    smaller = apply_plan(variables, groups, kept)
    new_config = None
    if rewrite is not None and config is not None:
        new_config = rewrite(config, {name: len(idx) for name, idx in kept.items()})
        _check_against(new_config, smaller)
    return StructuredResult(new_config, smaller, kept, {n: (sizes[n], len(kept[n])) for n in sizes})


def _check_against(config: ModelConfig, variables: Variables) -> None:
    expected = jax.eval_shape(lambda: init_variables(config, 0))
    want = _named(expected)
    have = _named(variables)
    for name, spec in want.items():
        if name not in have:
            raise ValueError(f"structured pruning lost {name}; the coupling description is incomplete")
        if tuple(np.shape(have[name])) != tuple(spec.shape):
            raise ValueError(
                f"structured pruning left {name} with shape {tuple(np.shape(have[name]))}, the smaller model expects "
                f"{tuple(spec.shape)}: a layer coupled to a pruned one is missing from the coupling description"
            )


def _named(tree: Any) -> dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# -- the reference models ---------------------------------------------------------------------------


def _dense_group(name: str, consumer: str) -> Group:
    return Group(
        name,
        (
            Slice(f"params/{name}/kernel", 1),
            Slice(f"params/{name}/bias", 0),
            Slice(f"params/{consumer}/kernel", 0),
        ),
    )


def _mlp_groups(config: MLPConfig | NNXMLPConfig) -> list[Group]:
    n = len(config.features)
    return [_dense_group(f"dense_{i}", f"dense_{i + 1}" if i + 1 < n else "classifier") for i in range(n)]


def _mlp_rewrite(config: MLPConfig | NNXMLPConfig, kept: dict[str, int]) -> ModelConfig:
    return config.replace(features=tuple(kept[f"dense_{i}"] for i in range(len(config.features))))


def _cnn_groups(config: CNNConfig) -> list[Group]:
    layers = len(config.channels) * config.convs_per_stage
    groups = []
    for i in range(layers):
        consumer = (
            Slice(f"params/conv_{i + 1}/kernel", 2)
            if i + 1 < layers
            else Slice(f"params/{'dense' if config.hidden else 'classifier'}/kernel", 0)
        )
        groups.append(
            Group(
                f"conv_{i}",
                (
                    Slice(f"params/conv_{i}/kernel", 3),
                    Slice(f"params/bn_{i}/scale", 0),
                    Slice(f"params/bn_{i}/bias", 0),
                    Slice(f"batch_stats/bn_{i}/mean", 0),
                    Slice(f"batch_stats/bn_{i}/var", 0),
                    consumer,
                ),
            )
        )
    if config.hidden:
        groups.append(_dense_group("dense", "classifier"))
    return groups


def _cnn_rewrite(config: CNNConfig, kept: dict[str, int]) -> ModelConfig:
    per = config.convs_per_stage
    channels = []
    for stage in range(len(config.channels)):
        widths = {kept[f"conv_{stage * per + j}"] for j in range(per)}
        if len(widths) != 1:
            raise ValueError(
                f"CNN stage {stage} would get different widths {sorted(widths)} for its {per} convs; CNNConfig has "
                f"one width per stage: give its convs the same sparsity"
            )
        channels.append(widths.pop())
    return config.replace(channels=tuple(channels), hidden=kept.get("dense", config.hidden) if config.hidden else 0)


def _transformer_groups(config: TransformerConfig) -> list[Group]:
    groups = []
    for i in range(config.num_layers):
        att = f"params/layer_{i}/attention"
        head_slices = [
            Slice(f"{att}/{p}/{leaf}", 1 if leaf == "kernel" else 0)
            for p in ("query", "key", "value")
            for leaf in ("kernel", "bias")
        ]
        groups.append(Group(f"layer_{i}/heads", (*head_slices, Slice(f"{att}/out/kernel", 0))))
        groups.append(
            Group(
                f"layer_{i}/ffn",
                (
                    Slice(f"params/layer_{i}/intermediate/kernel", 1),
                    Slice(f"params/layer_{i}/intermediate/bias", 0),
                    Slice(f"params/layer_{i}/output/kernel", 0),
                ),
            )
        )
    return groups


def _transformer_rewrite(config: TransformerConfig, kept: dict[str, int]) -> ModelConfig:
    layers = range(config.num_layers)
    return config.replace(
        num_heads=tuple(kept[f"layer_{i}/heads"] for i in layers),
        head_dim=config.resolved_head_dim,
        mlp_dim=tuple(kept[f"layer_{i}/ffn"] for i in layers),
    )


register_coupling(MLPConfig, _mlp_groups, _mlp_rewrite)
register_coupling(NNXMLPConfig, _mlp_groups, _mlp_rewrite)
register_coupling(CNNConfig, _cnn_groups, _cnn_rewrite)
register_coupling(TransformerConfig, _transformer_groups, _transformer_rewrite)
