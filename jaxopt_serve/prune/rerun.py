"""The traced program re-run at smaller shapes: a pruned model for any module, without rebuilding it.

``coupling.analyze`` describes every axis of every value of a model's
program by dimensions. Once a plan keeps some units of each group, every
dimension has a new size (kept units; the batch of the call; the old size
otherwise), so the same equations can be bound again at the smaller shapes:
the parameters that hold sizes (``reshape``'s ``new_sizes``,
``broadcast_in_dim``'s ``shape``, ``iota``, ``slice`` bounds, ``split``
sizes, ``gather`` slice sizes, a grouped convolution's
``feature_group_count``) are recomputed; constants of the program lose the
removed entries; calls are inlined; a ``scan`` runs ``lax.scan`` over its
re-run body. The result computes, for every kept
unit, exactly what the original computes with the removed units' slices set
to zero (``mask_plan``): scalar constants such as a LayerNorm's ``1/width`` or
attention's ``1/sqrt(head size)`` keep their traced values.

Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jaxopt_serve.model import Model
    >>> from jaxopt_serve.prune.coupling import analyze
    >>> from jaxopt_serve.prune.structured import apply_plan
    >>> f = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
    >>> p = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 3))}
    >>> a = analyze(Model.function(f, p, jnp.ones((2, 4))))
    >>> kept = {a.groups[0].name: np.arange(5)}
    >>> small = program_fn(a, kept)
    >>> v = apply_plan({"params": p}, a.groups, kept)
    >>> small(v, jnp.ones((7, 4))).shape, v["params"]["w1"].shape
    ((7, 3), (4, 5))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np

from jaxopt_serve import native
from jaxopt_serve.prune.coupling import Analysis, Body, Dim, Step, analyze, find
from jaxopt_serve.trace import path_of, trace


class _Sizes:
    """New sizes and kept positions of the program's dimensions, for one batch size."""

    def __init__(self, kept: Mapping[int, np.ndarray], inputs: Mapping[int, int]) -> None:
        self.kept = kept
        self._size: dict[int, int] = dict(inputs)  # the call's input sizes (batch, sequence length, ...)

    def size(self, d: Dim) -> int:
        r = find(d)
        if id(r) in self._size:
            return self._size[id(r)]
        if r.split is not None:
            sizes = [self.size(p) for p in r.split[1]]
            value = _prod(sizes) if r.split[0] == "prod" else sum(sizes)
        elif id(r) in self.kept:
            value = len(self.kept[id(r)])
        else:
            value = r.size
        self._size[id(r)] = value
        return value

    def shape(self, exprs: Any) -> tuple[int, ...]:
        return tuple(_prod([self.size(d) for d in e]) for e in exprs)

    def index(self, expr: Any) -> np.ndarray:
        """Kept positions, in the original axis, of an axis made of ``expr`` (constants only: no batch)."""
        idx = np.zeros(1, int)
        for d in expr:
            idx = (idx[:, None] * d.size + self._index(d)[None, :]).ravel()
        return idx

    def _index(self, d: Dim) -> np.ndarray:
        r = find(d)
        if r.split is not None:
            kind, parts = r.split
            if kind == "prod":
                return self.index(parts)
            offsets = np.cumsum([0] + [p.size for p in parts])
            return np.concatenate([self._index(p) + o for p, o in zip(parts, offsets)])
        if id(r) in self.kept:
            return np.asarray(self.kept[id(r)], int)
        return np.arange(r.size)


def program_fn(analysis: Analysis, kept: Mapping[str, np.ndarray]) -> Callable[..., Any]:
    """``f(variables, *inputs)``: the analysed model's program with only ``kept`` units of each group.

    ``variables`` are the smaller ones (``apply_plan``). Inputs may have other sizes than the example
    (batch, sequence length) where the program does not fix them. Where the traced program computes with
    such a size (a mean over the batch, as BatchNorm's training statistics take, or over the tokens: a
    constant ``1/8`` in the program), a call at another concrete size is analysed again at that size (once
    per input shape); a symbolic size there (``jax.export``) raises ``ValueError`` naming the input axis.
    """
    unknown = sorted(set(kept) - set(analysis.roots))
    if unknown:
        raise ValueError(f"kept names groups the analysis did not find: {unknown}; groups are {sorted(analysis.roots)}")
    by_root = {id(find(analysis.roots[name])): np.asarray(idx, int) for name, idx in kept.items()}
    program = analysis.program
    in_tree = jax.tree.structure(analysis.model.example)
    var_paths = list(analysis.var_exprs)
    sized = _OtherSizes(analysis, kept)

    def run(variables: Any, *inputs: Any) -> Any:
        leaves = jax.tree_util.tree_leaves_with_path(variables)
        names = [path_of(p) for p, _ in leaves]
        if names != var_paths:
            missing = sorted(set(var_paths) - set(names))
            extra = sorted(set(names) - set(var_paths))
            raise ValueError(f"variables do not fit the pruned program: missing {missing[:5]}, extra {extra[:5]}")
        flat_in = in_tree.flatten_up_to(tuple(inputs))
        seen = {}
        for x, exprs in zip(flat_in, analysis.input_exprs):
            for n, (d,) in zip(np.shape(x), exprs):  # n may be symbolic (jax.export)
                if not _same(seen.setdefault(id(find(d)), n), n):
                    raise ValueError(f"inputs disagree on an axis the model shares: sizes {seen[id(find(d))]} and {n}")
        stale = sized.stale(seen)
        if stale:
            return sized.program([np.shape(x) for x in flat_in], stale)(variables, *inputs)
        sizes = _Sizes(by_root, seen)
        for name, (_, leaf) in zip(names, leaves):
            want = sizes.shape(analysis.var_exprs[name])
            if tuple(np.shape(leaf)) != want:
                raise ValueError(
                    f"variable {name} has shape {tuple(np.shape(leaf))}, the pruned program expects {want}"
                )
        outs = _run_body(program, program.consts, [x for _, x in leaves] + list(flat_in), sizes)
        return jax.tree.unflatten(analysis.out_tree, outs)

    return run


class _OtherSizes:
    """Which input sizes the traced program computes with, and the program analysed again at other ones.

    An input axis is *free* when tracing the model with that axis one longer gives the same operations,
    literals and constants (only shapes change, which the re-run recomputes). Each axis is probed once, on
    the first call that changes it.
    """

    _MAX_PROGRAMS = 16

    def __init__(self, analysis: Analysis, kept: Mapping[str, np.ndarray]) -> None:
        self.analysis, self.kept = analysis, kept
        self.roots = {id(find(e[0])): find(e[0]) for exprs in analysis.input_exprs for e in exprs}
        self.axes = {
            r: [
                (i, k)
                for i, exprs in enumerate(analysis.input_exprs)
                for k, e in enumerate(exprs)
                if id(find(e[0])) == r
            ]
            for r in self.roots
        }
        self._free: dict[int, bool] = {}
        self._base: Any = None
        self._programs: dict[Any, Callable[..., Any]] = {}

    def stale(self, seen: Mapping[int, Any]) -> list[int]:
        """The input dimensions called at another size than traced, where the program computes with that size
        (empty: the program re-runs as is)."""
        return [r for r, n in seen.items() if not _same(n, self.roots[r].size) and not self._is_free(r)]

    def program(self, shapes: list[tuple[Any, ...]], stale: list[int]) -> Callable[..., Any]:
        """The pruned program analysed at these input shapes (cached); ``stale`` names the changed sizes."""
        key = tuple(shapes)
        if key in self._programs:
            return self._programs[key]
        if not all(isinstance(n, (int, np.integer)) for shape in shapes for n in shape):
            axis = stale[0]
            leaf, k = self.axes[axis][0]
            raise ValueError(
                f"the pruned program computes with the size of input {leaf} axis {k} (traced at "
                f"{self.roots[axis].size}), so it runs only at concrete sizes there, not a symbolic one; "
                "export it with that axis fixed"
            )
        model = self.analysis.model
        example = jax.tree.unflatten(
            jax.tree.structure(model.example),
            [np.zeros(shape, np.asarray(x).dtype) for shape, x in zip(shapes, jax.tree.leaves(model.example))],
        )
        again = analyze(dataclasses.replace(model, example=example), **self.analysis.options)
        before = {name: find(d).size for name, d in self.analysis.roots.items()}
        after = {name: find(d).size for name, d in again.roots.items()}
        if any(after.get(name) != before[name] for name in self.kept):
            raise ValueError(
                f"at input shapes {list(shapes)} the model's groups are {after}, not the pruned ones {before}"
            )
        if len(self._programs) >= self._MAX_PROGRAMS:
            self._programs.pop(next(iter(self._programs)))
        self._programs[key] = program_fn(again, self.kept)
        return self._programs[key]

    def _is_free(self, root: int) -> bool:
        if root not in self._free:
            if self._base is None:
                self._base = self._constants({})
            try:
                self._free[root] = self._constants({root: 1}) == self._base
            except Exception:  # noqa: BLE001 - a model that does not trace at another size fixes that size
                self._free[root] = False
        return self._free[root]

    def _constants(self, grow: Mapping[int, int]) -> list[Any]:
        model = self.analysis.model
        specs = []
        for i, x in enumerate(jax.tree.leaves(model.example)):
            shape = list(np.shape(x))
            for r, extra in grow.items():
                for leaf, k in self.axes[r]:
                    if leaf == i:
                        shape[k] += extra
            specs.append(jax.ShapeDtypeStruct(tuple(shape), np.asarray(x).dtype))
        with native.use_kernel("xla"):
            closed, _ = trace(
                model.apply_fn, model.variables, *jax.tree.unflatten(jax.tree.structure(model.example), specs)
            )
        return _fingerprint(closed.jaxpr, closed.consts)


def _fingerprint(jaxpr: Any, consts: list[Any]) -> list[Any]:
    """The operations, literals and constants of a program, nested programs included (shapes left out)."""
    out: list[Any] = [(np.shape(c), np.asarray(c).tobytes()) for c in consts]
    for eqn in jaxpr.eqns:
        out.append(eqn.primitive.name)
        out.extend(repr(v.val) for v in eqn.invars if isinstance(v, jcore.Literal))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    out.extend(_fingerprint(sub.jaxpr, list(sub.consts)))
                elif isinstance(sub, jcore.Jaxpr):
                    out.extend(_fingerprint(sub, []))
    return out


def _prod(sizes: list[Any]) -> Any:
    """The product of sizes: an int, or a symbolic dimension when one of them is (``jax.export``)."""
    value = 1
    for size in sizes:
        value = value * size
    return value if not isinstance(value, (int, np.integer)) else int(value)


def _same(a: Any, b: Any) -> bool:
    """Whether two sizes, int or symbolic, are known to be equal."""
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - symbolic sizes that cannot be compared are not known to be equal
        return False


def _take(x: Any, exprs: Any, sizes: _Sizes) -> Any:
    for axis, expr in enumerate(exprs):
        if sizes.shape((expr,))[0] != np.shape(x)[axis]:
            x = np.take(np.asarray(x), sizes.index(expr), axis=axis)
    return x


def _run_body(body: Body, consts: list[Any], args: list[Any], sizes: _Sizes) -> list[Any]:
    env: dict[Any, Any] = {}
    jaxpr = body.jaxpr

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c, e in zip(jaxpr.constvars, consts, body.const_exprs):
        env[v] = _take(c, e, sizes)
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for step in body.steps:
        outs = _run_step(step, [read(v) for v in step.eqn.invars], sizes)
        for v, o in zip(step.eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _run_step(step: Step, invals: list[Any], sizes: _Sizes) -> list[Any]:
    eqn = step.eqn
    name = eqn.primitive.name
    if name == "scan":
        return _run_scan(step, invals, sizes)
    if isinstance(step.body, Body):
        return _run_body(step.body, step.body.consts, invals, sizes)
    if isinstance(step.body, list):
        branches = [lambda *ops, b=b: _run_body(b, b.consts, list(ops), sizes) for b in step.body]
        return list(jax.lax.switch(invals[0], branches, *invals[1:]))
    params = dict(eqn.params)
    out_shapes = [sizes.shape(e) for e in step.outs]
    if name == "reshape":
        params["new_sizes"] = out_shapes[0]
    elif name in ("broadcast_in_dim", "iota") or (name not in _KEEP_SHAPE and "shape" in params):
        params["shape"] = out_shapes[0]
    elif name == "split":
        params["sizes"] = tuple(s[params["axis"]] for s in out_shapes)
    elif name == "slice":
        params.update(_slice_bounds(step, sizes))
    elif name == "dynamic_slice":
        params["slice_sizes"] = out_shapes[0]
    elif name == "gather":
        old = eqn.invars[0].aval.shape
        new = sizes.shape(step.ins[0])
        params["slice_sizes"] = tuple(n if s == o else s for s, o, n in zip(params["slice_sizes"], old, new))
    elif name == "conv_general_dilated" and step.note is not None:
        params["feature_group_count"] = sizes.size(step.note)
    bind = eqn.primitive.get_bind_params(params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **bind)
    return list(out) if eqn.primitive.multiple_results else [out]


def _run_scan(step: Step, invals: list[Any], sizes: _Sizes) -> list[Any]:
    """``lax.scan`` of the walked body at the smaller shapes (the same direction and unrolling).

    A scan over values takes its length from them (a time scan re-runs at the call's sequence length, symbolic
    under ``jax.export``); a scan over no values keeps its traced length.
    """
    p = step.eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:n_consts], invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]

    def iteration(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
        outs = _run_body(step.body, step.body.consts, list(consts) + list(carry) + list(x), sizes)
        return outs[:n_carry], outs[n_carry:]

    carry, ys = jax.lax.scan(
        iteration, list(init), list(xs), length=None if xs else p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    return list(carry) + list(ys)


_KEEP_SHAPE = frozenset({"reshape", "broadcast_in_dim", "iota"})


def _slice_bounds(step: Step, sizes: _Sizes) -> dict[str, tuple[int, ...]]:
    p = step.eqn.params
    old_in = step.eqn.invars[0].aval.shape
    new_in = sizes.shape(step.ins[0])
    strides = p.get("strides") or (1,) * len(old_in)
    starts, limits = [], []
    for k, (start, stop) in enumerate(zip(p["start_indices"], p["limit_indices"])):
        note = step.note[k] if step.note else None
        if start == 0 and stop == old_in[k] and strides[k] == 1:
            starts.append(0)
            limits.append(new_in[k])
        elif note is not None:
            before, inside = note
            begin = sum(sizes.size(d) for d in before)
            starts.append(begin)
            limits.append(begin + sum(sizes.size(d) for d in inside))
        else:
            starts.append(start)
            limits.append(stop)
    return {"start_indices": tuple(starts), "limit_indices": tuple(limits)}
