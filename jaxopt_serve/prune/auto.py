"""Structured pruning of any model: name a model and a ratio, get a smaller model back.

``prune_model(model, 0.5)`` finds the coupled groups from the traced program
(``coupling.analyze``), ranks each group's units (``group_scores``: L1, L2,
or gradient x weight), keeps the best ones (per layer or globally, rounded to
a multiple, never touching ``protect`` ed paths) and returns a smaller model
that runs at the smaller shapes, built the first way that works:

1. NNX (``Model.nnx``): the module is shrunk in place: its parameters and
   state get the smaller arrays and the size attributes of Flax's own layers
   are updated (``Linear``, ``LinearGeneral``, ``Conv``, ``BatchNorm``,
   ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``MultiHeadAttention``, ``Embed``).
2. Linen (``Model.linen``): the module is rebuilt with smaller size fields:
   every integer field (also inside tuples, nested modules and dataclass
   configs) equal to the old size of pruned groups becomes their new size,
   when all groups of that old size got the same new size. ``ResNet(widths=
   (16, 32))`` at 50% becomes ``ResNet(widths=(8, 16))``.
3. Otherwise (a Linen module with sizes written as literals in its body, a
   size the fields cannot state such as fewer heads at a fixed
   ``qkv_features``, a plain function, a rebuilt module that does not check
   out): the traced program re-run at the smaller shapes (``rerun``), as a
   ``Model.function``. It runs, jits, saves and exports like any model. Its
   training step is the model's own (dropout, updated BatchNorm statistics),
   traced and re-run the same way; where that step cannot be traced or couples
   the units otherwise, training runs the inference program and ``note`` says why.

A rebuilt or shrunk module is accepted only when its variables have exactly
the pruned shapes and its outputs on the example inputs match the masked
original's (``mask_plan``); ``AutoPruneResult.how`` says which path was taken
and ``note`` why an earlier one was not.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np

from jaxopt_serve.model import Model, Variables, as_model
from jaxopt_serve.prune.coupling import Analysis, Refusal, analyze
from jaxopt_serve.prune.rerun import program_fn
from jaxopt_serve.prune.structured import Criterion, Group, apply_plan, check_groups, mask_plan, plan
from jaxopt_serve.trace import path_of

How = Literal["nnx", "linen", "program"]


@dataclasses.dataclass
class AutoPruneResult:
    """A structurally pruned model.

    Attributes:
        model: the smaller ``Model`` (holding ``variables``).
        variables: the smaller variables.
        how: ``"nnx"`` (module shrunk in place), ``"linen"`` (module rebuilt with smaller fields) or
            ``"program"`` (the traced program re-run at the smaller shapes).
        module: the shrunk NNX module or the rebuilt Linen module; ``None`` for ``"program"``.
        groups: the groups that were pruned (after ``protect``).
        kept: kept unit indices per group.
        sizes: ``(before, after)`` units per group.
        refused: parameter axes the analysis left whole, with the operation and the reason.
        note: why an earlier path was not taken, and for ``"program"`` why training steps run the inference
            program instead of the model's own training step (empty when the first one worked).
        analysis: the coupling analysis of the original model.
    """

    model: Model
    variables: Variables
    how: How
    module: Any
    groups: list[Group]
    kept: dict[str, np.ndarray]
    sizes: dict[str, tuple[int, int]]
    refused: list[Refusal]
    note: str
    analysis: Analysis

    def masked_variables(self) -> Variables:
        """The original full-size variables with the removed units' slices set to zero."""
        return mask_plan(self.analysis.model.variables, self.groups, self.kept)


def select_groups(
    analysis: Analysis,
    sparsity: float | Mapping[str, float],
    *,
    protect: Iterable[str] = (),
) -> tuple[list[Group], float | dict[str, float]]:
    """The groups to prune and their targets, as ``plan`` takes them.

    ``sparsity`` keys and ``protect`` patterns are regexes matched in full
    against group names or against any slice's path (``"params/block1/conv1/kernel"``).
    A key that matches nothing prunable but names a refused axis raises a
    ``ValueError`` with the path, the operation and the reason.
    """
    protect = [str(p) for p in protect]
    groups = [g for g in analysis.groups if not any(_matches(p, g) for p in protect)]
    if not isinstance(sparsity, Mapping):
        return groups, sparsity
    targets: dict[str, float] = {}
    for pattern, value in sparsity.items():
        matched = [g for g in groups if _matches(pattern, g)]
        if not matched:
            raise ValueError(_no_group_message(analysis, pattern, protect))
        for g in matched:
            targets.setdefault(re.escape(g.name), float(value))
    return groups, targets


def _matches(pattern: str, group: Group) -> bool:
    return bool(re.fullmatch(pattern, group.name) or any(re.fullmatch(pattern, s.path) for s in group.slices))


def _no_group_message(analysis: Analysis, pattern: str, protect: Sequence[str]) -> str:
    refused = [r for r in analysis.refused if any(re.fullmatch(pattern, a.split("[")[0]) for a in r.axes)]
    if refused:
        lines = "; ".join(
            f"{', '.join(a for a in r.axes if re.fullmatch(pattern, a.split('[')[0]))}: {r.reason} "
            f"(operation: {r.primitive})"
            for r in refused[:4]
        )
        return f"cannot prune {pattern!r}: {lines}"
    if any(_matches(pattern, g) for g in analysis.groups):
        return f"cannot prune {pattern!r}: it is protected by {list(protect)}"
    names = [g.name for g in analysis.groups]
    return f"cannot prune {pattern!r}: no parameter path or group matches; groups are {names}"


def prune_model(
    model: Any,
    sparsity: float | Mapping[str, float],
    *,
    criterion: Criterion = "l1",
    grads: Any | None = None,
    scope: Literal["layer", "global"] = "layer",
    multiple: int = 1,
    protect: Iterable[str] = (),
    head_dims: bool = False,
    analysis: Analysis | None = None,
    rebuild: bool = True,
) -> AutoPruneResult:
    """Remove the least important units of every coupled group found in ``model``'s program.

    Args:
        model: a ``Model`` (``Model.linen`` / ``Model.nnx`` / ``Model.function``).
        sparsity: the fraction of units to remove from every group, or ``{regex: fraction}`` over group
            names or parameter paths (first match wins; unmatched groups stay whole).
        criterion: ``"l1"``, ``"l2"`` or ``"taylor"`` (gradient x weight; needs ``grads`` shaped like
            ``variables["params"]``, e.g. ``masks.mean_gradients`` over calibration batches).
        grads: gradients for ``"taylor"``.
        scope: ``"layer"`` (each group loses the fraction) or ``"global"`` (units ranked across groups).
        multiple: round every kept count to this multiple (8, 128).
        protect: regexes of parameter paths (or group names) whose groups stay whole.
        head_dims: also prune dimensions inside attention heads (see ``coupling.analyze``).
        analysis: a precomputed ``coupling.analyze(model)`` (saves a trace).
        rebuild: try the NNX shrink / Linen rebuild before the re-run program.

    Returns:
        ``AutoPruneResult``.

    Raises:
        ValueError: a ``sparsity`` key that names only refused axes (the message gives the path, the
            operation and the reason), an unknown criterion, or variables that are not arrays.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> class Net(nn.Module):
        ...     width: int = 16
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return nn.Dense(3)(nn.relu(nn.Dense(self.width)(x)))  # Dense_1 is the hidden layer
        >>> x = jnp.ones((2, 5))
        >>> net = Net()
        >>> small = prune_model(Model.linen(net, net.init(jax.random.key(0), x), x), 0.5)
        >>> small.how, small.module.width, small.sizes
        ('linen', 8, {'Dense_1': (16, 8)})
    """
    model = as_model(model)
    analysis = analysis or analyze(model, head_dims=head_dims)
    groups, targets = select_groups(analysis, sparsity, protect=protect)
    variables = model.variables
    kept = (
        plan(variables, groups, targets, criterion=criterion, grads=grads, multiple=multiple, scope=scope)
        if groups
        else {}
    )
    before = check_groups(variables, groups)
    sizes = {g.name: (before[g.name], len(kept[g.name])) for g in groups}
    small_vars = apply_plan(variables, groups, kept) if groups else variables
    notes: list[str] = []
    result_model, module, how = None, None, "program"
    if rebuild and model.kind in ("nnx", "linen") and any(a != b for a, b in sizes.values()):
        builder = _shrunk_nnx if model.kind == "nnx" else _rebuilt_linen
        try:
            result_model, module = builder(model, small_vars, analysis, sizes)
            _check_outputs(result_model, small_vars, _masked_outputs(model, mask_plan(variables, groups, kept)))
            how = model.kind
        except _NoRebuild as why:
            notes.append(str(why))
            result_model, module = None, None
    if result_model is None:
        train, why = _training_program(model, analysis, groups, kept, small_vars, head_dims)
        if why:
            notes.append(why)
        fn = program_fn(analysis, kept)
        result_model = Model.function(fn, small_vars, *model.example, train_fn=train, name=f"{model.name}_pruned")
    return AutoPruneResult(
        result_model, small_vars, how, module, groups, kept, sizes, list(analysis.refused), "; ".join(notes), analysis
    )


# The traced training step takes its key as this extra variable collection (key data), so that the
# re-run program draws fresh dropout masks at every step instead of holding one key as a constant.
_RNG_COLLECTION = "prune_step_key"


def _training_program(
    model: Model,
    analysis: Analysis,
    groups: Sequence[Group],
    kept: Mapping[str, np.ndarray],
    small: Variables,
    head_dims: bool,
) -> tuple[Any, str]:
    """``(train_fn, "")``: the model's training step re-run at the smaller shapes; ``(None, why)`` otherwise.

    The training step (dropout on, BatchNorm statistics updated and returned) is traced and analysed
    like the inference program, its updated state free to shrink with the parameters; it is used
    when it finds the same groups, so the kept units mean the same thing in both programs.
    """
    key_data = jax.random.key_data(jax.random.key(0))

    def step(variables: Variables, *inputs: Any) -> Any:
        rest = {k: v for k, v in variables.items() if k != _RNG_COLLECTION}
        return model.train_step_apply(rest, *inputs, rng=jax.random.wrap_key_data(variables[_RNG_COLLECTION]))

    try:
        view = Model.function(step, {**model.variables, _RNG_COLLECTION: key_data}, *model.example)
        outputs = jax.eval_shape(step, view.variables, *model.example)[0]
        trained = analyze(view, head_dims=head_dims, fixed_outputs=len(jax.tree.leaves(outputs)))
    except Exception as err:  # noqa: BLE001 - any failure here means: train with the inference program
        return None, f"training steps run the inference program: tracing the training step failed ({err})"
    found = {tuple(g.slices): g.name for g in trained.groups}
    differ = sorted(g.name for g in groups if tuple(g.slices) not in found)
    if differ:
        return None, f"training steps run the inference program: the training step couples {differ[:3]} otherwise"
    program = program_fn(trained, {found[tuple(g.slices)]: kept[g.name] for g in groups})

    def train(variables: Variables, *inputs: Any, rng: jax.Array | None = None) -> tuple[Any, Variables]:
        key = jax.random.key(0) if rng is None else rng  # like Model.train_step_apply without a key
        return program({**variables, _RNG_COLLECTION: jax.random.key_data(key)}, *inputs)

    try:
        _, updates = jax.eval_shape(train, small, *model.example)
        want, have = _path_shapes(small), _path_shapes(updates)
        wrong = sorted(k for k, shape in have.items() if k in want and want[k] != shape)
    except Exception as err:  # noqa: BLE001 - a re-run training step that fails: train with the inference program
        return None, f"training steps run the inference program: the smaller training step fails ({err})"
    if wrong:
        return (
            None,
            f"training steps run the inference program: the smaller training step updates {wrong[:3]} at other shapes",
        )
    return train, ""


class _NoRebuild(Exception):
    """The module could not be shrunk or rebuilt (the message says why)."""


def _masked_outputs(model: Model, masked: Variables) -> Any:
    return jax.jit(model.apply_fn)(masked, *model.example)


def _check_outputs(model: Model, variables: Variables, reference: Any) -> None:
    try:
        got = jax.jit(model.apply_fn)(variables, *model.example)
    except Exception as err:  # noqa: BLE001 - any failure of the rebuilt module means: use the program
        raise _NoRebuild(f"the rebuilt module fails on the example inputs: {type(err).__name__}: {err}") from err
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(1.0, float(np.abs(b).max(initial=0.0)))
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-5 * scale):
            raise _NoRebuild(
                "the rebuilt module does not compute what the masked original computes "
                "(a size it derives from a field, such as an attention scale)"
            )


# -- Linen: rebuild with smaller size fields ----------------------------------------------------------


def size_map(sizes: Mapping[str, tuple[int, int]]) -> dict[int, int]:
    """``{old size: new size}`` for the pruned groups, leaving out sizes that got different new sizes."""
    seen: dict[int, set[int]] = {}
    for old, new in sizes.values():
        if old != new:
            seen.setdefault(old, set()).add(new)
    return {old: news.pop() for old, news in seen.items() if len(news) == 1}


def replace_sizes(value: Any, mapping: Mapping[int, int]) -> Any:
    """``value`` with every integer in ``mapping`` replaced: in tuples, lists, Linen modules and dataclasses.

    Example:
        >>> replace_sizes((16, 32, 10), {16: 8, 32: 16})
        (8, 16, 10)
    """
    import flax.linen as nn

    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return mapping.get(value, value)
    if isinstance(value, (tuple, list)):
        return type(value)(replace_sizes(v, mapping) for v in value)
    if isinstance(value, nn.Module):
        changes = {}
        for f in dataclasses.fields(value):
            if f.name in ("parent", "name") or not f.init:
                continue
            old = getattr(value, f.name)
            new = replace_sizes(old, mapping)
            if new is not old and new != old:
                changes[f.name] = new
        return value.clone(**changes) if changes else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: replace_sizes(getattr(value, f.name), mapping) for f in dataclasses.fields(value) if f.init}
        changes = {k: v for k, v in changes.items() if v is not getattr(value, k) and v != getattr(value, k)}
        try:
            return dataclasses.replace(value, **changes) if changes else value
        except (TypeError, ValueError):
            return value
    return value


def _rebuilt_linen(model: Model, small: Variables, analysis: Analysis, sizes: Mapping[str, tuple[int, int]]):
    source = model.source
    if source is None:
        raise _NoRebuild("the Model does not record its Linen module (Model.source)")
    module = source.module
    mapping = size_map(sizes)
    new = replace_sizes(module, mapping)
    if new is module:
        raise _NoRebuild(f"no field of {type(module).__name__} holds the pruned sizes {sorted(mapping)}")
    method, eval_kwargs = source.method, dict(source.eval_kwargs)
    try:
        shapes = jax.eval_shape(lambda: new.init(jax.random.key(0), *model.example, method=method, **eval_kwargs))
    except Exception as err:  # noqa: BLE001
        raise _NoRebuild(f"{type(module).__name__} with smaller fields does not initialize: {err}") from err
    _same_shapes(shapes, small, type(module).__name__)
    rebuilt = Model.linen(
        new,
        small,
        *model.example,
        method=method,
        eval_kwargs=eval_kwargs,
        train_kwargs=source.train_kwargs,
        rng_names=source.rng_names,
        name=f"{model.name}_pruned",
    )
    return rebuilt, new


def _same_shapes(expected: Any, small: Variables, what: str) -> None:
    want, have = _path_shapes(dict(expected)), _path_shapes(small)
    for path, shape in have.items():
        if want.get(path) != shape:
            raise _NoRebuild(
                f"{what} with smaller fields makes {path} {want.get(path)}, the pruned variable is {shape}"
            )


def _path_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"collection/.../leaf": shape}`` of a variables pytree (arrays or ``ShapeDtypeStruct`` s)."""
    return {path_of(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# -- NNX: shrink in place -------------------------------------------------------------------------------


def shrink_nnx(module: Any) -> Any:
    """Update the size attributes of Flax's NNX layers in ``module`` from the shapes of their parameters.

    Call it after putting smaller arrays into the module (``nnx.update`` or
    ``Model.nnx_module(smaller_variables)``); returns ``module``, changed in place.
    """
    from flax import nnx

    for _, m in nnx.iter_graph(module):
        if isinstance(m, nnx.Module):
            _fix_sizes(m)
    return module


def _shape(m: Any, name: str) -> tuple[int, ...] | None:
    leaf = getattr(m, name, None)
    shape = getattr(leaf, "shape", None)
    return tuple(shape) if shape is not None else None


def _fix_sizes(m: Any) -> None:
    from flax import nnx

    if isinstance(m, nnx.Linear) and (k := _shape(m, "kernel")):
        m.in_features, m.out_features = k[0], k[1]
    elif isinstance(m, nnx.LinearGeneral) and (k := _shape(m, "kernel")):
        n_in = len(m.in_features) if isinstance(m.in_features, tuple) else 1
        batch = len(getattr(m, "batch_axis", {}) or {})
        ins, outs = k[batch : batch + n_in], k[batch + n_in :]
        m.in_features = ins if isinstance(m.in_features, tuple) else ins[0]
        m.out_features = outs if isinstance(m.out_features, tuple) else outs[0]
    elif isinstance(m, nnx.Conv) and (k := _shape(m, "kernel")):
        groups = m.feature_group_count
        if groups > 1 and groups == m.in_features:  # depthwise: one input channel per group
            groups = k[-1] * groups // m.out_features
            m.feature_group_count = groups
        m.in_features, m.out_features = k[-2] * groups, k[-1]
    elif isinstance(m, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)):
        for leaf in ("scale", "bias", "mean", "var"):
            if (s := _shape(m, leaf)) is not None:
                m.num_features = s[-1]
                break
    elif isinstance(m, nnx.MultiHeadAttention) and (q := _shape(m.query, "kernel")):
        m.in_features, m.num_heads, m.head_dim = q[0], q[-2], q[-1]
        m.qkv_features = q[-2] * q[-1]
        if hasattr(m, "num_kv_heads"):
            m.num_kv_heads = _shape(m.key, "kernel")[-2]
        if hasattr(m, "in_kv_features"):
            m.in_kv_features = _shape(m.key, "kernel")[0]
        m.out_features = _shape(m.out, "kernel")[-1]
    elif isinstance(m, nnx.Embed) and (e := _shape(m, "embedding")):
        m.num_embeddings, m.features = e


def _shrunk_nnx(model: Model, small: Variables, analysis: Analysis, sizes: Mapping[str, tuple[int, int]]):
    try:
        module = model.nnx_module(small)
    except Exception as err:  # noqa: BLE001
        raise _NoRebuild(f"the NNX module does not take the smaller arrays: {err}") from err
    shrink_nnx(module)
    try:
        smaller = Model.nnx(
            module,
            *model.example,
            eval_kwargs=model.source.eval_kwargs,
            train_kwargs=model.source.train_kwargs,
            name=f"{model.name}_pruned",
        )
    except Exception as err:  # noqa: BLE001
        raise _NoRebuild(f"the shrunk NNX module fails on the example inputs: {type(err).__name__}: {err}") from err
    have, want = _path_shapes(smaller.variables), _path_shapes(small)
    if have != want:
        bad = sorted(k for k in want if have.get(k) != want[k])[:3]
        raise _NoRebuild(f"the shrunk NNX module holds other shapes at {bad}")
    return smaller.with_variables(small), module
