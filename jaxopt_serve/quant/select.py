"""Which parameters are weights, found from the model itself (its traced program), not from layer names.

A *weight* is a float parameter of rank >= 2 whose every use is the weight
operand of a dot product (``@``, ``jnp.einsum``, any Dense / Linear /
attention projection) or of a convolution, possibly through reshapes,
transposes and dtype converts. Embedding tables (read by ``gather``), norm
scales and biases are not weights. ``model_rules`` turns the weights into
quantization rules, with the first and last weight layers (in program order)
treated separately when a recipe wants them kept at higher precision.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxopt_serve.model import Model
    >>> f = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
    >>> m = Model.function(f, {"w1": jnp.ones((4, 8)), "b1": jnp.ones(8), "w2": jnp.ones((8, 2))}, jnp.ones((1, 4)))
    >>> weight_paths(m)
    ['params/w1', 'params/w2']
    >>> [(r.pattern, r.spec) for r in model_rules(m, last=None)][1]
    ('params/w2', None)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_serve.model import LIBRARY_COLLECTIONS, Model
from jaxopt_serve.quant.qarray import QuantSpec, is_qarray, resolve_axis
from jaxopt_serve.quant.rules import QuantRule
from jaxopt_serve.trace import Use, leaf_uses, path_of

WEIGHT_OPERATIONS = ("dot_general", "conv_general_dilated")


def param_uses(model: Model, variables: Any | None = None) -> dict[str, list[Use]]:
    """``{params leaf path: its uses in program order}`` (traced with the model's example, not run)."""
    variables = model.variables if variables is None else variables
    model_vars = {k: v for k, v in variables.items() if k not in LIBRARY_COLLECTIONS}
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), _dtype(a)), model_vars, is_leaf=is_qarray)
    names = [path_of(p) for p, _ in jax.tree_util.tree_leaves_with_path(shapes)]
    tagged = [n for n in names if n.startswith("params/")]
    uses: dict[str, list[Use]] = {n: [] for n in tagged}
    for use in leaf_uses(model.apply_fn, shapes, *model.batch_spec(model.batch_size), tag=tagged):
        uses[use.path].append(use)
    return uses


def _dtype(a: Any) -> Any:
    return a.dtype if hasattr(a, "dtype") else np.result_type(a)


def weight_paths(model: Model, variables: Any | None = None) -> list[str]:
    """The model's weights (see the module docstring), ordered by their first use in the program."""
    return _weights(model, variables)[0]


def _weights(model: Model, variables: Any | None) -> tuple[list[str], dict[str, list[Use]], Any]:
    """One trace: ``(weight paths in first-use order, every params leaf's uses, the variables looked at)``."""
    variables = model.variables if variables is None else variables
    leaves = {path_of(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(variables, is_leaf=is_qarray)}
    uses = param_uses(model, variables)
    found = []
    for path, leaf_uses_ in uses.items():
        leaf = leaves[path]
        if not leaf_uses_ or len(np.shape(leaf)) < 2 or not jnp.issubdtype(_dtype(leaf), jnp.floating):
            continue
        if all(_is_weight_use(u) for u in leaf_uses_):
            found.append((min(u.order for u in leaf_uses_), max(u.order for u in leaf_uses_), path))
    return [path for *_, path in sorted(found)], uses, variables


def _is_weight_use(use: Use) -> bool:
    if use.primitive == "dot_general":
        return True
    return use.primitive == "conv_general_dilated" and use.operand == 1


def weight_layers(model: Model, variables: Any | None = None) -> tuple[str, str]:
    """``(first, last)``: the weight used first and the weight used last in the program."""
    paths, uses, _ = _weights(model, variables)
    return _ends(model, paths, uses)


def _ends(model: Model, paths: list[str], uses: dict[str, list[Use]]) -> tuple[str, str]:
    if not paths:
        raise ValueError(f"{model.name}: no parameter is used as the weight of a dot product or convolution")
    return paths[0], max(paths, key=lambda p: max(u.order for u in uses[p]))


Ends = QuantSpec | None | Literal["same"]


def model_rules(
    model: Model,
    spec: QuantSpec | None = None,
    *,
    first: Ends = "same",
    last: Ends = "same",
    variables: Any | None = None,
) -> list[QuantRule]:
    """Quantization rules for every weight of ``model``, one rule per leaf.

    Args:
        model: the model.
        spec: how to quantize the weights (default ``QuantSpec()``, int8 per channel). A per-group
            spec falls back to per-channel on a weight whose axes the group size does not divide.
        first: the first weight layer's spec: ``"same"``, another ``QuantSpec``, or ``None`` (keep float).
        last: the same for the last weight layer (usually the classifier).
        variables: the variables to look at (default: the model's own).
    """
    spec = spec or QuantSpec()
    paths, uses, variables = _weights(model, variables)
    head, tail = _ends(model, paths, uses)
    leaves = {path_of(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(variables, is_leaf=is_qarray)}
    rules = []
    for path in paths:
        chosen: Any = _fitting(spec, tuple(np.shape(leaves[path])), path)
        if path == tail and last != "same":
            chosen = last
        elif path == head and first != "same":
            chosen = first
        rules.append(QuantRule(re.escape(path), chosen))
    return rules


def int4_rules(model: Model, *, group_size: int = 16, variables: Any | None = None) -> list[QuantRule]:
    """The int4 recipe: weights int4 per group (asymmetric, MSE-clipped), the first and last weight layers int8.

    The first layer reads raw inputs and the last decides every logit; both hold
    few weights, so int8 there costs little size and keeps most of the accuracy
    (measured on six foreign models: minimum per-example logit cosine 0.981
    against 0.869 with every layer int4, see ``tests/foreign``). Run it weight-only.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_serve.model import Model
        >>> f = lambda p, x: (x @ p["a"]) @ p["b"] @ p["c"]
        >>> m = Model.function(f, {k: jnp.ones((32, 32)) for k in "abc"}, jnp.ones((1, 32)))
        >>> [r.spec.qtype for r in int4_rules(m)]
        ['int8', 'int4', 'int8']
    """
    spec = QuantSpec(qtype="int4", granularity="group", group_size=group_size, symmetric=False, calibration="mse")
    return model_rules(model, spec, first=QuantSpec(), last=QuantSpec(), variables=variables)


def _fitting(spec: QuantSpec, shape: tuple[int, ...], path: str) -> QuantSpec:
    if spec.granularity != "group":
        return spec
    try:
        resolve_axis(shape, spec, name=path)
        return spec
    except ValueError:
        return dataclasses.replace(spec, granularity="channel", group_size=None, axis=None)


@dataclasses.dataclass(frozen=True)
class WeightAxes:
    """Axes of a stored weight as its first use sees them: the contracted ones and the output features."""

    contract: tuple[int, ...]
    output: int | None
    primitive: str = "dot_general"
    free: tuple[int, ...] = ()

    @property
    def input(self) -> int | None:
        """The input-feature axis: a conv kernel's input channels, a dot's last contracted axis."""
        if not self.contract:
            return None
        return self.contract[0] if self.primitive == "conv_general_dilated" else self.contract[-1]


def weight_axes(model: Model, variables: Any | None = None) -> dict[str, WeightAxes]:
    """``{weight path: WeightAxes}`` of the stored leaves.

    For a dot, the contracted axes and the weight's last free (neither contracted
    nor batched) axis; for a convolution, the kernel's input-feature and spatial
    axes and its output-feature axis. Weights whose use goes through a reshape
    that mixes axes are left out.
    """
    from jaxopt_serve.trace import view_axes

    paths, uses, variables = _weights(model, variables)
    out: dict[str, WeightAxes] = {}
    for path in paths:
        use = uses[path][0]
        axes = view_axes(use.views, _leaf_ndim(variables, path))
        if axes is None:
            continue
        if use.primitive == "dot_general":
            (lc, rc), (lb, rb) = use.params["dimension_numbers"]
            contract, batch = (rc, rb) if use.operand == 1 else (lc, lb)
            free = [a for a in range(len(axes)) if a not in contract and a not in batch]
            out[path] = WeightAxes(
                tuple(axes[c] for c in contract),
                axes[free[-1]] if free else None,
                use.primitive,
                tuple(axes[f] for f in free),
            )
        else:
            spec = use.params["dimension_numbers"].rhs_spec
            out[path] = WeightAxes(tuple(axes[a] for a in spec[1:]), axes[spec[0]], use.primitive, (axes[spec[0]],))
    return out


def weight_output_axes(model: Model, variables: Any | None = None) -> dict[str, int]:
    """``{weight path: the axis of the stored leaf that holds its output features}`` (see ``weight_axes``)."""
    return {p: w.output for p, w in weight_axes(model, variables).items() if w.output is not None}


def _leaf_ndim(tree: Any, path: str) -> int:
    for part in path.split("/"):
        tree = tree[part]
    return len(np.shape(tree)) if not is_qarray(tree) else tree.ndim


def paths_matching(paths: Sequence[str], pattern: str) -> list[str]:
    """The paths a regular expression matches in full."""
    compiled = re.compile(pattern)
    return [p for p in paths if compiled.fullmatch(p)]
