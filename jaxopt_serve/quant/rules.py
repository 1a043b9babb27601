"""Quantize a whole variable tree, leaf by leaf, selected by path rules (first match wins)."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_serve.quant.qarray import QArray, QuantSpec, is_qarray, quantize_array


class UnusedRuleWarning(UserWarning):
    """A quantization rule matched no parameter."""


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """Quantize the leaves whose path fully matches ``pattern`` with ``spec`` (``None``: keep float).

    Paths join the keys with ``/``, collection first: ``"params/conv_0/kernel"``,
    ``"params/layer_1/attention/query/kernel"``.

    Example:
        >>> QuantRule(r".*/kernel", QuantSpec(qtype="int8")).matches("params/dense_0/kernel")
        True
    """

    pattern: str
    spec: QuantSpec | None = dataclasses.field(default_factory=QuantSpec)

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"QuantRule pattern {self.pattern!r} is not a valid regex: {err}") from err
        if self.spec is not None and not isinstance(self.spec, QuantSpec):
            raise TypeError(
                f"QuantRule {self.pattern!r}: spec must be a QuantSpec or None, got {type(self.spec).__name__}"
            )

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None


def default_rules(spec: QuantSpec | None = None) -> list[QuantRule]:
    """Every Dense / DenseGeneral / Conv / Linear ``kernel`` in ``params``; biases, norms and embeddings stay float."""
    return [QuantRule(r"params/(.*/)?kernel", spec or QuantSpec())]


def grouped_rules(
    variables: Mapping[str, Any], spec: QuantSpec, *, pattern: str = r"params/(.*/)?kernel"
) -> list[QuantRule]:
    """One rule per leaf matching ``pattern``: ``spec`` (per-group) where its group size fits, else per-channel.

    A group size that does not divide a kernel's contraction axis is an error
    in ``quantize``; this helper makes the choice explicit instead, e.g. for a
    first conv whose kernel ``(3, 3, 1, C)`` has no axis a group of 32 fits.

    Example:
        >>> import numpy as np
        >>> v = {"params": {"a": {"kernel": np.ones((64, 8), np.float32)},
        ...                 "b": {"kernel": np.ones((3, 8), np.float32)}}}
        >>> spec = QuantSpec(qtype="int4", granularity="group", group_size=32)
        >>> [(r.pattern, r.spec.granularity) for r in grouped_rules(v, spec)]
        [('params/a/kernel', 'group'), ('params/b/kernel', 'channel')]
    """
    from jaxopt_serve.quant.qarray import resolve_axis

    if spec.granularity != "group":
        raise ValueError(f"grouped_rules needs a spec with granularity='group', got {spec.granularity!r}")
    channel = dataclasses.replace(spec, granularity="channel", group_size=None, axis=None)
    rules = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(_as_plain(variables)):
        name = path_str(path)
        if re.fullmatch(pattern, name) is None or not hasattr(leaf, "shape"):
            continue
        try:
            resolve_axis(tuple(leaf.shape), spec, name=name)
            chosen = spec
        except ValueError:
            chosen = channel
        rules.append(QuantRule(re.escape(name), chosen))
    return rules


@dataclasses.dataclass
class QuantizeResult:
    """The quantized variables and a report of what happened."""

    variables: dict[str, Any]
    quantized: dict[str, str]  # path -> pattern of the rule that quantized it
    unused_rules: list[str]
    float_bytes: int  # bytes of the leaves that were quantized, before
    quantized_bytes: int  # the same leaves after (values + scales + zero points)

    @property
    def compression(self) -> float:
        """``float_bytes / quantized_bytes`` over the quantized leaves."""
        return self.float_bytes / max(self.quantized_bytes, 1)


def path_str(path: Sequence[Any]) -> str:
    """``"params/dense_0/kernel"`` from a jax key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def first_match(name: str, rules: Sequence[QuantRule]) -> int | None:
    """Index of the first rule whose pattern fully matches ``name``, or ``None``."""
    for index, rule in enumerate(rules):
        if rule.matches(name):
            return index
    return None


def check_quantizable(name: str, leaf: Any, selected_by: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``leaf`` is a float array that is not yet quantized."""
    if isinstance(leaf, QArray):
        raise ValueError(f"{name}: already quantized ({leaf!r}); {selected_by} selects it again")
    if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
        raise ValueError(f"{name}: {selected_by} selects a non-array leaf of type {type(leaf).__name__}")
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(f"{name}: {selected_by} selects a {leaf.dtype} leaf; only float arrays can be quantized")


def quantize(variables: Mapping[str, Any], rules: Sequence[QuantRule] | None = None) -> QuantizeResult:
    """Quantize the leaves of ``variables`` selected by ``rules``.

    Each leaf takes the first rule whose pattern fully matches its path; leaves
    matched by no rule, or by a rule with ``spec=None``, stay as they are. A rule
    that matches no leaf is listed in ``unused_rules`` and warned about
    (``UnusedRuleWarning``). Works on Linen variable dicts and on NNX state
    (``nnx_variables(model)`` or an ``nnx.State``).

    Raises:
        ValueError: a selected leaf is not a float array, holds NaN/inf, or does
            not fit its rule's spec; the message names the leaf's path.

    Example:
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> v = init_variables(MLPConfig(features=(64,)), 0)
        >>> result = quantize(v)
        >>> sorted(result.quantized), round(result.compression, 1)
        (['params/classifier/kernel', 'params/dense_0/kernel'], 3.8)
    """
    rules = list(default_rules() if rules is None else rules)
    variables = _as_plain(variables)
    used: set[int] = set()
    quantized: dict[str, str] = {}
    sizes = [0, 0]

    def visit(path, leaf):
        name = path_str(path)
        index = first_match(name, rules)
        if index is None:
            return leaf
        used.add(index)
        rule = rules[index]
        if rule.spec is None:
            return leaf
        check_quantizable(name, leaf, f"rule {rule.pattern!r}")
        q = quantize_array(leaf, rule.spec, name=name)
        quantized[name] = rule.pattern
        sizes[0] += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        sizes[1] += q.nbytes
        return q

    out = jax.tree_util.tree_map_with_path(visit, variables, is_leaf=is_qarray)
    unused = [rule.pattern for index, rule in enumerate(rules) if index not in used]
    for pattern in unused:
        warnings.warn(f"quantization rule {pattern!r} matched no parameter", UnusedRuleWarning, stacklevel=2)
    return QuantizeResult(out, quantized, unused, sizes[0], sizes[1])


def dequantize_tree(variables: Any) -> Any:
    """Every ``QArray`` in ``variables`` replaced by its float array."""
    return jax.tree.map(lambda x: x.dequantize() if is_qarray(x) else x, variables, is_leaf=is_qarray)


def tree_nbytes(variables: Any) -> int:
    """Bytes of every array in ``variables``, quantized arrays counted with their scales.

    RNG keys (an NNX model's dropout streams) count as their key data.
    """
    total = 0
    for leaf in jax.tree.leaves(variables, is_leaf=is_qarray):
        if isinstance(leaf, QArray):
            total += leaf.nbytes
            continue
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        total += int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
    return total


def _as_plain(variables: Any) -> dict[str, Any]:
    from flax import nnx

    if isinstance(variables, nnx.State):
        return {"params": nnx.to_pure_dict(variables)}
    if not isinstance(variables, Mapping):
        raise TypeError(f"expected a variables dict (or nnx.State), got {type(variables).__name__}")
    return {k: (_as_plain_dict(v)) for k, v in variables.items()}


def _as_plain_dict(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _as_plain_dict(v) for k, v in tree.items()}
    return tree
