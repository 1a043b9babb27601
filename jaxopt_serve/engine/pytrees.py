"""Small pure functions on pytrees of batches: rows, padding, cutting, concatenation, leaf names.

Axis 0 of every leaf is the batch. A *length axis* is an optional second axis
per leaf (the token axis of ``input_ids``), given by a pytree prefix of the
tree: an int for every leaf under it, ``None`` for leaves without one.

Example:
    >>> import numpy as np
    >>> batch = {"ids": np.ones((2, 3), np.int32), "scale": np.ones((2,), np.float32)}
    >>> padded = pad_rows(batch, 4)
    >>> padded["ids"].shape, padded["scale"].shape, batch_rows(padded)
    ((4, 3), (4,), 4)
    >>> pad_axes(batch, axes_per_leaf({"ids": 1, "scale": None}, batch), 5)["ids"].shape
    (2, 5)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

_NO_AXIS = object()  # stands for a ``None`` in an axes prefix (``None`` is an empty pytree to JAX)


def leaf_names(tree: Any, root: str = "inputs") -> list[str]:
    """``root`` + the key path of every leaf, in flattening order (``inputs[0]['mask']``)."""
    return [root + jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def slash_names(tree: Any, *, empty: str = "outputs") -> list[str]:
    """Every leaf's key path as ``"a/0/b"`` (dict keys, sequence indices, attribute names); ``empty`` for a bare leaf.

    Example:
        >>> slash_names(({"logits": 1}, 2)), slash_names(3)
        (['0/logits', '1'], ['outputs'])
    """
    from jaxopt_serve.quant.rules import path_str

    return [path_str(path) or empty for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def batch_rows(tree: Any) -> int:
    """The batch size: axis 0 of the first leaf."""
    if type(tree) is np.ndarray:  # one array (the common request): no pytree walk
        return int(tree.shape[0])
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("the inputs hold no arrays")
    return int(np.shape(leaves[0])[0])


def take_rows(tree: Any, start: int, stop: int, *, root: str = "outputs") -> Any:
    """Rows ``start:stop`` of every leaf (``ValueError`` naming a leaf without a batch axis)."""

    def take(path: Any, leaf: Any) -> Any:
        if np.ndim(leaf) == 0:
            raise ValueError(
                f"{root}{jax.tree_util.keystr(path)} has no batch axis (shape ()); every leaf needs the batch on axis 0"
            )
        return leaf[start:stop]

    return jax.tree_util.tree_map_with_path(take, tree)


def pad_rows(tree: Any, rows: int) -> Any:
    """Every leaf padded with zero rows up to ``rows`` (leaves already that long are returned as they are)."""

    def pad(leaf: np.ndarray) -> np.ndarray:
        missing = rows - leaf.shape[0]
        if missing <= 0:
            return leaf
        return np.concatenate([leaf, np.zeros((missing, *leaf.shape[1:]), leaf.dtype)])

    return jax.tree.map(pad, tree)


def concat_rows(trees: Sequence[Any]) -> Any:
    """The trees (same structure) concatenated leaf by leaf along the batch axis."""
    if len(trees) == 1:
        return trees[0]
    return jax.tree.map(lambda *leaves: np.concatenate(leaves), *trees)


def axes_per_leaf(prefix: Any, tree: Any, *, what: str = "length_axes") -> list[int | None]:
    """The axis of every leaf of ``tree`` (flattening order) from ``prefix``, a pytree prefix of ``tree``.

    An int applies to every leaf under it, ``None`` to none; axes are counted
    with the batch axis (``1`` is the axis after the batch). ``ValueError`` when
    ``prefix`` is not a prefix of ``tree`` or names the batch axis.

    Example:
        >>> axes_per_leaf({"ids": 1, "mask": 1, "image": None}, {"ids": 0, "mask": 0, "image": 0})  # sorted keys
        [1, None, 1]
    """
    marked = jax.tree.map(lambda a: _NO_AXIS if a is None else a, prefix, is_leaf=lambda a: a is None)
    try:
        full = jax.tree.broadcast(marked, tree)
    except ValueError as err:
        raise ValueError(f"{what} {prefix!r} is not a pytree prefix of the inputs {jax.tree.structure(tree)}") from err
    axes: list[int | None] = []
    for name, axis in zip(leaf_names(tree), jax.tree.leaves(full)):
        if axis is _NO_AXIS:
            axes.append(None)
            continue
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or axis < 1:
            raise ValueError(f"{what} for {name} must be an axis >= 1 (axis 0 is the batch) or None, got {axis!r}")
        axes.append(int(axis))
    return axes


def pad_axes(tree: Any, axes: Sequence[int | None], length: int) -> Any:
    """Every leaf with an axis in ``axes`` (one per leaf) zero-padded along it up to ``length``."""
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for leaf, axis in zip(leaves, axes):
        if axis is not None and leaf.shape[axis] < length:
            widths = [(0, 0)] * leaf.ndim
            widths[axis] = (0, length - leaf.shape[axis])
            leaf = np.pad(leaf, widths)
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def cut_axes(tree: Any, axes: Sequence[int | None], length: int) -> Any:
    """Every leaf with an axis in ``axes`` cut to its first ``length`` entries along it."""
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for leaf, axis in zip(leaves, axes):
        if axis is not None:
            if axis >= np.ndim(leaf):
                raise ValueError(f"length axis {axis} is out of range for a leaf of shape {np.shape(leaf)}")
            index = [slice(None)] * np.ndim(leaf)
            index[axis] = slice(0, length)
            leaf = leaf[tuple(index)]
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)
