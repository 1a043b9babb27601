"""The quantized array: integer values, a scale, an optional zero point, and static metadata.

This module is pure array math with no notion of a model: quantize one array
under a ``QuantSpec``, dequantize it, pack sub-byte values, fake-quantize for
training. ``quantize`` (in ``rules.py``) applies it to a whole variable tree.

Scales keep the array's rank (``keepdims``), so dequantization is a broadcast:

* ``"tensor"``: one scale, shape ``(1, ..., 1)``;
* ``"channel"``: one scale per index of ``axis`` (default: the last axis, the
  output features of Dense, Conv and projection kernels);
* ``"group"``: the array is viewed with ``axis`` split into ``(n // group_size,
  group_size)`` and one scale is kept per group and per index of every other
  axis (the usual "per-channel, sub-channel on the contraction axis" layout).

Storage: int8 values as ``int8``; int4, ternary (2 bits) and binary (1 bit)
values packed into ``uint8``, so their bytes really are 2x, 4x and 8x fewer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

QType = Literal["int8", "int4", "ternary", "binary"]
BITS: dict[str, int] = {"int8": 8, "int4": 4, "ternary": 2, "binary": 1}
Granularity = Literal["tensor", "channel", "group"]
Calibration = Literal["absmax", "percentile", "mse"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize one array.

    Attributes:
        qtype: ``"int8"``, ``"int4"``, ``"ternary"`` ({-1, 0, 1} x scale) or ``"binary"`` ({-1, 1} x scale).
        granularity: ``"tensor"``, ``"channel"`` or ``"group"``.
        axis: the kept channel axis (``"channel"``) or the grouped axis (``"group"``).
            Default: the last axis for channels; for groups the largest axis
            other than the last (the contraction axis of a Dense or Conv kernel).
        group_size: elements per group along ``axis`` (``"group"`` only); must divide that axis.
        symmetric: symmetric around zero (no zero point) or asymmetric (int8/int4 only).
        calibration: how the clipping range is chosen: the absolute maximum, a
            percentile of the magnitudes, or the clip that minimizes the mean squared
            quantization error.
        percentile: the percentile used by ``calibration="percentile"``.

    Example:
        >>> QuantSpec(qtype="int4", granularity="group", group_size=32).bits
        4
    """

    qtype: QType = "int8"
    granularity: Granularity = "channel"
    axis: int | None = None
    group_size: int | None = None
    symmetric: bool = True
    calibration: Calibration = "absmax"
    percentile: float = 99.9

    def __post_init__(self) -> None:
        if self.qtype not in BITS:
            raise ValueError(f"unsupported qtype {self.qtype!r}; expected one of {sorted(BITS)}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity must be 'tensor', 'channel' or 'group', got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ValueError(f"granularity='group' needs a positive int group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only used with granularity='group', got granularity={self.granularity!r}")
        if self.calibration not in ("absmax", "percentile", "mse"):
            raise ValueError(f"calibration must be 'absmax', 'percentile' or 'mse', got {self.calibration!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if not self.symmetric and self.qtype in ("ternary", "binary"):
            raise ValueError(f"{self.qtype} quantization is symmetric only; set symmetric=True")

    @property
    def bits(self) -> int:
        return BITS[self.qtype]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized array (a pytree: ``values``, ``scale`` and ``zero_point`` are its leaves).

    Attributes:
        values: int8 values (same shape as the original) for int8, or packed
            ``uint8`` bytes (flat) for int4 / ternary / binary.
        scale: float32 scale, broadcastable as described in the module docstring.
        zero_point: int8 zero point shaped like ``scale``, or ``None`` when symmetric.
        qtype, shape, dtype, granularity, axis, group_size: static metadata.
        transposed: int8 2-D values stored as ``(out, in)`` (see ``runtime.serving_layout``),
            which XLA:CPU's integer dot reads faster; ``int_values`` and
            ``dequantize`` undo it, artifacts store the original layout.
        packed: 0, or int8 values stored as the native CPU kernels' panels
            ``(P, Kp / 4 + 1, 16, 4)`` of the ``(K, N)`` matrix whose ``K`` is the
            first ``packed`` axes flattened and ``N`` the rest (1 for a 2-D
            kernel; 2 for an attention output projection ``(heads, head_dim,
            out)``; see ``jaxopt_serve.native.pack_int8`` and
            ``runtime.serving_layout``); undone the same way.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.linspace(-1.0, 1.0, 64).reshape(16, 4)
        >>> q = quantize_array(w, QuantSpec(qtype="int4", granularity="channel"))
        >>> q.values.dtype, q.values.shape, q.nbytes
        (dtype('uint8'), (32,), 48)
        >>> float(jnp.abs(q.dequantize() - w).max()) <= float(q.scale.max()) / 2 + 1e-6
        True
    """

    values: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    qtype: str = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    granularity: str = dataclasses.field(metadata=dict(static=True))
    axis: int | None = dataclasses.field(metadata=dict(static=True))
    group_size: int | None = dataclasses.field(metadata=dict(static=True))
    transposed: bool = dataclasses.field(default=False, metadata=dict(static=True))
    packed: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def bits(self) -> int:
        return BITS[self.qtype]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of values, scales and zero points together."""
        total = _nbytes(self.values) + _nbytes(self.scale)
        return total + (_nbytes(self.zero_point) if self.zero_point is not None else 0)

    def int_values(self) -> jax.Array:
        """The integer values as int8, in the original shape (unpacked if needed)."""
        if self.transposed:
            return self.values.T
        if self.packed:
            from jaxopt_serve import native  # the packed layout is the native kernels'

            return native.unpack_int8(self.values, *self.packed_matrix).reshape(self.shape)
        if self.bits == 8:
            return self.values
        return unpack(self.values, self.qtype, self.size).reshape(self.shape)

    @property
    def packed_matrix(self) -> tuple[int, int]:
        """``(K, N)`` of the matrix ``packed`` values hold: the first ``packed`` axes flattened, then the rest."""
        k = math.prod(self.shape[: self.packed])
        return k, self.size // k

    def canonical(self) -> QArray:
        """The same array with values in the original layout (undoes ``serving_layout``)."""
        if self.packed:
            return dataclasses.replace(self, values=self.int_values(), packed=0)
        if not self.transposed:
            return self
        return dataclasses.replace(self, values=self.values.T, transposed=False)

    def dequantize(self, dtype: jnp.dtype | str | None = None) -> jax.Array:
        """The float array these values stand for: ``(values - zero_point) * scale``."""
        q = self.int_values().astype(jnp.float32)
        if self.granularity == "group":
            q = q.reshape(_grouped_shape(self.shape, self.axis, self.group_size))
        if self.zero_point is not None:
            q = q - self.zero_point.astype(jnp.float32)
        out = (q * self.scale).reshape(self.shape)
        return out.astype(dtype or self.dtype)

    def __repr__(self) -> str:
        extra = f", axis={self.axis}" if self.axis is not None else ""
        extra += f", group_size={self.group_size}" if self.group_size else ""
        zp = ", asymmetric" if self.zero_point is not None else ""
        return f"QArray({self.qtype}, shape={self.shape}, {self.granularity}{extra}{zp}, {self.nbytes} bytes)"


def is_qarray(x: object) -> bool:
    """``True`` for a ``QArray``: the ``is_leaf`` predicate for tree maps that treat quantized arrays as leaves."""
    return isinstance(x, QArray)


def has_qarrays(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a ``QArray`` (a quantized variables tree)."""
    return any(is_qarray(x) for x in jax.tree.leaves(tree, is_leaf=is_qarray))


def _nbytes(x: jax.Array) -> int:
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def _grouped_shape(shape: tuple[int, ...], axis: int, group_size: int) -> tuple[int, ...]:
    return (*shape[:axis], shape[axis] // group_size, group_size, *shape[axis + 1 :])


def resolve_axis(shape: tuple[int, ...], spec: QuantSpec, *, name: str = "array") -> int | None:
    """The concrete (non-negative) axis ``spec`` uses for an array of ``shape``; checks it fits."""
    ndim = len(shape)
    if spec.granularity == "tensor":
        return None
    if ndim == 0:
        raise ValueError(f"{name}: a scalar cannot be quantized per {spec.granularity}; use granularity='tensor'")
    if spec.axis is not None:
        if not -ndim <= spec.axis < ndim:
            raise ValueError(f"{name}: axis {spec.axis} is out of range for shape {shape}")
        axis = spec.axis % ndim
    elif spec.granularity == "channel" or ndim == 1:
        axis = ndim - 1
    else:
        axis = int(np.argmax(shape[:-1]))
    if spec.granularity == "group" and shape[axis] % spec.group_size:
        raise ValueError(
            f"{name}: group_size {spec.group_size} does not divide axis {axis} of shape {shape} "
            f"(size {shape[axis]}); choose a divisor of {shape[axis]} or another axis"
        )
    return axis


def quantize_array(x: jax.Array, spec: QuantSpec, *, name: str = "array") -> QArray:
    """Quantize one float array under ``spec``.

    Raises:
        ValueError: ``x`` is not a float array, holds NaN or inf, or does not fit
            ``spec`` (the message starts with ``name``, e.g. the parameter path).
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}: only float arrays can be quantized, got dtype {x.dtype}")
    axis = resolve_axis(tuple(x.shape), spec, name=name)
    values, scale, zero_point, finite = _quantize_packed(x, spec, axis)
    if not isinstance(finite, jax.core.Tracer) and not bool(finite):
        raise ValueError(f"{name}: cannot quantize an array holding NaN or inf (shape {tuple(x.shape)})")
    return QArray(
        values=values,
        scale=scale,
        zero_point=zero_point,
        qtype=spec.qtype,
        shape=tuple(x.shape),
        dtype=str(x.dtype),
        granularity=spec.granularity,
        axis=axis,
        group_size=spec.group_size,
    )


@functools.partial(jax.jit, static_argnames=("spec", "axis"))
def _quantize_packed(x: jax.Array, spec: QuantSpec, axis: int | None):
    """Quantize, pack and check finiteness as one compiled program (eagerly, each small op would compile on its own)."""
    q, scale, zero_point = _quantize(x.astype(jnp.float32), spec, axis)
    values = q if spec.bits == 8 else pack(q.reshape(-1), spec.qtype)
    return values, scale, zero_point, jnp.isfinite(x).all()


def fake_quantize(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """Quantize and dequantize in the forward pass; identity gradient (straight-through estimator).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> spec = QuantSpec(qtype="ternary")
        >>> w = jnp.array([[0.9, -0.05], [-1.1, 0.4]])
        >>> fake_quantize(w, spec).shape, jax.grad(lambda w: fake_quantize(w, spec).sum())(w).tolist()
        ((2, 2), [[1.0, 1.0], [1.0, 1.0]])
    """
    axis = resolve_axis(tuple(x.shape), spec)
    q, scale, zero_point = _quantize(x.astype(jnp.float32), spec, axis)
    qa = QArray(q, scale, zero_point, spec.qtype, tuple(x.shape), str(x.dtype), spec.granularity, axis, spec.group_size)
    # int_values() would unpack; q is already unpacked, so dequantize through an int8 view.
    deq = dataclasses.replace(qa, qtype="int8").dequantize(jnp.float32)
    return x + jax.lax.stop_gradient(deq.astype(x.dtype) - x)


def _reduce_axes(ndim: int, spec: QuantSpec, axis: int | None) -> tuple[int, ...]:
    if spec.granularity == "tensor":
        return tuple(range(ndim))
    if spec.granularity == "channel":
        return tuple(a for a in range(ndim) if a != axis)
    return (axis + 1,)  # the in-group axis of the grouped view


def _quantize(x: jax.Array, spec: QuantSpec, axis: int | None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Returns (int8 values in the original shape, scale, zero point or None)."""
    shape = x.shape
    if spec.granularity == "group":
        x = x.reshape(_grouped_shape(shape, axis, spec.group_size))
    reduce = _reduce_axes(x.ndim, spec, axis)
    if spec.qtype == "binary":
        q, scale, zp = _binary(x, reduce)
    elif spec.qtype == "ternary":
        q, scale, zp = _ternary(x, reduce, spec)
    else:
        q, scale, zp = _integer(x, reduce, spec)
    return q.reshape(shape), scale, zp


def _integer(x: jax.Array, reduce: tuple[int, ...], spec: QuantSpec):
    qmax = 2 ** (spec.bits - 1) - 1
    qmin = -qmax - 1

    def quant_sym(clip):
        scale = jnp.where(clip > 0, clip / qmax, 1.0)
        return jnp.clip(jnp.round(x / scale), -qmax, qmax), scale

    def quant_asym(lo, hi):
        lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
        scale = jnp.where(hi > lo, (hi - lo) / (qmax - qmin), 1.0)
        zp = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
        return jnp.clip(jnp.round(x / scale) + zp, qmin, qmax), scale, zp

    if spec.symmetric:
        absmax = jnp.max(jnp.abs(x), axis=reduce, keepdims=True)
        if spec.calibration == "percentile":
            clip = _percentile(jnp.abs(x), spec.percentile, reduce)
        elif spec.calibration == "mse":
            clip = _best_clip(absmax, lambda c: quant_sym(c)[0] * quant_sym(c)[1] - x, reduce)
        else:
            clip = absmax
        q, scale = quant_sym(clip)
        return q.astype(jnp.int8), scale.astype(jnp.float32), None
    lo = jnp.min(x, axis=reduce, keepdims=True)
    hi = jnp.max(x, axis=reduce, keepdims=True)
    if spec.calibration == "percentile":
        lo, hi = _percentile(x, 100.0 - spec.percentile, reduce), _percentile(x, spec.percentile, reduce)
    elif spec.calibration == "mse":

        def error(ratio):
            q, s, z = quant_asym(lo * ratio, hi * ratio)
            return (q - z) * s - x

        ratio = _best_clip(jnp.ones_like(lo), error, reduce)
        lo, hi = lo * ratio, hi * ratio
    q, scale, zp = quant_asym(lo, hi)
    return q.astype(jnp.int8), scale.astype(jnp.float32), zp.astype(jnp.int8)


def _ternary(x: jax.Array, reduce: tuple[int, ...], spec: QuantSpec):
    mean_abs = jnp.mean(jnp.abs(x), axis=reduce, keepdims=True)

    def quant(threshold):
        q = jnp.where(jnp.abs(x) > threshold, jnp.sign(x), 0.0)
        hits = jnp.sum(jnp.abs(q), axis=reduce, keepdims=True)
        scale = jnp.sum(jnp.abs(x) * jnp.abs(q), axis=reduce, keepdims=True) / jnp.maximum(hits, 1.0)
        return q, jnp.where(hits > 0, scale, 1.0)

    if spec.calibration == "mse":
        threshold = _best_clip(
            mean_abs, lambda t: quant(t)[0] * quant(t)[1] - x, reduce, ratios=np.linspace(0.1, 1.5, 29)
        )
    else:
        threshold = 0.7 * mean_abs  # Ternary Weight Networks' rule (Li et al., 2016)
    q, scale = quant(threshold)
    return q.astype(jnp.int8), scale.astype(jnp.float32), None


def _binary(x: jax.Array, reduce: tuple[int, ...]):
    q = jnp.where(x >= 0, 1, -1).astype(jnp.int8)
    scale = jnp.mean(jnp.abs(x), axis=reduce, keepdims=True)  # the L2-optimal scale for sign(x); 0 for a zero group
    return q, scale.astype(jnp.float32), None


def _percentile(x: jax.Array, p: float, reduce: tuple[int, ...]) -> jax.Array:
    if p >= 100.0:  # exact: interpolation in float32 can land just below the maximum
        return jnp.max(x, axis=reduce, keepdims=True)
    if p <= 0.0:
        return jnp.min(x, axis=reduce, keepdims=True)
    return jnp.percentile(x, p, axis=reduce, keepdims=True)


_CLIP_RATIOS = np.linspace(0.3, 1.0, 36)  # _best_clip's default search grid


def _best_clip(base, error_fn, reduce, ratios=_CLIP_RATIOS):
    """Per group, the ``base * ratio`` with the smallest squared error ``error_fn(base * ratio)``."""
    best_value, best_err = base, jnp.sum(error_fn(base) ** 2, axis=reduce, keepdims=True)
    for ratio in ratios[:-1] if ratios[-1] == 1.0 else ratios:
        candidate = base * float(ratio)
        err = jnp.sum(error_fn(candidate) ** 2, axis=reduce, keepdims=True)
        better = err < best_err
        best_value, best_err = jnp.where(better, candidate, best_value), jnp.where(better, err, best_err)
    return best_value


def _offset(qtype: str) -> int:
    return {"int4": 8, "ternary": 1, "binary": 0}[qtype]


def pack(q: jax.Array, qtype: str) -> jax.Array:
    """Pack flat int8 values of a sub-byte ``qtype`` into ``uint8``, lowest bits first.

    Example:
        >>> import jax.numpy as jnp
        >>> packed = pack(jnp.array([-8, 7, 0, 3, -1], jnp.int8), "int4")
        >>> packed.shape, unpack(packed, "int4", 5).tolist()
        ((3,), [-8, 7, 0, 3, -1])
    """
    bits = BITS[qtype]
    per_byte = 8 // bits
    u = q.astype(jnp.int32)
    u = (u + 1) // 2 if qtype == "binary" else u + _offset(qtype)
    pad = (-u.shape[0]) % per_byte
    u = jnp.pad(u, (0, pad)).reshape(-1, per_byte)
    shifts = jnp.arange(per_byte, dtype=jnp.int32) * bits
    return jnp.sum(u << shifts, axis=1).astype(jnp.uint8)


def unpack(packed: jax.Array, qtype: str, size: int) -> jax.Array:
    """Inverse of ``pack``: the first ``size`` int8 values."""
    bits = BITS[qtype]
    per_byte = 8 // bits
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
    u = ((packed[:, None] >> shifts) & jnp.uint8(2**bits - 1)).reshape(-1)[:size].astype(jnp.int8)
    return u * 2 - 1 if qtype == "binary" else u - _offset(qtype)
