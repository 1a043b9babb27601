"""Run a model on quantized variables without rewriting the model.

Any ``Model`` (Linen, NNX, a plain function) or reference config: the model is
traced to a jaxpr with float placeholders for its quantized leaves
(``QArray``), and the jaxpr is evaluated here (``jaxopt_serve.trace``). Every
``dot_general`` (``@``, ``jnp.dot``, ``jnp.einsum``, any Flax layer) and
``conv_general_dilated`` whose weight operand is a quantized leaf, directly or
through reshapes, transposes and dtype converts, runs in the chosen mode; the
rest of the program runs as written. Modes:

* ``"weight_only"``: dequantize the kernel inside the compiled function, then
  the model's own float dot/conv (what TPU and GPU fuse into the matmul).
* ``"dynamic"``: quantize activations per row of the dot (per example for
  convs) at run time and run a real ``int8 x int8 -> int32`` dot / convolution,
  then rescale by the activation and weight scales.
* ``"static"``: like ``"dynamic"`` with per-layer activation scales fixed by
  ``calibrate`` (stored in the variables under ``"quant_act"``).
* ``"auto"``: on CPU, ``"dynamic"`` for dots with kernels of 65,536 elements
  or more (a dot with a single row is padded to two rows, which avoids
  XLA:CPU's slow int8 matrix-vector path), and for 2-D ungrouped convolutions
  with kernels of 4,096 elements or more when the native kernels run (without
  them XLA:CPU's int8 convolution measured slower than f32);
  ``"weight_only"`` for smaller dots and convolutions, for the other
  convolutions and on every other backend. Those are the rules; on CPU with
  the native kernels, a layer with 2**22 or more multiply-adds at the traced
  shape is instead timed alone in both forms, once per shape, and runs the
  faster one (``jaxopt_serve.quant.measure``; ``JAXOPT_SERVE_AUTO=rules``
  keeps the rules).

Integer convolutions go through ``intconv.int8_conv`` (windows + one integer
dot): XLA:CPU's own int8 convolution returns wrong int32 values under some
shardings (see that module).

Asymmetric activations: the layers listed under ``variables["quant_asym"]``
(``mark_asymmetric``) quantize their dot inputs per row over ``[min, max]``
with a zero point in ``"dynamic"`` mode: twice the resolution for one-signed
inputs such as a GELU's output. The zero point costs one
``zero_point x column sums of the kernel`` correction. ``bits=7`` marks use
127 steps with codes in ``[0, 127]``: the grid PyTorch's x86 dynamic
quantization uses, which the native AVX2 kernel multiplies without a sign
fix-up (about 1.4x the symmetric path's int8 throughput); on one-signed inputs
it is as fine as the symmetric 8-bit grid. ``"static"`` mode keeps
its calibrated symmetric scales. SmoothQuant factors (``"quant_smooth"``)
scale a smoothed dot's input along its contracted axes by their reciprocals
(``x * (1 / s)``, ``native.smooth_multipliers``), in every mode.

Kernels whose scale varies along the contracted axes (per-group, or
per-channel on an input axis) and asymmetric conv kernels take the
``"weight_only"`` path in every mode: the integer dot would need a scale
inside the sum. ``execution_report`` says which path each kernel took.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_serve import native
from jaxopt_serve.model import Model, as_model
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables, predict_fn
from jaxopt_serve.quant import measure
from jaxopt_serve.quant.intconv import int8_conv, native_conv2d_kind
from jaxopt_serve.quant.qarray import QArray, has_qarrays, is_qarray
from jaxopt_serve.trace import (
    BiasAdd,
    Tagged,
    UnsupportedUse,
    interpret,
    keepdims_constant_along,
    path_of,
    replay,
    trace,
    view_axes,
    view_keepdims,
)

Mode = Literal["weight_only", "dynamic", "static", "auto"]
MODES = ("weight_only", "dynamic", "static", "auto")
ACT_COLLECTION = "quant_act"
# Per-input-channel smoothing factors (SmoothQuant): the stored kernel is W * s, the layer's input is x * (1 / s).
SMOOTH_COLLECTION = "quant_smooth"
# Layers whose inputs are quantized asymmetrically per row in "dynamic" mode: {layer path: True (8 bits) or 7}.
ASYM_COLLECTION = "quant_asym"
COLLECTIONS = (ACT_COLLECTION, SMOOTH_COLLECTION, ASYM_COLLECTION)
_QMAX = 127.0


# ---------------------------------------------------------------------------- the math


def _integer_ok(kernel: QArray, contract: Sequence[int], *, conv: bool = False) -> bool:
    """The integer path needs one scale per output element: constant along the contraction axes."""
    if kernel.granularity == "group" or kernel.bits > 8:
        return False
    if conv and kernel.zero_point is not None:
        return False
    return all(kernel.scale.shape[a] == 1 for a in contract)


# Below this many kernel elements, dequantizing costs less than quantizing the activations (auto mode).
_SMALL_KERNEL = 1 << 16


# Below this many kernel elements a convolution is too narrow for the int8 kernel to pay (auto mode): the
# first layer of an image model (3 input channels: 3x3x3x32 = 864 elements) ran slower in int8 than in f32.
_SMALL_CONV_KERNEL = 1 << 12


def _native_conv_kind(params: Mapping[str, Any]) -> bool:
    """Whether a traced convolution with these params is of the native int8 kernel's kind (``native_conv2d_kind``)."""
    spatial_dims = len(params["window_strides"])
    groups = max(params.get("feature_group_count", 1), params.get("batch_group_count", 1))
    return native_conv2d_kind(spatial_dims, groups, params.get("lhs_dilation") or (1,) * spatial_dims)


def _resolve_conv(mode: str, kernel_size: int, params: Mapping[str, Any]) -> str:
    """auto: the native int8 convolution (2-D, ungrouped) for kernels of 4,096 elements or more, else weight_only."""
    if mode != "auto":
        return mode
    native_conv = _native_conv_kind(params) and native.available()
    return "dynamic" if native_conv and kernel_size >= _SMALL_CONV_KERNEL else "weight_only"


def _resolve(mode: str, kernel_size: int) -> str:
    if mode != "auto":
        return mode
    if jax.default_backend() != "cpu" or kernel_size < _SMALL_KERNEL:
        return "weight_only"
    return "dynamic"


# Asymmetric activation grids by bits: (steps, code offset); codes are
# clip(round(x / s) + zero, -offset, steps - offset).
_ASYM_GRIDS = {8: (254.0, 127.0), 7: (127.0, 0.0)}


def _check_act_bits(bits: int) -> int:
    if bits not in _ASYM_GRIDS:
        raise ValueError(f"act_bits must be 8 or 7, got {bits!r}")
    return bits


def _asym_mark(bits: int) -> Any:
    """The ``quant_asym`` mark for ``bits``: ``True`` for 8 (the original form), int8 ``7`` for 7."""
    return np.bool_(True) if bits == 8 else np.int8(bits)


def _mark_bits(key: str, mark: Any) -> int:
    """The bits of a ``quant_asym`` mark, read from its dtype (marks may be traced): bool (True) is 8, int8 (7) is 7."""
    dtype, shape = jnp.result_type(mark), jnp.shape(mark)
    if shape == () and dtype == jnp.bool_:
        return 8
    if shape == () and dtype == jnp.int8:
        return 7
    raise ValueError(
        f"{ASYM_COLLECTION}/{key}: a mark must be True (8 bits) or int8 7 (7 bits), got {dtype}{list(shape)}"
    )


def _quantize_activations(x2: jax.Array, act_scale: jax.Array | None) -> tuple[jax.Array, jax.Array, None]:
    """int8 rows of ``x2`` (rows, k) and their scales (one per row, or the static scalar): ``x ~ scale * q``."""
    if act_scale is None:
        absmax = jnp.max(jnp.abs(x2), axis=-1, keepdims=True)
        scale = jnp.where(absmax > 0, absmax / _QMAX, 1.0)
    else:
        scale = jnp.asarray(act_scale, jnp.float32)
    xq = jnp.clip(jnp.round(x2 / scale), -_QMAX, _QMAX).astype(jnp.int8)
    return xq, scale, None


def quantized_dot(
    x: jax.Array,
    kernel: QArray,
    *,
    n_contract: int = 1,
    mode: Mode = "auto",
    act_scale: jax.Array | None = None,
    act_symmetric: bool = True,
    act_bits: int = 8,
) -> jax.Array:
    """``x`` contracted over its last ``n_contract`` axes with the first ``n_contract`` axes of ``kernel``.

    ``act_symmetric=False`` quantizes the rows of ``x`` over their ``[min, max]``
    with a zero point in ``"dynamic"`` mode, in 254 (``act_bits=8``) or 127 (``act_bits=7``) steps
    (``act_bits`` 8 or 7; see the module docstring).

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_serve.quant import QuantSpec, quantize_array
        >>> w = jnp.linspace(-1, 1, 32 * 8).reshape(32, 8)
        >>> x = jnp.linspace(-2, 2, 4 * 32).reshape(4, 32)
        >>> q = quantize_array(w, QuantSpec())
        >>> bool(jnp.allclose(quantized_dot(x, q, mode="dynamic"), x @ w, atol=0.05))
        True
        >>> relu = jnp.maximum(jnp.sin(jnp.arange(4 * 32.0)), 0.0).reshape(4, 32)  # a one-signed input
        >>> exact = relu @ q.dequantize()
        >>> err = lambda sym: float(jnp.abs(quantized_dot(relu, q, mode="dynamic", act_symmetric=sym) - exact).mean())
        >>> err(False) < err(True)  # the asymmetric grid is finer
        True
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    in_dims = kernel.shape[:n_contract]
    if tuple(x.shape[x.ndim - n_contract :]) != tuple(in_dims):
        raise ValueError(
            f"input shape {x.shape} does not end with the kernel's input dims {in_dims} (kernel {kernel.shape})"
        )
    cx, cw = tuple(range(x.ndim - n_contract, x.ndim)), tuple(range(n_contract))
    dims = ((cx, cw), ((), ()))
    mode = _resolve(mode, kernel.size)
    if mode == "weight_only" or not _integer_ok(kernel, cw):
        return jax.lax.dot_general(x, kernel.dequantize(x.dtype), dims)
    if mode == "static" and act_scale is None:
        raise ValueError("mode='static' needs activation scales: run quant.calibrate(...) first")
    static = mode == "static"
    wq, sw, zw = kernel.int_values(), kernel.scale, kernel.zero_point
    if kernel.transposed and n_contract == 1:  # (out, in) as stored: XLA:CPU's fast int8 layout
        wq, sw, zw, cw, _ = _stored_transposed(kernel, sw, zw, cw, ())
        dims = ((cx, cw), ((), ()))
    y = _integer_dot(
        x,
        wq,
        sw,
        zw,
        1,
        dims,
        cx,
        (),
        cw,
        (),
        act_scale=act_scale if static else None,
        symmetric=act_symmetric or static,
        act_bits=_check_act_bits(act_bits),
    )
    return y.astype(x.dtype)


def quantized_conv(
    x: jax.Array,
    kernel: QArray,
    *,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    feature_group_count: int = 1,
    dimension_numbers: Any = None,
    mode: Mode = "auto",
    act_scale: jax.Array | None = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` with a quantized kernel (channels-last input, kernel ``(*window, in, out)``)."""
    nd = kernel.ndim - 2
    if dimension_numbers is None:
        spatial = "HWD"[:nd] if nd <= 3 else None
        dimension_numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    conv = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
    )
    if mode == "auto":
        # Measured on the 2-core CI CPU (benchmarks/quant_bench.py): XLA:CPU's int8 convolution is
        # slower than f32 there, and conv kernels are small, so dequantizing them costs little.
        mode = "weight_only"
    if mode == "weight_only" or not _integer_ok(kernel, range(nd + 1), conv=True):
        return conv(x, kernel.dequantize(x.dtype))
    if mode == "static" and act_scale is None:
        raise ValueError("mode='static' needs activation scales: run quant.calibrate(...) first")
    flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
    xq, sx, _ = _quantize_activations(flat, act_scale if mode == "static" else None)
    xq = xq.reshape(x.shape)
    acc = int8_conv(
        xq,
        kernel.int_values(),
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
    )
    sx = jnp.reshape(sx, (-1,) + (1,) * (x.ndim - 1)) if sx.ndim else sx
    return (acc.astype(jnp.float32) * sx * kernel.scale.reshape(-1)).astype(x.dtype)


# ---------------------------------------------------------------------------- execution on the traced program


def layer_key(path: str) -> str:
    """The key of a quantized leaf in ``quant_act`` / ``quant_smooth`` / ``quant_asym``.

    The leaf's path without the ``params/`` collection and a trailing ``/kernel``:
    ``"params/dense_0/kernel"`` -> ``"dense_0"``, ``"params/w1"`` -> ``"w1"``.

    Example:
        >>> layer_key("params/block/attn/query/kernel"), layer_key("params/w1")
        ('block/attn/query', 'w1')
    """
    if path.startswith("params/"):
        path = path[len("params/") :]
    return path[: -len("/kernel")] if path.endswith("/kernel") else path


class _Session:
    """State of one quantized forward pass: mode, per-leaf metadata, and a record of what ran how."""

    def __init__(
        self,
        mode: str,
        act_scales: Mapping[str, Any] | None = None,
        *,
        observe: bool = False,
        smooth: Mapping[str, Any] | None = None,
        asymmetric: Mapping[str, Any] | None = None,
    ) -> None:
        self.mode = mode
        self.act_scales = dict(act_scales or {})
        self.smooth = dict(smooth or {})
        self.asymmetric = {key: _mark_bits(key, mark) for key, mark in (asymmetric or {}).items()}
        self.observe = observe
        self.observed: dict[str, jax.Array] = {}
        self.contracted: dict[str, tuple[int, ...] | None] = {}
        # kernel path -> n when every product contracts exactly its first n axes, as stored (else None);
        # kernels of more than two axes only (serving_layout packs every 2-D one)
        self.leading: dict[str, int | None] = {}
        self.record: dict[str, list[tuple[str, str]]] = {}
        self.forced: str | None = None  # a probe of auto's measurement: every layer in this mode

    def scale_for(self, key: str) -> jax.Array:
        if key not in self.act_scales:
            raise ValueError(f"{key}: mode='static' but no calibrated activation scale for this layer; run calibrate()")
        return jnp.asarray(self.act_scales[key], jnp.float32)

    def note(self, tagged: Tagged, primitive: str, how: str) -> None:
        self.record.setdefault(tagged.path, []).append((primitive, how))

    # -- auto: measured choices ---------------------------------------------------------------------

    def _record_leading(self, t: Tagged, lead: int | None) -> None:
        """Note that this use of ``t``'s kernel contracts its first ``lead`` axes (``None``: some other way)."""
        if t.leaf.ndim > 2:
            self.leading[t.path] = lead if self.leading.get(t.path, lead) == lead else None

    def _mode_for(self, rule: str, eqn: Any, invals: list[Any]) -> str:
        """The mode a quantized dot or convolution runs in: a probe's forced one, float when observing, else auto's."""
        if self.forced is not None:
            return self.forced
        if self.observe:
            return "weight_only"
        return self._auto(rule, eqn, invals)

    def _auto(self, rule: str, eqn: Any, invals: list[Any]) -> str:
        """auto mode: ``rule``, or for a large layer on the native CPU kernels the faster form by measurement.

        ``invals`` are the operation's operands with the quantized one as its ``Tagged`` (the input already
        scaled by the reciprocals of its smoothing factors, if any). The layer is compiled alone in both modes
        on random operands of the same shapes (``quant.measure``); a layer whose int8 form would dequantize
        anyway keeps ``rule``.
        """
        if self.mode != "auto" or not measure.enabled() or jax.default_backend() != "cpu" or not native.available():
            return rule
        wi = next(i for i, v in enumerate(invals) if isinstance(v, Tagged))
        t: Tagged = invals[wi]
        x = invals[1 - wi]
        out_shape = eqn.outvars[0].aval.shape
        if not all(isinstance(d, int) for d in (*x.shape, *out_shape)):
            return rule  # a symbolic size (jax.export): nothing concrete to time
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), _ = eqn.params["dimension_numbers"]
            depth = math.prod(x.shape[a] for a in (lc if wi == 1 else rc))
        else:
            seen = t.aval.shape  # the kernel as the convolution sees it (after the model's reshapes/transposes)
            depth = math.prod(seen) // seen[eqn.params["dimension_numbers"].rhs_spec[0]]
        if math.prod(out_shape) * depth < measure.MIN_MACS:
            return rule
        key = layer_key(t.path)
        smooth = self.smooth.get(key)
        signature = (
            name,
            repr(eqn.params),
            wi,
            tuple(x.shape),
            str(x.dtype),
            str(jax.tree.structure(t.leaf)),
            tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(t.leaf)),
            repr(t.views),
            None if smooth is None else jnp.shape(smooth),
            self.asymmetric.get(key),
            native.kernel_isa(),
            rule,
        )
        if signature in _NO_INT8_FORM:
            return rule
        known = measure.cached(signature)
        if known is not None:
            return known.mode
        example_leaf = jax.tree_util.tree_map_with_path(_example_leaf, t.leaf)
        args = [_example_input(x), example_leaf, None if smooth is None else np.ones(jnp.shape(smooth), np.float32)]
        probes: list[_Session] = []

        def build(mode: str) -> Callable[..., Any]:
            def layer(xe: Any, leaf: Any, factors: Any) -> Any:
                probe = _Session(mode)
                probe.forced = mode
                probe.asymmetric = {key: self.asymmetric[key]} if key in self.asymmetric else {}
                probes.append(probe)
                tagged = Tagged(t.path, leaf, t.views, t.aval)
                operands = [xe, tagged] if wi == 1 else [tagged, xe]
                if name == "dot_general":
                    probe.smooth = {} if factors is None else {key: factors}
                    return probe._dot(eqn, operands, wi)
                return probe._conv(eqn, operands)

            return layer

        # A layer that dequantizes in "dynamic" mode too (per-group scales, ...) has one form: nothing to choose.
        jax.eval_shape(build("dynamic"), *args)
        if probes[-1].record.get(t.path) != [(name, "int8")]:
            _NO_INT8_FORM.add(signature)
            return rule
        return measure.choose(signature, t.path, build, args, prefer=rule).mode

    # -- consumers -----------------------------------------------------------------------------

    def consume(self, eqn: Any, invals: list[Any], bias: BiasAdd | None = None) -> list[Any]:
        """The outputs of ``eqn`` on ``invals``; with ``bias`` (a ``dot_general``'s), of the product plus it."""
        name = eqn.primitive.name
        tagged = [(i, v) for i, v in enumerate(invals) if isinstance(v, Tagged)]
        if name == "dot_general" and len(tagged) == 1:
            return [self._dot(eqn, invals, tagged[0][0], bias)]
        if name == "conv_general_dilated" and [i for i, _ in tagged] == [1]:
            return [self._conv(eqn, invals)]
        if name in ("dot_general", "conv_general_dilated"):  # both operands quantized, or a quantized conv input
            for _, t in tagged:
                self.note(t, name, "dequantized")
            vals = [self._dequantized(v) if isinstance(v, Tagged) else v for v in invals]
            y = eqn.primitive.bind(*vals, **eqn.params)
            return [y if bias is None else bias.add(y)]
        paths = ", ".join(t.path for _, t in tagged)
        raise UnsupportedUse(
            f"{paths}: this quantized leaf is consumed by `{name}`, which quantized execution does not run "
            f"(supported: dot_general / matmul / einsum, conv_general_dilated, through reshapes, transposes and "
            f"dtype converts). Keep it float with a rule `QuantRule({paths.split(', ')[0]!r}, None)`."
        )

    def _dequantized(self, t: Tagged) -> jax.Array:
        return replay(t.views, t.leaf.dequantize(t.leaf.dtype))

    def _dot(self, eqn: Any, invals: list[Any], wi: int, bias: BiasAdd | None = None) -> jax.Array:
        """The quantized product (plus ``bias``: into the native kernel's epilogue where it lines up)."""
        y = self._product(eqn, invals, wi, bias)
        if isinstance(y, _WithBias):
            return y.value
        return y if bias is None else bias.add(y)

    def _product(self, eqn: Any, invals: list[Any], wi: int, bias: BiasAdd | None) -> Any:
        t: Tagged = invals[wi]
        q: QArray = t.leaf
        x = invals[1 - wi]
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        cw, bw = (rc, rb) if wi == 1 else (lc, lb)
        cx, bx = (lc, lb) if wi == 1 else (rc, rb)
        out_dtype = eqn.outvars[0].aval.dtype
        key = layer_key(t.path)
        axes = view_axes(t.views, q.ndim)
        original = None if axes is None else tuple(axes[a] for a in cw)
        self.contracted[key] = original
        only_converts = _only_converts(t)
        self._record_leading(
            t, len(cw) if only_converts and cw and not bw and sorted(cw) == list(range(len(cw))) else None
        )
        unsmoothed, factors = x, None
        if key in self.smooth:  # x * (1 / factors): the native kernel multiplies as it quantizes, others here
            factors = _factors_for(self.smooth[key], original, cx, cw, x.ndim, t.path)
            x = x * native.smooth_multipliers(factors).astype(x.dtype)
        if self.observe:
            self.observed[key] = _canonical_input(x, cx, cw, axes)
        mode = self._mode_for(_resolve(self.mode, q.size), eqn, [x, t] if wi == 1 else [t, x])
        scale = None
        if mode != "weight_only" and q.granularity != "group" and q.bits <= 8:
            scale = view_keepdims(q.scale, q.shape, t.views)
        if scale is None or not keepdims_constant_along(scale, cw):
            self.note(t, "dot_general", "dequantized")
            w = self._dequantized(t)
            operands = (x, w) if wi == 1 else (w, x)
            return eqn.primitive.bind(*operands, **eqn.params)
        zero = None if q.zero_point is None else view_keepdims(q.zero_point, q.shape, t.views)
        self.note(t, "dot_general", "int8")
        dims = eqn.params["dimension_numbers"]
        act_scale = self.scale_for(key) if mode == "static" else None
        symmetric = mode == "static" or key not in self.asymmetric
        act_bits = 8 if symmetric else self.asymmetric[key]
        # The native W8A8 kernel: symmetric int8 weights, one static scale or per-row activation scales.
        use_native = native.available() and zero is None and (act_scale is None or jnp.size(act_scale) == 1)

        def on_native(
            packed: native.Int8Weight, scale: jax.Array, free_dims: tuple[int, ...], x_axes: Sequence[int] = cx
        ) -> Any:
            fused = _epilogue_bias(bias, wi, free_dims, out_dtype)
            y = _native_dot(
                unsmoothed, packed, scale, wi, x_axes, free_dims, act_scale, symmetric, act_bits, factors, fused
            ).astype(out_dtype)
            return y if fused is None else _WithBias(y)

        if use_native and q.packed and only_converts and sorted(cw) == list(range(q.packed)) and not bw:
            # serving_layout packed this kernel (its first q.packed axes as K) for the native kernel: no repacking.
            # The input's contracted axes go in the kernel's axis order (einsum may list them in another).
            return on_native(_packed_weight(q), scale, tuple(q.shape[q.packed :]), [a for _, a in sorted(zip(cw, cx))])
        if q.transposed and only_converts:
            # serving_layout stores 2-D int8 values as (out, in): contract them as stored (XLA:CPU's fast layout)
            wq, scale, zero, cw, bw = _stored_transposed(q, scale, zero, cw, bw)
            dims = ((cx, cw), (bx, bw)) if wi == 1 else ((cw, cx), (bw, bx))
        else:
            wq = replay(t.views, q.int_values(), skip_converts=True)
        if use_native and cw and not bw:
            # Any contraction without batch axes is one (K, N) product: the contracted axes flattened into K,
            # the free ones into N (DenseGeneral's per-head projections included).
            free = [a for a in range(wq.ndim) if a not in cw]
            matrix = jnp.transpose(wq, [*cw, *free]).reshape(math.prod(wq.shape[a] for a in cw), -1)
            packed = native.pack_int8(matrix)  # packed in the traced program, per call
            return on_native(packed, jnp.transpose(scale, [*cw, *free]), tuple(wq.shape[a] for a in free))
        y = _integer_dot(
            x, wq, scale, zero, wi, dims, cx, bx, cw, bw, act_scale=act_scale, symmetric=symmetric, act_bits=act_bits
        )
        return y.astype(out_dtype)

    def _conv(self, eqn: Any, invals: list[Any]) -> jax.Array:
        x, t = invals
        q: QArray = t.leaf
        params = eqn.params
        dn = params["dimension_numbers"]
        key = layer_key(t.path)
        if key in self.smooth:
            raise ValueError(f"{SMOOTH_COLLECTION}/{key}: smoothing factors are for dot products, not convolutions")
        if key in self.asymmetric:
            raise ValueError(f"{ASYM_COLLECTION}/{key}: asymmetric activations are for dot products, not convolutions")
        if self.observe:
            self.observed[key] = x
        # An ungrouped 2-D convolution on a kernel stored (*window, in, out), as Flax's HWIO: the native kernel's
        # matrix is its first three axes by the last, which serving_layout can pack once.
        canonical = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]) == tuple(range(q.ndim))
        only_converts = _only_converts(t)
        lead = q.ndim - 1 if canonical and only_converts and _native_conv_kind(params) else None
        self._record_leading(t, lead)
        mode = self._mode_for(_resolve_conv(self.mode, q.size, params), eqn, [x, t])
        scale = None
        if (
            mode != "weight_only"
            and q.granularity != "group"
            and q.bits <= 8
            and q.zero_point is None
            and params.get("batch_group_count", 1) == 1
        ):
            scale = view_keepdims(q.scale, q.shape, t.views)
        out_feature = dn.rhs_spec[0]
        if scale is None or not keepdims_constant_along(scale, [a for a in range(scale.ndim) if a != out_feature]):
            self.note(t, "conv_general_dilated", "dequantized")
            return eqn.primitive.bind(x, self._dequantized(t), **params)
        self.note(t, "conv_general_dilated", "int8")
        packed = _packed_weight(q) if q.packed and q.packed == lead and native.available() else None  # serving_layout's
        batch_axis = dn.lhs_spec[0]
        if mode == "static":
            sx = self.scale_for(key)
            xq = jnp.clip(jnp.round(x.astype(jnp.float32) / sx), -_QMAX, _QMAX).astype(jnp.int8)
        else:
            reduce = tuple(a for a in range(x.ndim) if a != batch_axis)
            absmax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=reduce, keepdims=True)
            sx = jnp.where(absmax > 0, absmax / _QMAX, 1.0)
            xq = jnp.clip(jnp.round(x.astype(jnp.float32) / sx), -_QMAX, _QMAX).astype(jnp.int8)
        conv_params = {k: v for k, v in params.items() if k not in ("preferred_element_type", "precision")}
        # Both operands in [-127, 127] (symmetric weights never hold -128; the clip keeps that promise for a
        # hand-made array), so the native kernel may take its faster path.
        # The rescale (per-example activation scale, per-channel weight scale) is fused into the native kernel.
        if packed is None:
            rhs = jnp.maximum(replay(t.views, q.int_values(), skip_converts=True), -127)
        else:
            rhs = jax.ShapeDtypeStruct(q.shape, jnp.int8)
        y = int8_conv(
            xq,
            rhs,
            **conv_params,
            bounded=True,
            rescale=(jnp.reshape(sx, -1), jnp.reshape(scale, -1)),
            packed_rhs=packed,
        )
        return y.astype(eqn.outvars[0].aval.dtype)


def _only_converts(t: Tagged) -> bool:
    """Whether ``t`` reaches its product from the stored leaf through dtype converts alone (its layout as stored)."""
    return all(p.name == "convert_element_type" for p, _ in t.views)


def _packed_weight(q: QArray) -> native.Int8Weight:
    """``serving_layout``'s panels of ``q`` as the native kernels' weight: its first ``q.packed`` axes as ``K``."""
    return native.Int8Weight(q.values, *q.packed_matrix, bounded=True)  # packed only when in [-127, 127]


# Layer signatures (auto's measurement) whose int8 form dequantizes anyway: nothing to time.
_NO_INT8_FORM: set[tuple] = set()


def _example_input(x: Any) -> np.ndarray:
    """Random values shaped like ``x`` (a traced operand), for timing."""
    return np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype)


def _example_leaf(path: Any, a: Any) -> np.ndarray:
    """Random values shaped like one array of a quantized leaf: int8 codes in [-127, 127], positive scales."""
    rng = np.random.default_rng(1)
    dtype = np.dtype(a.dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -127), min(info.max, 127) + 1, size=a.shape).astype(dtype)
    if getattr(path[-1], "name", None) == "zero_point":
        return np.zeros(a.shape, dtype)
    return rng.uniform(0.005, 0.02, size=a.shape).astype(dtype)


@dataclasses.dataclass(frozen=True)
class _WithBias:
    """A product that already holds its bias (the native kernel added it)."""

    value: jax.Array


def _epilogue_bias(bias: BiasAdd | None, wi: int, free_dims: Sequence[int], out_dtype: Any) -> jax.Array | None:
    """The bias as the native kernel's epilogue takes it (one per output column), when it lines up with them.

    That is when the weight is the right operand (its free axes last in the output), the bias spans exactly
    those axes and the output is float32 (the kernel's sum is then the program's ``y + bias``, bit for bit).
    """
    if bias is None or wi != 1 or bias.ndim != len(free_dims) or jnp.dtype(out_dtype) != jnp.float32:
        return None
    return bias.value


def _native_dot(
    x: jax.Array,
    packed: native.Int8Weight,
    scale: jax.Array,
    wi: int,
    cx: Sequence[int],
    free_dims: Sequence[int],
    act_scale: Any,
    symmetric: bool,
    act_bits: int = 8,
    factors: jax.Array | None = None,
    bias: jax.Array | None = None,
) -> jax.Array:
    """The W8A8 dot on the native CPU kernel; equals ``_integer_dot``'s result (on ``x * (1 / factors)``).

    ``packed`` is the weight as a ``(K, N)`` matrix: its contracted axes
    (paired in order with ``x``'s axes ``cx``) flattened into ``K``, its free
    axes (``free_dims``) into ``N``; ``wi`` is the weight's operand position and
    ``scale`` its per-output-channel scale (``N`` values, constant along ``K``).
    Activations are quantized per row (symmetric or asymmetric) or by the
    static scalar ``act_scale``; SmoothQuant ``factors`` (laid along ``x``'s
    contracted axes, ``_factors_for``) scale ``x`` by their reciprocals inside the kernel; ``bias`` (``N``
    values, the weight the right operand) is added in its epilogue.
    """
    keep = [a for a in range(x.ndim) if a not in cx]
    rows = jnp.transpose(x, [*keep, *cx]).reshape(*(x.shape[a] for a in keep), packed.in_features)
    smooth = None if factors is None else jnp.transpose(factors, [*keep, *cx]).reshape(-1)
    sw = jnp.broadcast_to(scale, scale.shape[: scale.ndim - len(free_dims)] + tuple(free_dims)).reshape(-1)
    y = native.w8a8_matmul(
        rows,
        packed,
        sw,
        bias,
        act_scale=None if act_scale is None else jnp.reshape(act_scale, ()),
        symmetric=symmetric,
        act_bits=act_bits,
        smooth=smooth,
    )
    y = y.reshape(*y.shape[:-1], *free_dims)
    if wi == 1:
        return y
    n_free = len(free_dims)  # the weight is the left operand: its free axes come first
    return jnp.moveaxis(y, tuple(range(y.ndim - n_free, y.ndim)), tuple(range(n_free)))


def _stored_transposed(q: QArray, scale: Any, zero: Any, cw: Sequence[int], bw: Sequence[int]) -> tuple:
    """A 2-D ``serving_layout`` kernel as stored ``(out, in)``: values, scale, zero point and axes, all swapped."""
    swap = tuple(1 - a for a in cw), tuple(1 - a for a in bw)
    return q.values, jnp.transpose(scale), None if zero is None else jnp.transpose(zero), *swap


def _factors_for(
    s: Any, original: tuple[int, ...] | None, cx: Sequence[int], cw: Sequence[int], x_ndim: int, path: str
) -> jax.Array:
    """SmoothQuant factors (shaped like the kernel's leading input axes) laid along the input's contracted axes."""
    s = jnp.asarray(s, jnp.float32)
    if original is None or sorted(original) != list(range(s.ndim)):
        raise ValueError(
            f"{path}: smoothing factors of shape {tuple(s.shape)} need the kernel's leading axes "
            f"contracted directly; this operation contracts {original}"
        )
    order = sorted(range(len(cx)), key=lambda i: cx[i])  # contracted axes in the input's order
    s = jnp.transpose(s, [original[i] for i in order])
    shape = [1] * x_ndim
    for k, i in enumerate(order):
        shape[cx[i]] = s.shape[k]
    return s.reshape(shape)


def _canonical_input(x: jax.Array, cx: Sequence[int], cw: Sequence[int], axes: list[int] | None) -> jax.Array:
    """The dot's input with its contracted axes last, ordered like the kernel's (original) axes."""
    pairs = list(zip(cx, cw))
    if axes is not None:
        pairs.sort(key=lambda p: axes[p[1]])
    keep = [a for a in range(x.ndim) if a not in cx]
    return jnp.transpose(x, keep + [p[0] for p in pairs])


def _to_out(a: jax.Array, ndim: int, contract: Sequence[int], batch: Sequence[int], is_lhs: bool, n_other_free: int):
    """A keepdims array over one dot operand (size 1 on the contracted axes) in the dot's output layout."""
    a = jnp.broadcast_to(a, a.shape) if a.ndim == ndim else a.reshape((1,) * ndim)
    free = [d for d in range(ndim) if d not in contract and d not in batch]
    a = jnp.transpose(a, list(batch) + free + list(contract))
    a = a.reshape(a.shape[: len(batch) + len(free)])
    nb = len(batch)
    shape = a.shape + (1,) * n_other_free if is_lhs else a.shape[:nb] + (1,) * n_other_free + a.shape[nb:]
    return a.reshape(shape)


def _integer_dot(x, wq, sw, zw, wi, dims, cx, bx, cw, bw, *, act_scale, symmetric, act_bits=8):
    """``int8 x int8 -> int32`` dot_general with per-row activation scales, then the float rescale."""
    x32 = x.astype(jnp.float32)
    n_x_free = x.ndim - len(cx) - len(bx)
    n_w_free = wq.ndim - len(cw) - len(bw)
    x_is_lhs = wi == 1
    zx = None
    if act_scale is not None:
        sx = act_scale
        xq = jnp.clip(jnp.round(x32 / sx), -_QMAX, _QMAX).astype(jnp.int8)
    elif symmetric:
        absmax = jnp.max(jnp.abs(x32), axis=tuple(cx), keepdims=True)
        sx = jnp.where(absmax > 0, absmax / _QMAX, 1.0)
        xq = jnp.clip(jnp.round(x32 / sx), -_QMAX, _QMAX).astype(jnp.int8)
    else:
        lo = jnp.minimum(jnp.min(x32, axis=tuple(cx), keepdims=True), 0.0)
        hi = jnp.maximum(jnp.max(x32, axis=tuple(cx), keepdims=True), 0.0)
        steps, offset = _ASYM_GRIDS[act_bits]
        sx = jnp.where(hi > lo, (hi - lo) / steps, 1.0)
        zero = jnp.round(-lo / sx) - offset
        xq = jnp.clip(jnp.round(x32 / sx) + zero, -offset, steps - offset).astype(jnp.int8)
        zx = zero.astype(jnp.int32)
    # XLA:CPU's int8 matrix-vector product is slow: a single row is padded to two.
    free_x = [d for d in range(x.ndim) if d not in cx and d not in bx]
    pad_axis = free_x[0] if (not bx and free_x and math.prod(x.shape[d] for d in free_x) == 1) else None
    if pad_axis is not None:
        xq = jnp.concatenate([xq, jnp.zeros_like(xq)], axis=pad_axis)
    operands = (xq, wq) if x_is_lhs else (wq, xq)
    acc = int8_dot_general(*operands, dims)
    if pad_axis is not None:
        out_axis = len(bx) + free_x.index(pad_axis) + (0 if x_is_lhs else n_w_free)
        acc = jax.lax.slice_in_dim(acc, 0, 1, axis=out_axis)
        xq = jax.lax.slice_in_dim(xq, 0, 1, axis=pad_axis)
    x_out = functools.partial(_to_out, ndim=x.ndim, contract=cx, batch=bx, is_lhs=x_is_lhs, n_other_free=n_w_free)
    w_out = functools.partial(_to_out, ndim=wq.ndim, contract=cw, batch=bw, is_lhs=not x_is_lhs, n_other_free=n_x_free)
    # sum_k (xq - zx)(wq - zw) = xq.wq - zw sum(xq) - zx sum(wq) + k zx zw
    if zw is not None:
        zw_out = w_out(zw.astype(jnp.int32))
        acc = acc - x_out(jnp.sum(xq.astype(jnp.int32), axis=tuple(cx), keepdims=True)) * zw_out
    if zx is not None:
        acc = acc - x_out(zx) * w_out(jnp.sum(wq.astype(jnp.int32), axis=tuple(cw), keepdims=True))
        if zw is not None:
            acc = acc + math.prod(wq.shape[a] for a in cw) * x_out(zx) * zw_out
    sx_out = x_out(sx) if jnp.ndim(sx) else sx
    return acc.astype(jnp.float32) * sx_out * w_out(sw)


def int8_dot_general(lhs: jax.Array, rhs: jax.Array, dims: Any) -> jax.Array:
    """``int8 x int8 -> int32`` ``lax.dot_general``."""
    return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.int32)


# ---------------------------------------------------------------------------- entry points


def quantized_leaves(variables: Any) -> dict[str, QArray]:
    """``{leaf path: QArray}`` of a variables tree (paths like ``"params/dense_0/kernel"``)."""
    return {
        path_of(p): leaf
        for p, leaf in jax.tree_util.tree_leaves_with_path(variables, is_leaf=is_qarray)
        if is_qarray(leaf)
    }


def _run(model: Model, variables: Variables, inputs: tuple[Any, ...], session: _Session) -> Any:
    """Run ``model`` on ``variables`` with every quantized leaf's consumers rewritten by ``session``."""
    model_vars = {k: v for k, v in variables.items() if k not in COLLECTIONS}
    leaves_p, treedef = jax.tree_util.tree_flatten_with_path(model_vars, is_leaf=is_qarray)
    names = [path_of(p) for p, _ in leaves_p]
    leaves = [leaf for _, leaf in leaves_p]
    if not any(is_qarray(leaf) for leaf in leaves):
        return model(variables, *inputs)
    specs = [jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(leaf.dtype)) if is_qarray(leaf) else leaf for leaf in leaves]

    def float_model(flat: list[Any], *xs: Any) -> Any:
        return model(jax.tree.unflatten(treedef, flat), *xs)

    closed, out_tree = trace(float_model, specs, *inputs)
    args: list[Any] = []
    for name, leaf, var in zip(names, leaves, closed.jaxpr.invars):
        args.append(Tagged(name, leaf, (), var.aval) if is_qarray(leaf) else leaf)
    args.extend(jax.tree.leaves(inputs))
    outs = interpret(closed.jaxpr, closed.consts, args, session.consume, fuse_bias=True)
    for v in outs:
        if isinstance(v, Tagged):
            raise UnsupportedUse(f"{v.path}: the model returns this quantized leaf itself; keep it float")
    unused = sorted(name for name, leaf in zip(names, leaves) if is_qarray(leaf) and name not in session.record)
    if unused:
        raise ValueError(f"quantized leaves {unused} are never used by the model: the paths do not fit it")
    return jax.tree.unflatten(out_tree, outs)


def _session(mode: str, variables: Variables) -> _Session:
    return _Session(
        mode,
        variables.get(ACT_COLLECTION),
        smooth=variables.get(SMOOTH_COLLECTION),
        asymmetric=variables.get(ASYM_COLLECTION),
    )


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def quantized_predict_fn(model: Model | ModelConfig, *, mode: Mode = "auto") -> Callable[..., Any]:
    """``predict(qvariables, *inputs) -> outputs``: ``model`` run on quantized variables.

    Every ``dot_general`` (``@``, ``jnp.dot``, ``jnp.einsum``, any Flax layer) and
    ``conv_general_dilated`` whose weight operand is a quantized leaf (or a
    reshape / transpose / dtype convert of one) runs in ``mode``; everything else
    runs as written. ``qvariables`` is the output of ``quantize(...)``
    (``calibrate``d for ``mode="static"``); leaves that are not ``QArray`` run as
    usual, so a float tree gives the float model. Wrap the result in ``jax.jit``.

    Args:
        model: a ``Model`` (``Model.linen`` / ``Model.nnx`` / ``Model.function``), or a reference ``ModelConfig``.
        mode: ``"weight_only"``, ``"dynamic"``, ``"static"`` or ``"auto"`` (module docstring).

    Raises:
        UnsupportedUse: a quantized leaf reaches an operation other than a dot or a
            convolution (the message names the leaf and the operation).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxopt_serve.model import Model
        >>> from jaxopt_serve.quant import QuantRule, quantize
        >>> f = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
        >>> params = {"w1": jnp.linspace(-1, 1, 64 * 32).reshape(64, 32), "w2": jnp.ones((32, 4)) / 8}
        >>> x = jnp.linspace(-1, 1, 3 * 64).reshape(3, 64)
        >>> model = Model.function(f, params, x)
        >>> q = quantize(model.variables, [QuantRule("params/w.*")]).variables
        >>> out = jax.jit(quantized_predict_fn(model, mode="dynamic"))(q, x)
        >>> ref = f(params, x)
        >>> bool(jnp.abs(out - ref).max() < 0.02 * jnp.abs(ref).max())
        True
    """
    _check_mode(mode)
    handle = model if isinstance(model, Model) else None

    def predict(variables: Variables, *inputs: Any) -> Any:
        m = handle if handle is not None else as_model(model, variables)
        return _run(m, variables, inputs, _session(mode, variables))

    return predict


def quantized_apply(
    config: ModelConfig,
    variables: Variables,
    x: jax.Array,
    *,
    mode: Mode = "auto",
    method: str | None = None,
    **kwargs: Any,
) -> jax.Array:
    """Like ``quantized_predict_fn`` for any method of a reference Linen model, with extra keyword arguments.

    Example: the Transformer's hidden states, quantized:
    ``quantized_apply(cfg, q, tokens, mode="dynamic", method="encode", attention_mask=mask)``.
    """
    _check_mode(mode)
    return _run(_method_model(config, method, kwargs), variables, (x,), _session(mode, variables))


def _method_model(config: ModelConfig, method: str | None, kwargs: Mapping[str, Any]) -> Model:
    """A reference model as a ``Model`` running ``method`` with ``kwargs`` (Linen) or its inference call."""
    if method is None and not kwargs:
        return Model.from_config(config, {"params": {}})
    if config.framework != "linen":
        raise ValueError("method= and keyword arguments are for Linen models")
    module = config.build()

    def apply(variables: Variables, x: Any) -> Any:
        model_vars = {k: v for k, v in variables.items() if k not in COLLECTIONS}
        return module.apply(model_vars, x, method=method, **kwargs)

    return Model(apply, None, {}, (np.zeros((1,), np.float32),), "config", config.name, config)


def execution_report(
    model: Model | ModelConfig, variables: Variables, *inputs: Any, mode: Mode = "auto"
) -> dict[str, list[tuple[str, str]]]:
    """How each quantized leaf was computed: ``{leaf path: [(operation, "int8" | "dequantized"), ...]}``.

    Traced, not run (in ``"auto"`` mode a large layer not measured yet is compiled and timed alone first:
    ``quant.measure``). ``"int8"`` is an integer dot or convolution on the stored
    values; ``"dequantized"`` a float operation on the dequantized weight
    (``weight_only`` mode, per-group scales, or scales inside the contraction).

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_serve.model import Model
        >>> from jaxopt_serve.quant import quantize
        >>> m = Model.function(lambda p, x: x @ p["kernel"], {"kernel": jnp.ones((8, 4))}, jnp.ones((2, 8)))
        >>> execution_report(m, quantize(m.variables).variables, jnp.ones((2, 8)), mode="dynamic")
        {'params/kernel': [('dot_general', 'int8')]}
    """
    _check_mode(mode)
    session = _session(mode, variables)
    handle = model if isinstance(model, Model) else as_model(model, variables)
    jax.eval_shape(lambda v, *xs: _run(handle, v, xs, session), variables, *inputs)
    return session.record


def inference_fn(model: Model | ModelConfig, variables: Any, *, mode: Mode = "auto") -> Callable[..., Any]:
    """The inference function for ``variables``: quantized (``mode``) when they hold ``QArray`` leaves, else float."""
    if has_qarrays(variables):
        return quantized_predict_fn(model, mode=mode)
    if isinstance(model, Model):
        return model.apply_fn
    return predict_fn(model)


def observe_inputs(
    model: Model | ModelConfig, variables: Variables, *inputs: Any, method: str | None = None, **kwargs: Any
) -> dict[str, jax.Array]:
    """The input of every quantized dot or convolution for a batch (weight-only compute), keyed by ``layer_key``.

    Dot inputs come with their contracted axes last, ordered like the kernel's
    axes; a smoothed layer's (``"quant_smooth"``) is taken after the scaling by
    its factors' reciprocals, as its integer dot quantizes it.
    """
    session = _Session("weight_only", None, observe=True, smooth=variables.get(SMOOTH_COLLECTION))
    handle = model if isinstance(model, Model) else _method_model(model, method, kwargs)
    if isinstance(model, Model) and (method is not None or kwargs):
        raise ValueError("method= and keyword arguments are for reference configs; build the Model with them instead")
    _run(handle, variables, inputs, session)
    return session.observed


def leading_contractions(model: Model | ModelConfig, variables: Variables, *inputs: Any) -> dict[str, int]:
    """``{kernel path: n}`` for the quantized kernels of more than two axes that every product with an activation
    contracts over exactly their first ``n`` axes (in any order), as stored: what ``serving_layout`` needs to pack
    them (``DenseGeneral``'s per-head projections: ``(in, heads, head_dim)`` has ``n = 1``, ``(heads, head_dim,
    out)`` has ``n = 2``), and the kernels of ungrouped 2-D convolutions stored ``(kh, kw, in, out)`` (Flax's HWIO,
    ``n = 3``).

    Traced, not run. A kernel also contracted another way (through a transpose, or on other axes) is left out.
    Products of two quantized leaves are not counted: they read the kernel unpacked (``QArray.int_values``),
    which stays correct, only not faster.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxopt_serve.model import Model
        >>> from jaxopt_serve.quant import quantize
        >>> params = {"qkv": {"kernel": jnp.ones((8, 2, 4))}, "out": {"kernel": jnp.ones((2, 4, 8))}}
        >>> def attend(p, x):  # as flax.linen.DenseGeneral contracts them
        ...     h = jax.lax.dot_general(x, p["qkv"]["kernel"], (((1,), (0,)), ((), ())))
        ...     return jax.lax.dot_general(h, p["out"]["kernel"], (((1, 2), (0, 1)), ((), ())))
        >>> m = Model.function(attend, params, jnp.ones((2, 8)))
        >>> leading_contractions(m, quantize(m.variables).variables, jnp.ones((2, 8)))
        {'params/out/kernel': 2, 'params/qkv/kernel': 1}
    """
    session = _session("weight_only", variables)
    handle = model if isinstance(model, Model) else as_model(model, variables)
    jax.eval_shape(lambda v, *xs: _run(handle, v, xs, session), variables, *inputs)
    return {path: n for path, n in sorted(session.leading.items()) if n is not None}


def serving_layout(variables: Any, contractions: Mapping[str, int] | None = None) -> Any:
    """Lay int8 kernels out for the fastest integer product here (2-D ones, and those listed in
    ``contractions``); numerically identical.

    With the native CPU kernels (``jaxopt_serve.native``) a symmetric int8
    kernel is packed once into their panels, so no call repacks it; so is a
    kernel of more than two axes listed in ``contractions`` (``{kernel path:
    n}``, from ``leading_contractions``) as the matrix of its first ``n`` axes
    by the rest, where its scales are constant along those axes (otherwise
    such kernels are packed inside every call). Otherwise
    it is stored as ``(out, in)``: XLA:CPU's ``int8 x int8 -> int32`` dot is
    markedly faster when both operands contract their last axis (measured:
    4096x4096 at batch 2, 0.96 ms against 2.04 ms for ``(in, out)``). Apply
    once after loading, before serving (``InferenceEngine`` does it on CPU);
    ``quantize`` and artifacts keep the original layout (``QArray.canonical``).

    Example:
        >>> import numpy as np
        >>> from jaxopt_serve.quant import quantize
        >>> q = quantize({"params": {"d": {"kernel": np.ones((4, 3), np.float32)}}}).variables
        >>> laid = serving_layout(q)["params"]["d"]["kernel"]
        >>> bool(laid.packed or laid.transposed), bool((laid.int_values() == q["params"]["d"]["kernel"].values).all())
        (True, True)
    """

    pack = native.available()
    contractions = dict(contractions or {})

    def leading(path: str, leaf: QArray) -> int | None:
        """The axes to pack as K: 1 for a 2-D kernel; a listed kernel's n where its scale is constant along them."""
        if leaf.ndim == 2:
            return 1
        n = contractions.get(path)
        if not n or not 0 < n < leaf.ndim or leaf.granularity == "group":
            return None
        return n if all(s == 1 for s in np.shape(leaf.scale)[:n]) else None

    def convert(key_path: Any, leaf: Any) -> Any:
        if not is_qarray(leaf) or leaf.transposed or leaf.packed:
            return leaf
        n = leading(path_of(key_path), leaf)
        if pack and leaf.bits == 8 and n and leaf.zero_point is None:
            k = math.prod(leaf.shape[:n])
            packed = native.pack_int8(jnp.asarray(leaf.values).reshape(k, -1))
            if packed.bounded:  # symmetric quantization never makes -128; a hand-made array might
                return dataclasses.replace(leaf, values=packed.panels, packed=n)
        if leaf.bits == 8 and leaf.ndim == 2:
            return QArray(
                jnp.asarray(leaf.values).T.copy(),
                leaf.scale,
                leaf.zero_point,
                leaf.qtype,
                leaf.shape,
                leaf.dtype,
                leaf.granularity,
                leaf.axis,
                leaf.group_size,
                transposed=True,
            )
        return leaf

    return jax.tree_util.tree_map_with_path(convert, variables, is_leaf=is_qarray)


def mark_asymmetric(variables: Variables, pattern: str, *, bits: int = 8) -> Variables:
    """``variables`` with the quantized Dense layers whose path matches ``pattern`` set to asymmetric activations.

    ``pattern`` is a regular expression matched in full against layer paths
    (``"layer_0/output"``, the kernel's path without ``params/`` and ``/kernel``).
    ``bits``: 8 (254 steps over the row's range) or 7 (127 steps, codes in
    ``[0, 127]``: the faster native AVX2 path; see the module docstring). The
    marks live under ``variables["quant_asym"]`` and travel with artifacts.

    Raises:
        ValueError: the pattern is not a valid regular expression or matches no quantized kernel, or bits not 8 or 7.

    Example:
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> from jaxopt_serve.quant import quantize
        >>> q = quantize(init_variables(MLPConfig(features=(64,)), 0)).variables
        >>> sorted(mark_asymmetric(q, "classifier")["quant_asym"])
        ['classifier']
        >>> sorted(int(v) for v in mark_asymmetric(q, ".*", bits=7)["quant_asym"].values())
        [7, 7]
    """
    _check_act_bits(bits)
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"pattern {pattern!r} is not a regular expression: {err}") from None
    layers = sorted(name for name in _layer_keys(variables) if compiled.fullmatch(name))
    if not layers:
        known = sorted(_layer_keys(variables))
        raise ValueError(f"pattern {pattern!r} matches no quantized kernel's layer; quantized layers: {known}")
    marks = {**variables.get(ASYM_COLLECTION, {}), **{name: _asym_mark(bits) for name in layers}}
    return {**variables, ASYM_COLLECTION: marks}


def _layer_keys(variables: Variables) -> list[str]:
    weights = {k: v for k, v in variables.items() if k not in COLLECTIONS}
    return sorted({layer_key(path) for path in quantized_leaves(weights)})
