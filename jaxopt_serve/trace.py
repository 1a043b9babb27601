"""The model as a program: which operation consumes which variable leaf.

A model (any ``Model``: Linen, NNX or a plain function) is traced to a jaxpr
once. Selected variable leaves are *tagged*; a tag follows its leaf through
shape-only operations (reshape, transpose, squeeze, expand_dims, dtype
converts, copies) and through nested calls (``jax.jit``, custom derivatives,
remat), and stops at the first operation that computes with it. That
operation is the leaf's *consumer*. Quantized execution rewrites the
consumers (a ``dot_general`` or ``conv_general_dilated`` on a quantized
weight); a tagged leaf that reaches any other operation is reported with its
path and the operation's name instead of being guessed at.

Example:
    >>> import jax.numpy as jnp
    >>> def f(params, x):
    ...     return jnp.einsum("bi,oi->bo", x, params["w"].T.T) + params["b"]
    >>> uses = leaf_uses(f, {"w": jnp.ones((3, 4)), "b": jnp.ones(3)}, jnp.ones((2, 4)), tag=["w"])
    >>> [(u.path, u.primitive, u.operand) for u in uses]
    [('w', 'dot_general', 1)]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

# Operations that only re-view a weight: the tag follows them.
VIEW_PRIMITIVES = frozenset(
    {"reshape", "transpose", "squeeze", "expand_dims", "convert_element_type", "copy", "copy_p"}
)
# Nested calls that are inlined when a tagged value enters them (their semantics is one call of the body).
INLINE_PRIMITIVES = frozenset(
    {
        "pjit",
        "jit",
        "closed_call",
        "core_call",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
        "remat",
        "checkpoint",
        "remat2",
        "custom_lin",
    }
)


@dataclasses.dataclass(frozen=True)
class Tagged:
    """A tagged variable leaf as seen at some point of the program: the leaf and the views applied to it.

    Attributes:
        path: the leaf's path in the variables (``"params/dense_0/kernel"``).
        leaf: the stored leaf (e.g. a ``QArray``), or ``None`` in a static walk.
        views: ``(primitive, params)`` of every shape-only operation applied so far.
        aval: shape and dtype after the views.
    """

    path: str
    leaf: Any
    views: tuple[tuple[Any, dict], ...]
    aval: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.aval.shape)

    def then(self, primitive: Any, params: dict, aval: Any) -> Tagged:
        return dataclasses.replace(self, views=(*self.views, (primitive, dict(params))), aval=aval)


@dataclasses.dataclass(frozen=True)
class Use:
    """One consumer of a tagged leaf: the primitive, which operand the leaf was, its params and the views."""

    path: str
    primitive: str
    operand: int
    params: dict
    views: tuple[tuple[Any, dict], ...]
    order: int


@dataclasses.dataclass(frozen=True)
class BiasAdd:
    """A bias added to a ``dot_general``'s output by the next operation (a Dense layer's ``y + bias``).

    ``value`` holds the bias flattened to one axis, laid along the product's
    last ``ndim`` output axes (row-major). ``interpret(..., fuse_bias=True)``
    hands it to the consumer of such a product, which returns the sum (a
    kernel that adds it in its epilogue saves a pass over the output); ``add``
    is that sum as the program computed it.
    """

    value: Any
    ndim: int

    def add(self, y: Any) -> Any:
        return y + jnp.reshape(self.value, jnp.shape(y)[jnp.ndim(y) - self.ndim :])


class UnsupportedUse(ValueError):
    """A tagged leaf reaches an operation its consumer does not handle."""


# consume(eqn, invals) -> outputs; called as consume(eqn, invals, bias=BiasAdd(...)) under interpret(fuse_bias=True).
Consumer = Callable[..., Sequence[Any]]


def replay(views: Iterable[tuple[Any, dict]], x: Any, *, skip_converts: bool = False) -> Any:
    """Apply the recorded shape-only operations to ``x`` (an array standing for the leaf)."""
    for primitive, params in views:
        if skip_converts and primitive.name == "convert_element_type":
            continue
        x = primitive.bind(x, **params)
    return x


def _sub_jaxpr(eqn: Any) -> tuple[Any, list[Any]] | None:
    """The body of a nested call whose inputs are exactly the equation's inputs."""
    for value in eqn.params.values():
        if isinstance(value, jcore.ClosedJaxpr) and len(value.jaxpr.invars) == len(eqn.invars):
            return value.jaxpr, list(value.consts)
        if isinstance(value, jcore.Jaxpr) and len(value.invars) == len(eqn.invars) and not value.constvars:
            return value, []
    return None


def _bias_root(jaxpr: Any, producer: dict[Any, int], b: Any, out_shape: Sequence[int]) -> tuple[Any, int] | None:
    """``(var, ndim)`` when ``b`` is a vector broadcast along the last ``ndim`` axes of ``out_shape``.

    ``b``'s shape is leading ones then the trailing part of ``out_shape`` (``add``
    broadcasts size-one axes), or ``b`` comes from ``broadcast_in_dim`` of such an
    operand into those axes in order; ``var`` is that operand traced back through
    reshapes and added unit axes (the same values, row-major), as far as they go.
    """

    def trailing(shape: tuple[int, ...]) -> int:  # how many trailing axes of out_shape it spans; 0: none
        lead = 0
        while lead < len(shape) and shape[lead] == 1:
            lead += 1
        tail = shape[lead:]
        return len(tail) if tail and tail == tuple(out_shape[len(out_shape) - len(tail) :]) else 0

    eqn = jaxpr.eqns[producer[b]] if b in producer else None
    if len(b.aval.shape) == len(out_shape) and tuple(b.aval.shape) != tuple(out_shape):
        src, ndim = b, trailing(tuple(b.aval.shape))
    elif eqn is not None and eqn.primitive.name == "broadcast_in_dim" and not isinstance(eqn.invars[0], jcore.Literal):
        src = eqn.invars[0]
        ndim = trailing(tuple(src.aval.shape))
        dims = tuple(eqn.params["broadcast_dimensions"])
        if dims[len(dims) - ndim :] != tuple(range(len(out_shape) - ndim, len(out_shape))):
            return None
    else:
        return None
    if ndim == 0:
        return None
    while src in producer and _same_values(jaxpr.eqns[producer[src]]):
        src = jaxpr.eqns[producer[src]].invars[0]
    return src, ndim


def _same_values(eqn: Any) -> bool:
    """Whether ``eqn`` only re-views its operand's values in row-major order (a reshape, or unit axes added).

    A reshape with ``dimensions`` (``order="F"``, ``ravel(order="F")``) transposes first: not the same order.
    """
    if isinstance(eqn.invars[0], jcore.Literal):
        return False
    if eqn.primitive.name == "reshape":
        return eqn.params.get("dimensions") is None
    if eqn.primitive.name == "broadcast_in_dim":
        dims = tuple(eqn.params["broadcast_dimensions"])
        size = math.prod(eqn.invars[0].aval.shape)
        return size == math.prod(eqn.outvars[0].aval.shape) and list(dims) == sorted(dims)
    return False


def _fusable_bias_adds(jaxpr: Any) -> dict[int, tuple[int, Any, int]]:
    """``{dot index: (add index, bias var, ndim)}`` for float32 products whose only use adds a broadcast bias.

    The bias var must be computed before the product, so that it can go into it.
    """
    producer: dict[Any, int] = {}
    uses: dict[Any, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                uses[v] = uses.get(v, 0) + 1
        for v in eqn.outvars:
            producer[v] = i
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal):
            uses[v] = uses.get(v, 0) + 1
    found: dict[int, tuple[int, Any, int]] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name != "add" or any(isinstance(v, jcore.Literal) for v in eqn.invars):
            continue
        for y, b in (eqn.invars, eqn.invars[::-1]):
            d = producer.get(y)
            if d is None or d in found or jaxpr.eqns[d].primitive.name != "dot_general" or uses.get(y) != 1:
                continue
            if not all(v.aval.dtype == np.float32 for v in (y, b, eqn.outvars[0])):
                continue
            if tuple(eqn.outvars[0].aval.shape) != tuple(y.aval.shape):
                continue
            root = _bias_root(jaxpr, producer, b, y.aval.shape)
            if root is not None and producer.get(root[0], -1) < d:
                found[d] = (i, *root)
                break
    return found


def interpret(
    jaxpr: Any,
    consts: Sequence[Any],
    args: Sequence[Any],
    consume: Consumer,
    *,
    evaluate: bool = True,
    fuse_bias: bool = False,
) -> list[Any]:
    """Evaluate ``jaxpr`` on ``args`` where some arguments are ``Tagged``.

    Equations without tagged inputs are bound as usual (``evaluate=False``:
    skipped, their outputs ``None``, for a static walk). Shape-only
    operations extend a tag; nested calls are inlined; any other equation
    with a tagged input goes to ``consume(eqn, invals)``, which returns its
    outputs or raises ``UnsupportedUse``. With ``fuse_bias``, a float32
    ``dot_general`` whose one use is adding a broadcast bias vector (Dense's
    ``y + bias``) goes to ``consume(eqn, invals, bias=BiasAdd(...))``, which
    returns the sum, and the addition itself is skipped.
    """
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    fusable = _fusable_bias_adds(jaxpr) if fuse_bias and evaluate else {}
    done: dict[int, Any] = {}  # add index -> the fused product's output var
    for index, eqn in enumerate(jaxpr.eqns):
        if index in done:
            env[eqn.outvars[0]] = env[done[index]]
            continue
        invals = [read(v) for v in eqn.invars]
        tagged = any(isinstance(v, Tagged) for v in invals)
        name = eqn.primitive.name
        if tagged and name in VIEW_PRIMITIVES and isinstance(invals[0], Tagged) and len(invals) == 1:
            outs = [invals[0].then(eqn.primitive, eqn.params, eqn.outvars[0].aval)]
        elif tagged and name in INLINE_PRIMITIVES and (sub := _sub_jaxpr(eqn)) is not None:
            outs = interpret(sub[0], sub[1], invals, consume, evaluate=evaluate, fuse_bias=fuse_bias)
        elif tagged and index in fusable and not isinstance(bias := read(fusable[index][1]), Tagged):
            add_index, _, ndim = fusable[index]
            outs = list(consume(eqn, invals, bias=BiasAdd(jnp.reshape(bias, (-1,)), ndim)))
            done[add_index] = eqn.outvars[0]
        elif tagged:
            outs = list(consume(eqn, invals))
        elif not evaluate:
            outs = [None] * len(eqn.outvars)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*invals, **params)
            outs = list(ans) if eqn.primitive.multiple_results else [ans]
        for var, val in zip(eqn.outvars, outs):
            if not isinstance(var, jcore.DropVar):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]


def trace(fn: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
    """``(closed jaxpr, output tree)`` of ``fn(*args)``; arguments may be arrays or ``ShapeDtypeStruct`` s."""
    flat, in_tree = jax.tree.flatten(args)
    out_tree: list[Any] = []

    def run(*leaves: Any) -> list[Any]:
        out = fn(*jax.tree.unflatten(in_tree, leaves))
        out_tree.append(jax.tree.structure(out))
        return jax.tree.leaves(out)

    avals = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in flat]
    return jax.make_jaxpr(run)(*avals), out_tree[-1]


def leaf_uses(fn: Callable[..., Any], variables: Any, *inputs: Any, tag: Sequence[str] | None = None) -> list[Use]:
    """Every consumer of the variable leaves named in ``tag`` (default: all), in program order.

    ``fn(variables, *inputs)`` is traced, not run. Leaf names are
    ``jax.tree_util.keystr`` paths for arbitrary pytrees, or ``"a/b/c"`` paths for
    nested dicts (``path_of``).
    """
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    names = [path_of(p) for p, _ in leaves]
    wanted = set(names if tag is None else tag)
    closed, _ = trace(fn, variables, *inputs)
    n_vars = len(leaves)
    uses: list[Use] = []

    def consume(eqn: Any, invals: list[Any]) -> list[Any]:
        for i, v in enumerate(invals):
            if isinstance(v, Tagged):
                uses.append(Use(v.path, eqn.primitive.name, i, dict(eqn.params), v.views, len(uses)))
        return [None] * len(eqn.outvars)

    args: list[Any] = []
    for i, var in enumerate(closed.jaxpr.invars):
        if i < n_vars and names[i] in wanted:
            args.append(Tagged(names[i], None, (), var.aval))
        else:
            args.append(None)
    outs = interpret(closed.jaxpr, closed.consts, args, consume, evaluate=False)
    for v in outs:
        if isinstance(v, Tagged):
            uses.append(Use(v.path, "output", 0, {}, v.views, len(uses)))
    return uses


def path_of(key_path: Sequence[Any]) -> str:
    """``"params/dense_0/kernel"`` for dict keys; ``jax.tree_util.keystr`` for anything else."""
    parts = []
    for key in key_path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(str(key.name))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        else:
            return jax.tree_util.keystr(tuple(key_path))
    if len(parts) == len(key_path) and all(isinstance(k, jax.tree_util.DictKey) for k in key_path):
        return "/".join(parts)
    return jax.tree_util.keystr(tuple(key_path))


# ---------------------------------------------------------------------------- views of keepdims arrays


def view_axes(views: Iterable[tuple[Any, dict]], ndim: int) -> list[int] | None:
    """For each axis after the views, the original axis it is; ``None`` if a view mixes axes (a reshape)."""
    axes: list[int | None] = list(range(ndim))
    for primitive, params in views:
        name = primitive.name
        if name in ("convert_element_type", "copy", "copy_p"):
            continue
        if name == "transpose":
            axes = [axes[p] for p in params["permutation"]]
        elif name == "squeeze":
            drop = {d % len(axes) for d in params["dimensions"]}
            axes = [a for i, a in enumerate(axes) if i not in drop]
        elif name == "expand_dims":
            for d in sorted(params["dimensions"]):
                axes.insert(d, None)
        else:
            return None
    if any(a is None for a in axes):
        return None
    return [int(a) for a in axes]


def _reshape_groups(old: Sequence[int], new: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Contiguous groups of axes a row-major reshape maps onto each other (sizes multiply to the same)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(new) and new[j] == 1:
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(old) or j >= len(new):
            return None
        gi, gj, pi, pj = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i >= len(old):
                    return None
                gi.append(i)
                pi *= old[i]
                i += 1
            else:
                if j >= len(new):
                    return None
                gj.append(j)
                pj *= new[j]
                j += 1
        groups.append((gi, gj))
    return groups


def view_keepdims(a: Any, shape: Sequence[int], views: Iterable[tuple[Any, dict]]) -> Any:
    """A keepdims array (a scale: size 1 or full along each axis of ``shape``) carried through the views.

    Returns the array in the viewed layout, again with size 1 wherever it is
    constant, or ``None`` when a reshape cannot be followed.
    """
    shape = list(shape)
    for primitive, params in views:
        name = primitive.name
        if name in ("convert_element_type", "copy", "copy_p"):
            continue
        if name == "transpose":
            perm = params["permutation"]
            a = jnp.transpose(a, perm)
            shape = [shape[p] for p in perm]
        elif name == "squeeze":
            dims = tuple(d % len(shape) for d in params["dimensions"])
            a = jnp.squeeze(a, dims)
            shape = [s for i, s in enumerate(shape) if i not in dims]
        elif name == "expand_dims":
            for d in sorted(params["dimensions"]):
                a = jnp.expand_dims(a, d)
                shape.insert(d, 1)
        elif name == "reshape":
            new = list(params["new_sizes"])
            if params.get("dimensions") is not None:
                return None
            groups = _reshape_groups(shape, new)
            if groups is None:
                return None
            varies = [any(a.shape[i] != 1 for i in gi) for gi, _ in groups]
            full_old = [1] * len(shape)
            full_new = [1] * len(new)
            for (gi, gj), v in zip(groups, varies):
                if v:
                    for i in gi:
                        full_old[i] = shape[i]
                    for j in gj:
                        full_new[j] = new[j]
            a = jnp.broadcast_to(a, full_old).reshape(full_new)
            shape = new
        else:
            return None
    return a


def keepdims_constant_along(a: Any, axes: Iterable[int]) -> bool:
    """Whether the keepdims array ``a`` is constant (size 1) along ``axes``."""
    return all(np.shape(a)[ax] == 1 for ax in axes)
