"""Device meshes and sharding rules: data parallel, model (tensor) parallel, or both.

A mesh has a ``"data"`` axis (the batch is split along it) and a ``"model"``
axis (variables are split along it by path rules). Rules are regexes over
variable paths (``"params/dense_0/kernel"``), first match wins, each with a
``PartitionSpec`` for that leaf; leaves no rule matches are replicated.
``model_parallel_rules(config)`` gives the usual Megatron-style layout for the
reference models: Dense kernels alternately column- and row-parallel,
attention heads, feed-forward neurons and conv output channels split across
``"model"``. Quantized leaves (``QArray``) shard their values like the float
kernel they replace and their scales along the axes they share with it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxopt_serve.models.cnn import CNNConfig
from jaxopt_serve.models.mlp import MLPConfig
from jaxopt_serve.models.nnx_mlp import NNXMLPConfig
from jaxopt_serve.models.transformer import TransformerConfig
from jaxopt_serve.quant.qarray import QArray, is_qarray
from jaxopt_serve.quant.rules import path_str
from jaxopt_serve.trace import path_of

DATA, MODEL = "data", "model"


@dataclasses.dataclass(frozen=True)
class ShardingRule:
    """Shard the leaves whose path fully matches ``pattern`` with ``spec`` (a ``PartitionSpec`` or a tuple)."""

    pattern: str
    spec: Any

    def __post_init__(self) -> None:
        re.compile(self.pattern)
        object.__setattr__(self, "spec", self.spec if isinstance(self.spec, P) else P(*self.spec))


def make_mesh(data: int = 1, model: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "model")`` mesh of ``data x model`` devices (Auto axes, so XLA reshards as needed).

    Raises:
        ValueError: the mesh does not fit the devices (its size must divide their number).

    Example:
        >>> mesh = make_mesh(data=1, model=1)
        >>> dict(mesh.shape)
        {'data': 1, 'model': 1}
    """
    devices = list(devices if devices is not None else jax.devices())
    for name, size in (("data", data), ("model", model)):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"mesh axis {name!r} must be a positive int, got {size!r}")
    if len(devices) % (data * model):
        raise ValueError(
            f"a {data} x {model} mesh needs a device count divisible by {data * model}; "
            f"there are {len(devices)} devices"
        )
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def model_parallel_rules(config: Any, *, size: int | None = None) -> list[ShardingRule]:
    """Tensor-parallel rules (split along the mesh's ``"model"`` axis) for a reference config or any ``Model``.

    For a ``Model`` the rules come from its traced program: every weight (a
    parameter used as the weight of a dot product or convolution) is split along
    an output-feature axis (for an attention projection, the heads before the
    head dimension) that ``size`` (the mesh's ``"model"`` axis) divides; other
    leaves are replicated. No contracted axis is split. Pass your own
    ``ShardingRule`` s to override.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_serve.model import Model
        >>> m = Model.function(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 8))}, jnp.ones((1, 4)))
        >>> model_parallel_rules(m, size=2)
        [ShardingRule(pattern='params/w', spec=P(None, 'model'))]
    """
    from jaxopt_serve.model import Model

    if isinstance(config, Model):
        return _traced_rules(config, size)
    if isinstance(config, (MLPConfig, NNXMLPConfig)):
        rules = []
        for i in range(len(config.features)):
            if i % 2 == 0:  # column-parallel: split output neurons (and the bias)
                rules += [
                    ShardingRule(rf"params/dense_{i}/kernel", (None, MODEL)),
                    ShardingRule(rf"params/dense_{i}/bias", (MODEL,)),
                ]
            else:  # row-parallel: split input rows; XLA sums the partial products
                rules.append(ShardingRule(rf"params/dense_{i}/kernel", (MODEL, None)))
        return rules
    if isinstance(config, CNNConfig):
        return [
            ShardingRule(r"params/conv_\d+/kernel", (None, None, None, MODEL)),
            ShardingRule(r"params/bn_\d+/(scale|bias)", (MODEL,)),
            ShardingRule(r"batch_stats/bn_\d+/(mean|var)", (MODEL,)),
            ShardingRule(r"params/dense/kernel", (None, MODEL)),
            ShardingRule(r"params/dense/bias", (MODEL,)),
        ]
    if isinstance(config, TransformerConfig):
        att = r"params/layer_\d+/attention"
        return [
            ShardingRule(rf"{att}/(query|key|value)/kernel", (None, MODEL, None)),
            ShardingRule(rf"{att}/(query|key|value)/bias", (MODEL, None)),
            ShardingRule(rf"{att}/out/kernel", (MODEL, None, None)),
            ShardingRule(r"params/layer_\d+/intermediate/kernel", (None, MODEL)),
            ShardingRule(r"params/layer_\d+/intermediate/bias", (MODEL,)),
            ShardingRule(r"params/layer_\d+/output/kernel", (MODEL, None)),
        ]
    raise ValueError(f"no built-in model-parallel rules for {config.name!r}; pass rules=[ShardingRule(...)]")


def _traced_rules(model: Any, size: int | None) -> list[ShardingRule]:
    from jaxopt_serve.quant.select import weight_axes

    leaves = {path_of(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(model.variables, is_leaf=is_qarray)}
    rules = []
    for path, axes in weight_axes(model).items():
        shape = leaves[path].shape if is_qarray(leaves[path]) else np.shape(leaves[path])
        # Output features, never a contracted axis: the first one the mesh divides (attention heads before
        # the head dimension, so the attention's own contractions stay whole).
        axis = next((a for a in axes.free if size is None or shape[a] % size == 0), None)
        if axis is not None:
            rules.append(ShardingRule(re.escape(path), (None,) * axis + (MODEL,)))
    return rules


def variable_specs(variables: Mapping[str, Any], rules: Sequence[ShardingRule], mesh: Mesh) -> Any:
    """A tree of ``PartitionSpec`` like ``variables`` (QArray leaves get a QArray-shaped tree of specs).

    Raises:
        ValueError: a rule's spec has more axes than its leaf, names an axis
            the mesh lacks, or splits a dimension the mesh axis does not divide
            (the message names the path, the dimension and the axis size).
    """

    def spec_for(path, leaf):
        name = path_str(path)
        rule = next((r for r in rules if re.fullmatch(r.pattern, name)), None)
        shape = leaf.shape if isinstance(leaf, QArray) else np.shape(leaf)
        spec = rule.spec if rule is not None else P()
        _check_spec(name, shape, spec, mesh)
        if isinstance(leaf, QArray):
            return _qarray_specs(leaf, spec)
        return spec

    return jax.tree_util.tree_map_with_path(spec_for, dict(variables), is_leaf=is_qarray)


def _check_spec(name: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"{name}: sharding spec {spec} has {len(spec)} axes, the variable has shape {tuple(shape)}")
    for dim, axis in enumerate(spec):
        if axis is None:
            continue
        names = axis if isinstance(axis, tuple) else (axis,)
        size = 1
        for n in names:
            if n not in mesh.shape:
                raise ValueError(
                    f"{name}: sharding spec {spec} names mesh axis {n!r}; the mesh has {tuple(mesh.shape)}"
                )
            size *= mesh.shape[n]
        if shape[dim] % size:
            raise ValueError(
                f"{name}: dimension {dim} (size {shape[dim]}) of shape {tuple(shape)} is not divisible by mesh axis "
                f"{axis!r} of size {size}"
            )


def _qarray_specs(q: QArray, spec: P) -> QArray:
    full = tuple(spec) + (None,) * (len(q.shape) - len(spec))
    values = P(*full) if tuple(q.values.shape) == tuple(q.shape) and not q.transposed else P()

    def along(x):  # scales / zero points: keep the kernel's split where they have the full dimension
        if x is None:
            return None
        if np.ndim(x) == len(q.shape):
            dims = tuple(axis if np.shape(x)[d] == q.shape[d] else None for d, axis in enumerate(full))
        else:
            dims = ()
        return P(*dims)

    return dataclasses.replace(q, values=values, scale=along(q.scale), zero_point=along(q.zero_point))


def shard_variables(variables: Mapping[str, Any], mesh: Mesh, rules: Sequence[ShardingRule] = ()) -> Any:
    """``variables`` placed on ``mesh``: replicated, or split by ``rules``."""
    specs = variable_specs(variables, rules, mesh)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    # From host copies, so that with several processes each one places its own shards.
    return jax.device_put(jax.device_get(dict(variables)), shardings)
