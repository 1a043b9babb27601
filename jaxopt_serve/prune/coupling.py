"""Automatic coupling: which parameter axes shrink together, read from the traced program.

The model (any ``Model``: Linen, NNX or a plain function) is traced once with
``jax.make_jaxpr``. Every axis of every value in the program is described by
*dimensions*: union-find nodes with a size. Operations relate them:

* elementwise operations (residual adds, activations, gates, norm scales and
  biases broadcast by ``broadcast_in_dim``, a ``bitcast_convert_type`` between
  types of one width, as dropout's random bits take) make the axes of their
  operands one dimension;
* ``dot_general`` joins contracted axes and batch axes of its two operands;
  ``conv_general_dilated`` joins the input's feature axis with the kernel's
  input-feature axis, and splits both sides into ``(groups, per-group)`` when
  ``feature_group_count > 1`` (grouped and depthwise convolutions);
* ``reshape`` splits or merges dimensions as a row-major *product* (attention
  heads ``(H * D) -> (H, D)``, a flatten that repeats a channel block at every
  spatial position); ``concatenate``, ``split`` and ``slice`` cut a dimension
  into a *sum* of parts (a projection split into two halves);
* calls (``jit``, ``custom_jvp_call``, ``custom_vjp_call``, remat) are followed
  into their bodies; so is ``scan`` (``lax.scan``, Flax's ``nn.scan`` over
  stacked layers): its body is walked once, standing for every iteration; the carry
  leaving an iteration is the carry entering the next (one dimension), and
  the scanned axis of stacked parameters is left whole, so every layer of a
  stack keeps the same units.

A dimension that nothing splits is a *unit axis*: removing unit ``i`` removes
one index of it everywhere it occurs (a kernel column, a bias entry, batch
norm statistics, the next layer's rows, a block of rows after a flatten). The
unit axes that reach a parameter become ``Group`` s of ``Slice`` s.

What is never pruned, and reported (``Refusal``: the parameter axes, the
operation and why): axes of the model's inputs and outputs; axes that an
operation reduces (``reduce_sum`` in a LayerNorm/RMSNorm mean or variance, a
softmax, ``argmax``); axes an unfamiliar operation touches (``scatter``,
``while``, a gather along them, ...); reshapes that cannot be
followed. Axes contracted or kept between two activations in a
``dot_general`` (the per-head query/key and value dimensions of attention)
are reported too unless ``head_dims=True``: an attention's ``1/sqrt(d)`` scale
is computed from that size, so a rebuilt module would not compute what the
masked original computes.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxopt_serve.model import Model
    >>> def mlp(p, x):
    ...     return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]
    >>> params = {"w1": jnp.ones((4, 8)), "b1": jnp.ones(8), "w2": jnp.ones((8, 3))}
    >>> analysis = analyze(Model.function(mlp, params, jnp.ones((2, 4))))
    >>> [(s.path, s.axis) for s in analysis.groups[0].slices]
    [('params/b1', 0), ('params/w1', 1), ('params/w2', 0)]
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np

from jaxopt_serve import native
from jaxopt_serve.model import Model, as_model
from jaxopt_serve.prune.structured import Group, Slice
from jaxopt_serve.trace import INLINE_PRIMITIVES, path_of, trace

# Operations applied entry by entry: every operand axis is the output axis at the same position.
ELEMENTWISE = frozenset(
    {
        "add",
        "add_any",
        "sub",
        "mul",
        "div",
        "rem",
        "pow",
        "max",
        "min",
        "neg",
        "sign",
        "floor",
        "ceil",
        "round",
        "is_finite",
        "exp",
        "exp2",
        "log",
        "log1p",
        "expm1",
        "tanh",
        "logistic",
        "sin",
        "cos",
        "tan",
        "asin",
        "acos",
        "atan",
        "atan2",
        "sinh",
        "cosh",
        "asinh",
        "acosh",
        "atanh",
        "sqrt",
        "rsqrt",
        "cbrt",
        "abs",
        "integer_pow",
        "square",
        "erf",
        "erfc",
        "erf_inv",
        "lgamma",
        "digamma",
        "select_n",
        "clamp",
        "and",
        "or",
        "not",
        "xor",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "convert_element_type",
        "copy",
        "copy_p",
        "reduce_precision",
        "stop_gradient",
        "nextafter",
        "real",
        "imag",
        "conj",
        "shift_left",
        "shift_right_logical",
        "shift_right_arithmetic",
        "population_count",
        "optimization_barrier",
    }
)
# Reductions over ``axes``: the reduced axes are mixed (e.g. a norm's mean), the others pass through.
REDUCTIONS = frozenset(
    {
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "reduce_prod",
        "reduce_and",
        "reduce_or",
        "reduce_xor",
        "argmax",
        "argmin",
    }
)
# Operations along one ``axis`` that mix its entries.
ALONG_AXIS = {
    "cumsum": "axis",
    "cumprod": "axis",
    "cummax": "axis",
    "cummin": "axis",
    "cumlogsumexp": "axis",
    "sort": "dimension",
}
# Nested calls whose body runs once per call: followed into (the same set jaxopt_serve.trace inlines).
CALLS = INLINE_PRIMITIVES
# Operations that start from nothing the analysis follows (fresh axes, no coupling).
SOURCES = frozenset(
    {
        "iota",
        "random_bits",
        "random_seed",
        "random_wrap",
        "random_unwrap",
        "rng_bit_generator",
        "threefry2x32",
        "random_fold_in",
        "random_split",
    }
)

# Reasons an axis is left alone, by severity.
INPUT, OUTPUT, UNSAFE, HEAD_DIM = "input", "output", "unsafe", "head_dim"
_RANK = {OUTPUT: 0, INPUT: 1, UNSAFE: 2, HEAD_DIM: 3}


@dataclasses.dataclass(frozen=True)
class Reason:
    """Why a dimension is not pruned: its kind, the operation and a sentence."""

    kind: str
    primitive: str
    detail: str


class Dim:
    """A union-find node: one dimension of the program, possibly split into a product or a sum of parts."""

    __slots__ = ("size", "parent", "split", "reasons", "batch", "id")
    _ids = itertools.count()

    def __init__(self, size: int, reasons: Sequence[Reason] = (), *, batch: bool = False) -> None:
        self.size = int(size)
        self.parent: Dim = self
        self.split: tuple[str, list[Dim]] | None = None  # ("prod" | "sum", parts), on roots only
        self.reasons: list[Reason] = list(reasons)
        self.batch = batch
        self.id = next(Dim._ids)

    def __repr__(self) -> str:
        return f"Dim#{self.id}({self.size})"


def find(d: Dim) -> Dim:
    """The root of ``d``'s class (path halving)."""
    while d.parent is not d:
        d.parent = d.parent.parent
        d = d.parent
    return d


Expr = tuple  # one axis: a row-major product of Dims


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Parameter axes the analysis leaves whole: ``"path[axis]"`` entries, the operation, and why."""

    axes: tuple[str, ...]
    primitive: str
    reason: str
    kind: str

    def __str__(self) -> str:
        return f"{', '.join(self.axes)}: {self.reason} ({self.primitive})"


@dataclasses.dataclass
class Step:
    """One equation as the analysis saw it: its operands' and results' axes, and a body for calls."""

    eqn: Any
    ins: list[Any]
    outs: list[Any]
    body: Body | list[Body] | None = None
    note: Any = None


@dataclasses.dataclass
class Body:
    """A jaxpr walked once: its constants' and arguments' axes, its steps and its results' axes."""

    jaxpr: Any
    consts: list[Any]
    const_exprs: list[Any]
    in_exprs: list[Any]
    steps: list[Step]
    out_exprs: list[Any]


@dataclasses.dataclass
class Analysis:
    """What the program says about a model's channels.

    Attributes:
        groups: the prunable units, as ``Group`` s of ``Slice`` s over ``"collection/.../leaf"`` paths.
        refused: parameter axes left whole, with the operation and the reason.
        model: the analysed ``Model``.
        program: the traced program with every axis described (used to re-run it at smaller shapes).
        var_exprs: each variable leaf's axes, by path.
        roots: each group's unit dimension, by group name.
        out_tree: the structure of the model's outputs.
        input_exprs: each input leaf's axes, in the order of the flattened inputs.
        options: the ``analyze`` options it was made with (to analyse the model again at other input sizes).
    """

    groups: list[Group]
    refused: list[Refusal]
    model: Model
    program: Body
    var_exprs: dict[str, tuple[Expr, ...]]
    roots: dict[str, Dim]
    out_tree: Any = None
    input_exprs: list[Any] = dataclasses.field(default_factory=list)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def refusal_for(self, path: str) -> list[Refusal]:
        """Refusals that name an axis of ``path``."""
        return [r for r in self.refused if any(a.split("[")[0] == path for a in r.axes)]

    def summary(self) -> str:
        """One line per group and per refused axis set (inputs and outputs left out)."""
        lines = [f"group {g.name}: {len(g.slices)} slices, {g.size} units" for g in self.groups]
        lines += [f"left whole: {r}" for r in self.refused if r.kind not in (INPUT, OUTPUT)]
        return "\n".join(lines)


class _Graph:
    """The dimensions of one traced program and the rules that relate them."""

    def __init__(self) -> None:
        self.dims: list[Dim] = []

    def new(self, size: int, reasons: Sequence[Reason] = (), *, batch: bool = False) -> Dim:
        d = Dim(size, reasons, batch=batch)
        self.dims.append(d)
        return d

    def fresh(self, shape: Sequence[int], reasons: Sequence[Reason] = ()) -> tuple[Expr, ...]:
        return tuple((self.new(s, reasons),) for s in shape)

    def flag(self, exprs: Any, reason: Reason) -> None:
        for d in _flat_dims(exprs):
            r = find(d)
            if reason not in r.reasons:
                r.reasons.append(reason)

    # -- joining ----------------------------------------------------------------------------------

    def union(self, a: Dim, b: Dim, primitive: str) -> None:
        a, b = find(a), find(b)
        if a is b:
            return
        if a.size != b.size:
            reason = Reason(UNSAFE, primitive, f"axes of sizes {a.size} and {b.size} meet")
            self.flag((a, b), reason)
            return
        b.parent = a
        a.batch = a.batch or b.batch
        a.reasons += [r for r in b.reasons if r not in a.reasons]
        sa, sb = a.split, b.split
        if sa is None:
            a.split = sb
        elif sb is not None:
            if sa[0] == "prod" and sb[0] == "prod":
                self.unify(tuple(sa[1]), tuple(sb[1]), primitive)
            elif sa[0] == "sum" and sb[0] == "sum" and [d.size for d in sa[1]] == [d.size for d in sb[1]]:
                for x, y in zip(sa[1], sb[1]):
                    self.union(x, y, primitive)
            else:
                self.flag((a,), Reason(UNSAFE, primitive, "an axis is cut in two incompatible ways"))

    def split_prod(self, d: Dim, sizes: Sequence[int]) -> list[Dim]:
        d = find(d)
        parts = [self.new(s, d.reasons, batch=d.batch) for s in sizes]
        d.split = ("prod", parts)
        return parts

    def unify(self, xs: Expr, ys: Expr, primitive: str) -> None:
        """Join two row-major products of dimensions of equal total size, splitting dimensions to align them."""
        left = [d for d in xs if d.size != 1]
        right = [d for d in ys if d.size != 1]
        i = j = 0
        while i < len(left) and j < len(right):
            x, y = find(left[i]), find(right[j])
            if x.size == y.size:
                self.union(x, y, primitive)
                i, j = i + 1, j + 1
                continue
            big, side, k = (x, left, i) if x.size > y.size else (y, right, j)
            small = min(x.size, y.size)
            parts = self._expand(big, small)
            if parts is None:
                reason = Reason(UNSAFE, primitive, f"a reshape regroups an axis of size {big.size} by {small}")
                self.flag((tuple(left[i:]), tuple(right[j:])), reason)
                return
            side[k : k + 1] = parts
        if left[i:] or right[j:]:
            self.flag((tuple(left[i:]), tuple(right[j:])), Reason(UNSAFE, primitive, "axes of different sizes meet"))

    def _expand(self, d: Dim, first: int) -> list[Dim] | None:
        if d.split is not None:
            if d.split[0] != "prod":
                return None
            return [p for p in d.split[1] if p.size != 1]
        if d.size % first:
            return None
        return self.split_prod(d, (first, d.size // first))

    def cut(self, d: Dim, start: int, stop: int, primitive: str) -> tuple[list[Dim], int, int] | None:
        """The parts ``[start, stop)`` of ``d`` as a sum; ``(parts, first, last)`` or ``None`` when it cannot be cut."""
        d = find(d)
        if d.split is None:
            sizes = [s for s in (start, stop - start, d.size - stop) if s > 0]
            d.split = ("sum", [self.new(s, d.reasons, batch=d.batch) for s in sizes])
        kind, parts = d.split
        if kind != "sum":
            return None
        edges = np.cumsum([0] + [p.size for p in parts]).tolist()
        for edge in (start, stop):
            if edge in edges:
                continue
            k = int(np.searchsorted(edges, edge)) - 1
            part = find(parts[k])
            if part.split is not None:
                return None
            off = edge - edges[k]
            halves = [self.new(off, part.reasons), self.new(part.size - off, part.reasons)]
            merged = self.new(part.size, part.reasons)
            merged.split = ("sum", halves)
            self.union(part, merged, primitive)
            parts[k : k + 1] = halves
            edges = np.cumsum([0] + [p.size for p in parts]).tolist()
        first, last = edges.index(start), edges.index(stop)
        return parts, first, last


def _flat_dims(exprs: Any) -> list[Dim]:
    if isinstance(exprs, Dim):
        return [exprs]
    out: list[Dim] = []
    for e in exprs:
        out += _flat_dims(e)
    return out


# ------------------------------------------------------------------------------------------------ the walk


class _Walker:
    def __init__(self, graph: _Graph) -> None:
        self.g = graph
        self.param_vars: set[int] = set()  # ids of values that are views of a variable leaf

    def body(self, jaxpr: Any, consts: Sequence[Any], in_exprs: list[Any], param_in: list[bool]) -> Body:
        env: dict[Any, Any] = {}
        const_exprs = [self.g.fresh(np.shape(c)) for c in consts]
        for v, e in zip(jaxpr.constvars, const_exprs):
            env[v] = e
        for v, e, p in zip(jaxpr.invars, in_exprs, param_in):
            env[v] = e
            if p:
                self.param_vars.add(id(v))
        steps = []
        for eqn in jaxpr.eqns:
            ins = [self.read(env, v) for v in eqn.invars]
            step = self.eqn(eqn, ins)
            steps.append(step)
            for v, e in zip(eqn.outvars, step.outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = e
        return Body(jaxpr, list(consts), const_exprs, in_exprs, steps, [self.read(env, v) for v in jaxpr.outvars])

    def read(self, env: dict, v: Any) -> Any:
        if isinstance(v, jcore.Literal):
            return self.g.fresh(np.shape(v.val))
        return env[v]

    def is_param(self, v: Any) -> bool:
        return not isinstance(v, jcore.Literal) and id(v) in self.param_vars

    def eqn(self, eqn: Any, ins: list[Any]) -> Step:
        name = eqn.primitive.name
        g = self.g
        shapes = [tuple(v.aval.shape) if hasattr(v.aval, "shape") else () for v in eqn.outvars]
        rule = getattr(self, "_" + name, None)
        if name in CALLS and (sub := _call_body(eqn)) is not None:
            jaxpr, consts = sub
            body = self.body(jaxpr, consts, ins, [self.is_param(v) for v in eqn.invars])
            for v_out, v_in in zip(eqn.outvars, jaxpr.outvars):
                if id(v_in) in self.param_vars:
                    self.param_vars.add(id(v_out))
            return Step(eqn, ins, body.out_exprs, body)
        if name in ELEMENTWISE:
            outs = self._elementwise(eqn, ins, shapes[0])
            if name in ("convert_element_type", "copy", "copy_p", "reduce_precision") and self.is_param(eqn.invars[0]):
                self.param_vars.add(id(eqn.outvars[0]))
            return Step(eqn, ins, [outs])
        if rule is not None:
            return rule(eqn, ins, shapes)
        if name in REDUCTIONS:
            axes = tuple(eqn.params["axes"])
            g.flag([ins[0][a] for a in axes], Reason(UNSAFE, name, f"{name} mixes the entries of this axis"))
            return Step(eqn, ins, [tuple(e for a, e in enumerate(ins[0]) if a not in axes)])
        if name in ALONG_AXIS:
            axis = eqn.params[ALONG_AXIS[name]] % len(ins[0])
            g.flag(ins[0][axis], Reason(UNSAFE, name, f"{name} mixes the entries of this axis"))
            if len(ins) == 1 and len(eqn.outvars) == 1:
                return Step(eqn, ins, [ins[0]])
        if name in SOURCES:
            return Step(eqn, ins, [g.fresh(s) for s in shapes])
        # anything else: its operands' and results' axes are left alone
        reason = Reason(UNSAFE, name, f"the analysis does not follow channels through {name}")
        g.flag(ins, reason)
        return Step(eqn, ins, [g.fresh(s, (reason,)) for s in shapes])

    # -- rules ---------------------------------------------------------------------------------------

    def _elementwise(self, eqn: Any, ins: list[Any], shape: tuple[int, ...]) -> tuple[Expr, ...]:
        """Axes at the same position are one dimension; a size-1 operand axis is broadcast (no coupling)."""
        out = []
        for k, size in enumerate(shape):
            full = [e[k] for v, e in zip(eqn.invars, ins) if len(e) == len(shape) and np.shape(_aval(v))[k] == size]
            if not full:
                out.append((self.g.new(size),))
                continue
            for other in full[1:]:
                self.g.unify(full[0], other, eqn.primitive.name)
            out.append(full[0])
        return tuple(out)

    def _broadcast_in_dim(self, eqn, ins, shapes):
        dims = eqn.params["broadcast_dimensions"]
        out = list(self.g.fresh(shapes[0]))
        for i, j in enumerate(dims):
            if eqn.invars[0].aval.shape[i] == shapes[0][j]:
                out[j] = ins[0][i]
        if self.is_param(eqn.invars[0]):
            self.param_vars.add(id(eqn.outvars[0]))
        return Step(eqn, ins, [tuple(out)])

    def _bitcast_convert_type(self, eqn, ins, shapes):
        # same width (uint32 random bits to float32, as dropout draws them): one value per entry, elementwise
        if len(shapes[0]) != len(ins[0]):
            return self._refuse(eqn, ins, shapes, "a bitcast between types of different widths")
        return Step(eqn, ins, [self._elementwise(eqn, ins, shapes[0])])

    def _reshape(self, eqn, ins, shapes):
        if eqn.params.get("dimensions") is not None:
            return self._refuse(eqn, ins, shapes, "reshape with a dimension order")
        out = self.g.fresh(shapes[0])
        self.g.unify(tuple(d for e in ins[0] for d in e), tuple(d for e in out for d in e), "reshape")
        if self.is_param(eqn.invars[0]):
            self.param_vars.add(id(eqn.outvars[0]))
        return Step(eqn, ins, [out])

    def _transpose(self, eqn, ins, shapes):
        if self.is_param(eqn.invars[0]):
            self.param_vars.add(id(eqn.outvars[0]))
        return Step(eqn, ins, [tuple(ins[0][p] for p in eqn.params["permutation"])])

    def _squeeze(self, eqn, ins, shapes):
        drop = {d % len(ins[0]) for d in eqn.params["dimensions"]}
        if self.is_param(eqn.invars[0]):
            self.param_vars.add(id(eqn.outvars[0]))
        return Step(eqn, ins, [tuple(e for i, e in enumerate(ins[0]) if i not in drop)])

    def _dot_general(self, eqn, ins, shapes):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins[0], ins[1]
        for a, b in zip(lc, rc):
            self.g.unify(lhs[a], rhs[b], "dot_general")
        for a, b in zip(lb, rb):
            self.g.unify(lhs[a], rhs[b], "dot_general")
        lfree = [i for i in range(len(lhs)) if i not in lc and i not in lb]
        rfree = [i for i in range(len(rhs)) if i not in rc and i not in rb]
        out = tuple(lhs[a] for a in lb) + tuple(lhs[a] for a in lfree) + tuple(rhs[a] for a in rfree)
        lp, rp = self.is_param(eqn.invars[0]), self.is_param(eqn.invars[1])
        if not lp and not rp:
            reason = Reason(
                HEAD_DIM,
                "dot_general",
                "contracted or kept between two computed values, as inside "
                "attention heads (pass head_dims=True to prune it)",
            )
            self.g.flag([lhs[a] for a in (*lc, *lfree)] + [rhs[a] for a in rfree], reason)
        return Step(eqn, ins, [out])

    def _conv_general_dilated(self, eqn, ins, shapes):
        p = eqn.params
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        lhs, rhs = ins[0], ins[1]
        if p.get("batch_group_count", 1) != 1:
            return self._refuse(eqn, ins, shapes, "a convolution with batch_group_count > 1")
        groups = p["feature_group_count"]
        note = None
        l_feat, r_in, r_out = lhs[lhs_spec[1]], rhs[rhs_spec[1]], rhs[rhs_spec[0]]
        if groups == 1:
            self.g.unify(l_feat, r_in, "conv_general_dilated")
            out_feat = r_out
        else:
            # input features = (groups, per-group inputs); output features = (groups, per-group outputs)
            c_in = eqn.invars[0].aval.shape[lhs_spec[1]]
            c_out = eqn.invars[1].aval.shape[rhs_spec[0]]
            g = self.g.new(groups)
            lhs_parts = (g,) if c_in == groups else (g, *r_in)
            self.g.unify(l_feat, lhs_parts, "conv_general_dilated")
            out_parts = (g,) if c_out == groups else (g, self.g.new(c_out // groups))
            self.g.unify(r_out, out_parts, "conv_general_dilated")
            out_feat = r_out
            note = g
        out = [None] * len(out_spec)
        out[out_spec[0]] = lhs[lhs_spec[0]]
        out[out_spec[1]] = out_feat
        spatial = Reason(INPUT, "conv_general_dilated", "a spatial axis of the input")
        for axis in out_spec[2:]:
            out[axis] = (self.g.new(shapes[0][axis], (spatial,)),)
        self.g.flag([lhs[a] for a in lhs_spec[2:]], spatial)
        self.g.flag([rhs[a] for a in rhs_spec[2:]], Reason(INPUT, "conv_general_dilated", "a kernel window axis"))
        return Step(eqn, ins, [tuple(out)], note=note)

    def _reduce_window(self, eqn, ins, shapes):
        window = eqn.params["window_dimensions"]
        out = []
        reason = Reason(INPUT, eqn.primitive.name, "a pooled axis")
        for k, w in enumerate(window):
            if (
                w == 1
                and all(s == 1 for s in (eqn.params["window_strides"][k],))
                and tuple(eqn.params["padding"][k]) == (0, 0)
            ):
                out.append(ins[0][k])
            else:
                self.g.flag(ins[0][k], reason)
                out.append((self.g.new(shapes[0][k], (reason,)),))
        return Step(eqn, ins, [tuple(out)])

    _reduce_window_sum = _reduce_window_max = _reduce_window_min = _reduce_window

    def _concatenate(self, eqn, ins, shapes):
        axis = eqn.params["dimension"]
        out = list(ins[0])
        for other in ins[1:]:
            for k, (a, b) in enumerate(zip(out, other)):
                if k != axis:
                    self.g.unify(a, b, "concatenate")
        whole = self.g.new(shapes[0][axis])
        parts = [self.g.new(v.aval.shape[axis]) for v in eqn.invars]
        whole.split = ("sum", parts)
        for part, e in zip(parts, ins):
            self.g.unify((part,), e[axis], "concatenate")
        out[axis] = (whole,)
        return Step(eqn, ins, [tuple(out)])

    def _split(self, eqn, ins, shapes):
        axis = eqn.params["axis"]
        outs, notes, start = [], [], 0
        for shape in shapes:
            stop = start + shape[axis]
            e, note = self._cut_axis(ins[0][axis], start, stop, "split")
            outs.append(tuple(e if k == axis else x for k, x in enumerate(ins[0])))
            notes.append(note)
            start = stop
        return Step(eqn, ins, outs, note=notes)

    def _slice(self, eqn, ins, shapes):
        p = eqn.params
        out, notes = [], []
        in_shape = eqn.invars[0].aval.shape
        for k, (start, stop) in enumerate(zip(p["start_indices"], p["limit_indices"])):
            stride = (p.get("strides") or [1] * len(in_shape))[k]
            if start == 0 and stop == in_shape[k] and stride == 1:
                out.append(ins[0][k])
                notes.append(None)
            elif stride != 1:
                reason = Reason(UNSAFE, "slice", "a strided slice")
                self.g.flag(ins[0][k], reason)
                out.append((self.g.new(shapes[0][k], (reason,)),))
                notes.append(None)
            else:
                e, note = self._cut_axis(ins[0][k], start, stop, "slice")
                out.append(e)
                notes.append(note)
        return Step(eqn, ins, [tuple(out)], note=notes)

    def _cut_axis(self, expr: Expr, start: int, stop: int, primitive: str) -> tuple[Expr, Any]:
        dims = [d for d in expr if d.size != 1]
        size = int(np.prod([d.size for d in dims])) if dims else 1
        if start == 0 and stop == size:
            return expr, None
        if len(dims) == 1 and (res := self.g.cut(dims[0], start, stop, primitive)) is not None:
            parts, first, last = res
            note = (list(parts[:first]), list(parts[first:last]))
            if last - first == 1:
                return (parts[first],), note
            whole = self.g.new(stop - start)
            whole.split = ("sum", parts[first:last])
            return (whole,), note
        reason = Reason(UNSAFE, primitive, "a slice that does not follow the axis' parts")
        self.g.flag(expr, reason)
        return (self.g.new(stop - start, (reason,)),), None

    def _pad(self, eqn, ins, shapes):
        out = []
        for k, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
            if (lo, hi, interior) == (0, 0, 0):
                out.append(ins[0][k])
            else:
                reason = Reason(INPUT, "pad", "a padded axis")
                self.g.flag(ins[0][k], reason)
                out.append((self.g.new(shapes[0][k], (reason,)),))
        return Step(eqn, ins, [tuple(out)])

    def _dynamic_slice(self, eqn, ins, shapes):
        out = []
        for k, size in enumerate(eqn.params["slice_sizes"]):
            if size == eqn.invars[0].aval.shape[k]:
                out.append(ins[0][k])
            else:
                reason = Reason(UNSAFE, "dynamic_slice", "a slice at a computed offset")
                self.g.flag(ins[0][k], reason)
                out.append((self.g.new(size, (reason,)),))
        return Step(eqn, ins, [tuple(out)])

    def _gather(self, eqn, ins, shapes):
        p = eqn.params
        dn = p["dimension_numbers"]
        operand, indices = ins[0], ins[1]
        if getattr(dn, "operand_batching_dims", ()) or getattr(dn, "start_indices_batching_dims", ()):
            return self._refuse(eqn, ins, shapes, "a batched gather")
        op_shape = eqn.invars[0].aval.shape
        reason = Reason(UNSAFE, "gather", "entries of this axis are looked up by index")
        kept_axes = []
        for k in range(len(op_shape)):
            if k in dn.collapsed_slice_dims:
                self.g.flag(operand[k], reason)
            elif k in dn.start_index_map or p["slice_sizes"][k] != op_shape[k]:
                self.g.flag(operand[k], reason)
                kept_axes.append((self.g.new(p["slice_sizes"][k], (reason,)),))
            else:
                kept_axes.append(operand[k])
        batch = [e for k, e in enumerate(indices) if k != len(indices) - 1]
        out: list[Any] = [None] * len(shapes[0])
        for k, axis in enumerate(dn.offset_dims):
            out[axis] = kept_axes[k]
        rest = iter(batch)
        for k in range(len(out)):
            if out[k] is None:
                out[k] = next(rest, (self.g.new(shapes[0][k]),))
        return Step(eqn, ins, [tuple(out)])

    def _cond(self, eqn, ins, shapes):
        branches = eqn.params["branches"]
        bodies = [
            self.body(b.jaxpr, b.consts, list(ins[1:]), [self.is_param(v) for v in eqn.invars[1:]]) for b in branches
        ]
        for other in bodies[1:]:
            for a, b in zip(bodies[0].out_exprs, other.out_exprs):
                for x, y in zip(a, b):
                    self.g.unify(x, y, "cond")
        return Step(eqn, ins, bodies[0].out_exprs, bodies)

    def _scan(self, eqn, ins, shapes):
        p = eqn.params
        closed, n_consts, n_carry = p["jaxpr"], p["num_consts"], p["num_carry"]
        xs = ins[n_consts + n_carry :]
        scanned = Reason(UNSAFE, "scan", "the scanned axis (the layers of a stack, the steps of a loop)")
        length = self.g.new(int(p["length"]), (scanned,))
        for e in xs:
            self.g.unify(e[0], (length,), "scan")
        body_in = list(ins[: n_consts + n_carry]) + [e[1:] for e in xs]
        # constants and scanned values may be parameters (a stack's per-layer weights); the carry is computed
        flags = [self.is_param(v) for v in eqn.invars]
        flags[n_consts : n_consts + n_carry] = [False] * n_carry
        body = self.body(closed.jaxpr, closed.consts, body_in, flags)
        carry_in, carry_out, ys = ins[n_consts : n_consts + n_carry], body.out_exprs[:n_carry], body.out_exprs[n_carry:]
        for a, b in zip(carry_in, carry_out):
            for x, y in zip(a, b):
                self.g.unify(x, y, "scan")
        return Step(eqn, ins, list(carry_in) + [((length,), *y) for y in ys], body, note="scan")

    def _refuse(self, eqn, ins, shapes, what):
        reason = Reason(UNSAFE, eqn.primitive.name, f"the analysis does not follow channels through {what}")
        self.g.flag(ins, reason)
        return Step(eqn, ins, [self.g.fresh(s, (reason,)) for s in shapes])


def _aval(v: Any) -> Any:
    return jax.ShapeDtypeStruct(np.shape(v.val), np.result_type(v.val)) if isinstance(v, jcore.Literal) else v.aval


def _call_body(eqn: Any) -> tuple[Any, list[Any]] | None:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        value = eqn.params.get(key)
        if isinstance(value, jcore.ClosedJaxpr) and len(value.jaxpr.invars) == len(eqn.invars):
            return value.jaxpr, list(value.consts)
        if isinstance(value, jcore.Jaxpr) and len(value.invars) == len(eqn.invars):
            return value, []
    return None


# ------------------------------------------------------------------------------------------------ results


def _settle(graph: _Graph) -> None:
    """Reasons and batch marks of a split dimension hold for every part of it."""
    changed = True
    while changed:
        changed = False
        for d in graph.dims:
            r = find(d)
            if r is not d or r.split is None:
                continue
            for part in r.split[1]:
                p = find(part)
                new = [x for x in r.reasons if x not in p.reasons]
                if new:
                    p.reasons += new
                    changed = True


def _placements(expr: Expr) -> list[tuple[Dim, int, int, list[tuple[int, int]]]]:
    """Where each unit dimension sits in an axis: ``(unit root, offset, unit stride, [(count, stride)])``."""

    def node(d: Dim) -> list[tuple[Dim, int, int, list[tuple[int, int]]]]:
        r = find(d)
        if r.split is None:
            return [(r, 0, 1, [])]
        kind, parts = r.split
        found = []
        if kind == "sum":
            offset = 0
            for p in parts:
                for u, o, us, reps in node(p):
                    found.append((u, o + offset, us, reps))
                offset += p.size
            return found
        return prod(list(parts))

    def prod(parts: list[Dim]) -> list[tuple[Dim, int, int, list[tuple[int, int]]]]:
        sizes = [p.size for p in parts]
        strides = [int(np.prod(sizes[k + 1 :])) for k in range(len(sizes))]
        found = []
        for k, p in enumerate(parts):
            others = [(sizes[j], strides[j]) for j in range(len(parts)) if j != k and sizes[j] > 1]
            for u, o, us, reps in node(p):
                found.append((u, o * strides[k], us * strides[k], [(c, s * strides[k]) for c, s in reps] + others))
        return found

    return prod(list(expr))


def _as_slice(path: str, axis: int, n: int, offset: int, unit_stride: int, reps: list[tuple[int, int]]) -> Slice | None:
    """A placement as ``Slice(offset, block, repeat, period)``, or ``None`` when it has another shape."""
    reps = sorted(((c, s) for c, s in reps if c > 1), key=lambda cs: -cs[1])
    merged: list[tuple[int, int]] = []
    for c, s in reps:
        if merged and merged[-1][1] == c * s:
            merged[-1] = (merged[-1][0] * c, s)
        else:
            merged.append((c, s))
    block, outer = 1, merged
    if merged and merged[-1][1] == 1:
        block = merged[-1][0]
        outer = merged[:-1]
        if block != unit_stride:
            return None
    elif unit_stride != 1:
        return None
    if len(outer) > 1:
        return None
    repeat, period = outer[0] if outer else (1, 0)
    if outer and period < n * block:
        return None
    if period == n * block:
        period = 0
    return Slice(path, axis, repeat=repeat, block=block, offset=offset, period=period)


def analyze(model: Any, *, head_dims: bool = False, fixed_outputs: int | None = None) -> Analysis:
    """Trace ``model`` and find its prunable groups and the axes it must leave whole.

    Args:
        model: a ``Model`` (``Model.linen`` / ``Model.nnx`` / ``Model.function``) or a reference ``ModelConfig``
            wrapped by ``as_model``.
        head_dims: also prune dimensions inside attention heads (query/key and value head sizes). Off by
            default: attention scales its scores by ``1/sqrt(head size)``, so a module rebuilt at the smaller
            size does not compute what the masked original computes.
        fixed_outputs: how many leading output leaves keep every axis (default: all). The others may shrink
            with the parameters, as the updated BatchNorm statistics a training step returns do.

    Returns:
        ``Analysis``: ``groups`` (ordered by their first slice's path) and ``refused``.
    """
    model = as_model(model)
    _check_variables(model.variables)
    graph = _Graph()
    walker = _Walker(graph)
    var_leaves = jax.tree_util.tree_leaves_with_path(model.variables)
    names = [path_of(p) for p, _ in var_leaves]
    with native.use_kernel("xla"):  # XLA's ops only (the fused attention's call would hide its axes)
        closed, out_tree = trace(model.apply_fn, model.variables, *model.batch_spec(model.batch_size))
    flat_inputs = jax.tree.leaves(model.example)
    exprs: list[Any] = []
    in_reason = Reason(INPUT, "input", "an axis of the model's inputs")
    for _, leaf in var_leaves:
        exprs.append(tuple((graph.new(s),) for s in np.shape(leaf)))
    for x in flat_inputs:
        exprs.append(tuple((graph.new(s, (in_reason,), batch=(k == 0)),) for k, s in enumerate(np.shape(x))))
    is_param = [True] * len(var_leaves) + [False] * len(flat_inputs)
    program = walker.body(closed.jaxpr, closed.consts, exprs, is_param)
    fixed = program.out_exprs if fixed_outputs is None else program.out_exprs[:fixed_outputs]
    graph.flag(fixed, Reason(OUTPUT, "output", "an axis of the model's outputs"))
    _settle(graph)
    var_exprs = dict(zip(names, exprs[: len(var_leaves)]))
    groups, refused, roots = _collect(var_exprs, head_dims)
    options = {"head_dims": head_dims, "fixed_outputs": fixed_outputs}
    return Analysis(groups, refused, model, program, var_exprs, roots, out_tree, exprs[len(var_leaves) :], options)


def _check_variables(variables: Any) -> None:
    for p, leaf in jax.tree_util.tree_leaves_with_path(variables):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise ValueError(f"variable {path_of(p)}: expected an array, got {type(leaf).__name__}")


def _collect(var_exprs: dict[str, tuple[Expr, ...]], head_dims: bool):
    occurrences: dict[int, list[tuple[str, int, tuple]]] = {}
    units: dict[int, Dim] = {}
    for path, axes in var_exprs.items():
        for axis, expr in enumerate(axes):
            if int(np.prod([d.size for d in expr])) <= 1:
                continue
            for u, offset, us, reps in _placements(expr):
                if u.size <= 1:
                    continue
                units[id(u)] = u
                occurrences.setdefault(id(u), []).append((path, axis, (offset, us, reps)))
    groups, refused, roots = [], [], {}
    used_names: set[str] = set()
    for key, occ in sorted(occurrences.items(), key=lambda kv: (kv[1][0][0], kv[1][0][1])):
        if not any(path.startswith("params/") for path, _, _ in occ):
            continue
        u = units[key]
        axes = tuple(dict.fromkeys(f"{path}[{axis}]" for path, axis, _ in occ))
        reasons = [r for r in u.reasons if head_dims is False or r.kind != HEAD_DIM]
        if reasons:
            r = min(reasons, key=lambda r: _RANK[r.kind])
            refused.append(Refusal(axes, r.primitive, r.detail, r.kind))
            continue
        slices = []
        for path, axis, (offset, us, reps) in occ:
            sl = _as_slice(path, axis, u.size, offset, us, reps)
            if sl is None:
                refused.append(Refusal(axes, "reshape", "units sit in a layout the Slice form cannot state", UNSAFE))
                break
            slices.append(sl)
        else:
            name = _group_name([(p, a, len(var_exprs[p])) for p, a, _ in occ], used_names)
            groups.append(Group(name, tuple(slices), size=u.size))
            roots[name] = u
    return groups, refused, roots


def _group_name(axes: list[tuple[str, int, int]], used: set[str]) -> str:
    """The module that produces the units (a kernel's output axis), else the common module of the slices."""
    params = [(p, a, nd) for p, a, nd in axes if p.startswith("params/")]
    producers = [p for p, a, nd in params if nd >= 2 and a == nd - 1]
    if producers:
        base = "/".join(producers[0].split("/")[1:-1])
    else:
        modules = [p.split("/")[1:-1] for p, _, _ in params]
        base = "/".join(os.path.commonprefix(modules)) or "/".join(modules[0])
    base = base or params[0][0].split("/")[-1]
    name, k = base, 1
    while name in used:
        name = f"{base}#{k}"
        k += 1
    used.add(name)
    return name
