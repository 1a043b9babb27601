"""Native int8 and int4 matrix products for XLA:CPU, called from jit-compiled code through ``jax.ffi``.

XLA:CPU's own ``int8 x int8 -> int32`` dot is about as fast as its f32 dot on
CPUs without AMX. These kernels (``qgemm.cc``, built when the package is
installed) keep the weight packed once as rows of output features, quantize
the activations per row inside the call, sum in int32 and rescale to float in
the same pass, on a persistent thread pool. The integer sums equal
``lax.dot_general(int8, int8, preferred_element_type=int32)`` bit for bit.

``attention`` is a fused multi-head attention for CPU inference in the same
library (scores, softmax and the weighted sum of values per (batch, head),
in cache, on the ``(batch, length, heads, dim)`` layout projections make);
the reference Transformer encoder (and so MiniLM) runs on it.

Which path runs is picked per CPU, fastest first: ``"avx512vnni"``
(AVX-512 with VNNI, ``vpdpbusd`` on 64 int8 products per instruction),
``"avx2"`` (AVX2 + FMA, ``vpmaddubsw``/``vpmaddwd``) or ``"portable"`` (plain
C++, any CPU). ``JAXOPT_SERVE_KERNEL`` (``auto``, ``avx512vnni``, ``avx2``,
``portable`` or ``xla``) or ``use_kernel(...)`` forces one; ``xla``
turns the kernels off, and so does a package built without a compiler (the
quantized runtime then uses XLA's integer dot). Non-CPU backends never use them.

Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> from jaxopt_serve import native
    >>> wq = np.arange(-6, 6, dtype=np.int8).reshape(4, 3)
    >>> xq = np.ones((2, 4), np.int8)
    >>> got = native.int8_matmul(xq, native.pack_int8(wq)) if native.available() else xq.astype(np.int32) @ wq
    >>> np.asarray(got).tolist()
    [[-6, -2, 2], [-6, -2, 2]]
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.machinery
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Int4Weight",
    "Int8Weight",
    "attention",
    "attention_reference",
    "available",
    "int4_matmul",
    "int8_conv2d",
    "int8_matmul",
    "kernel_isa",
    "load_error",
    "pack_int4",
    "pack_int8",
    "supported_kernels",
    "use_kernel",
    "smooth_multipliers",
    "w8a8_matmul",
]

ISA_CODES = {"portable": 0, "avx2": 1, "avx512vnni": 2}
KERNEL_ENV = "JAXOPT_SERVE_KERNEL"
K_ALIGN = 32  # int8 weights: the input axis is padded to a multiple of this
_TARGETS = {
    "jxs_int8_matmul": "JxsInt8Matmul",
    "jxs_int8_conv2d": "JxsInt8Conv2d",
    "jxs_w8a8_conv2d": "JxsW8A8Conv2d",
    "jxs_w8a8_matmul": "JxsW8A8Matmul",
    "jxs_int4_matmul": "JxsInt4Matmul",
    "jxs_attention": "JxsAttention",
}
_forced = threading.local()


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """``(library, None)``, or ``(None, why it is not there)``; registers the FFI targets once."""
    here = Path(__file__).parent
    found = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in here.glob(f"_qgemm{suffix}")]
    if not found:
        return None, (
            "the native kernels were not built (no C++ compiler when the package was installed?); "
            "reinstall with g++ or clang++ on PATH: pip install --force-reinstall --no-deps ."
        )
    try:
        lib = ctypes.CDLL(str(found[0]))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, AttributeError) as err:
        return None, f"the native kernels in {found[0].name} could not be loaded: {err}"
    lib.jxs_supported_isas.restype = ctypes.c_int
    return lib, None


def load_error() -> str | None:
    """Why the native library is unavailable, or ``None`` when it loaded."""
    return _library()[1]


def supported_kernels() -> list[str]:
    """The kernel paths this CPU and build can run, fastest first (empty when the library is missing)."""
    lib, _ = _library()
    if lib is None:
        return []
    bits = lib.jxs_supported_isas()
    return [name for name, code in sorted(ISA_CODES.items(), key=lambda kv: -kv[1]) if bits & (1 << code)]


@contextlib.contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Force a kernel path (``"avx512vnni"``, ``"avx2"``, ``"portable"``, ``"xla"``, ``"auto"``) for code traced here.

    Raises:
        ValueError: an unknown name, or a path this CPU cannot run.
    """
    _check_kernel_name(name, "use_kernel")
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def _check_kernel_name(name: str, where: str) -> None:
    if name not in ("auto", "xla", *ISA_CODES):
        raise ValueError(f"{where}: unknown kernel {name!r}; use 'auto', 'xla' or one of {sorted(ISA_CODES)}")
    if name in ISA_CODES and name not in supported_kernels():
        raise ValueError(
            f"{where}: kernel {name!r} cannot run here; supported: {supported_kernels() or 'none'}"
            + (f" ({load_error()})" if load_error() else "")
        )


def kernel_isa() -> str | None:
    """The kernel path code traced now would use, or ``None`` (XLA's own ops)."""
    name = getattr(_forced, "name", None) or os.environ.get(KERNEL_ENV, "auto") or "auto"
    _check_kernel_name(name, KERNEL_ENV)
    if name == "xla" or jax.default_backend() != "cpu":
        return None
    if name == "auto":
        kernels = supported_kernels()
        return kernels[0] if kernels else None
    return name


def available() -> bool:
    """Whether quantized products traced now run on the native kernels."""
    return kernel_isa() is not None


# --------------------------------------------------------------------------------------------- weights


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """An int8 ``(K, N)`` weight packed as ``(P, Kp / 4 + 1, 16, 4)``: panels of 16 output features, quads of inputs.

    ``Kp`` is ``K`` rounded up to 32 and ``P`` is ``N / 16`` rounded up; the
    padding is zeros. The last quad of each panel holds its 16 column sums as
    little-endian int32 (the kernels' correction for activation zero points).
    ``bounded``: every value is in ``[-127, 127]`` (no
    ``-128``, as symmetric quantization makes them), which lets products with
    activations in that range take the faster AVX2 path.
    """

    panels: jax.Array
    in_features: int = dataclasses.field(metadata=dict(static=True))
    out_features: int = dataclasses.field(metadata=dict(static=True))
    bounded: bool = dataclasses.field(default=False, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weight:
    """A 4-bit ``(K, N)`` weight in panels of 8 output features.

    ``codes`` ``(P, Kp / 2, 8)`` uint8: byte ``(p, i, c)`` holds the codes of
    inputs ``2 i`` (low nibble) and ``2 i + 1`` (high nibble) of output
    ``8 p + c``. ``scale`` and ``zero`` ``(P, Kp / group, 8)``. Entry ``(k, n)``
    stands for ``(code - zero) * scale`` of its group. ``Kp`` is ``K`` rounded
    up to ``group``, ``P`` is ``N / 8`` rounded up; the padding is zeros.
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array
    in_features: int = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))
    out_features: int = dataclasses.field(metadata=dict(static=True))


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_int8(wq: Any, bounded: bool | None = None) -> Int8Weight:
    """Pack an int8 ``(K, N)`` weight (input features first, as Flax stores kernels) for the kernels.

    ``bounded``: whether every value is in ``[-127, 127]``; ``None`` checks a
    concrete array (inside a traced program it is taken as ``False``).

    Raises:
        ValueError: ``wq`` is not a 2-D int8 array, or ``bounded=True`` for a concrete array holding -128.
    """
    if jnp.ndim(wq) != 2 or jnp.result_type(wq) != jnp.int8:
        raise ValueError(
            f"pack_int8: expected a 2-D int8 (in, out) weight, got {jnp.result_type(wq)} {tuple(jnp.shape(wq))}"
        )
    if bounded is None or bounded:
        try:
            fits = bool(np.asarray(wq).min(initial=0) > -128)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            fits = bool(bounded)
        if bounded and not fits:
            raise ValueError("pack_int8: bounded=True, but the weight holds -128")
        bounded = fits
    k, n = jnp.shape(wq)
    kp, np_ = _pad_to(k, K_ALIGN), _pad_to(n, 16)
    w = jnp.pad(jnp.asarray(wq), ((0, kp - k), (0, np_ - n)))
    panels = w.reshape(kp // 4, 4, np_ // 16, 16).transpose(2, 0, 3, 1)
    sums = jnp.sum(w, axis=0, dtype=jnp.int32).reshape(np_ // 16, 1, 16, 1)
    sums = (sums >> jnp.arange(0, 32, 8, dtype=jnp.int32)).astype(jnp.int8)  # little-endian bytes (wrapping)
    return Int8Weight(jnp.concatenate([panels, sums], axis=1), k, n, bool(bounded))


def unpack_int8(panels: Any, in_features: int, out_features: int) -> jax.Array:
    """The ``(K, N)`` int8 weight of ``Int8Weight`` panels (the inverse of ``pack_int8``)."""
    p, quads, _, four = jnp.shape(panels)
    inputs = jnp.asarray(panels)[:, : quads - 1]  # the last quad holds column sums
    return jnp.transpose(inputs, (1, 3, 0, 2)).reshape((quads - 1) * four, 16 * p)[:in_features, :out_features]


def pack_int4(codes: Any, zero: Any, scale: Any, group: int) -> Int4Weight:
    """Pack 4-bit codes ``(K, N)`` (values 0..15) with per-group ``zero`` and ``scale`` ``(K / group, N)``.

    Entry ``(k, n)`` stands for ``(codes[k, n] - zero[k // group, n]) * scale[k // group, n]``.

    Raises:
        ValueError: shapes that do not fit, or ``group`` not a positive multiple of 16.
    """
    k, n = jnp.shape(codes)
    if group <= 0 or group % 16:
        raise ValueError(f"pack_int4: group must be a positive multiple of 16, got {group}")
    g = -(-k // group)
    for name, a in (("zero", zero), ("scale", scale)):
        if tuple(jnp.shape(a)) != (g, n):
            raise ValueError(f"pack_int4: {name} must have shape {(g, n)} for codes {(k, n)}, got {jnp.shape(a)}")
    kp, np_ = g * group, _pad_to(n, 8)
    c = jnp.pad(jnp.asarray(codes, jnp.uint8) & 15, ((0, kp - k), (0, np_ - n))).reshape(kp // 2, 2, np_ // 8, 8)
    packed = (c[:, 0] | (c[:, 1] << 4)).astype(jnp.uint8).transpose(1, 0, 2)

    def per_group(a: Any) -> jax.Array:
        return jnp.pad(jnp.asarray(a, jnp.float32), ((0, 0), (0, np_ - n))).reshape(g, np_ // 8, 8).transpose(1, 0, 2)

    return Int4Weight(packed, per_group(scale), per_group(zero), k, group, n)


# ------------------------------------------------------------------------------------------ products


def _isa_code() -> int:
    isa = kernel_isa()
    if isa is None:
        raise RuntimeError(
            "native kernels are off here ("
            + (load_error() or f"{KERNEL_ENV}=xla or a non-CPU backend")
            + "); check native.available() first"
        )
    return ISA_CODES[isa]


def _rows(x: jax.Array, k: int, what: str) -> tuple[jax.Array, tuple[int, ...]]:
    if x.shape[-1] != k:
        raise ValueError(f"{what}: input has {x.shape[-1]} features on its last axis, the weight expects {k}")
    lead = x.shape[:-1]
    return x.reshape(int(np.prod(lead, dtype=np.int64)), k), lead


def int8_matmul(xq: Any, w: Int8Weight, *, bounded: bool = False) -> jax.Array:
    """``xq @ w`` for int8 ``xq`` ``(..., K)``: exact int32 ``(..., N)``.

    ``bounded=True``: the caller guarantees ``xq`` in ``[-127, 127]`` (as
    symmetric activation quantization makes it); with a bounded weight the
    faster AVX2 path runs. Values outside that promise give wrong sums.
    """
    xq = jnp.asarray(xq)
    if xq.dtype != jnp.int8:
        raise ValueError(f"int8_matmul: xq must be int8, got {xq.dtype}")
    x2, lead = _rows(xq, w.in_features, "int8_matmul")
    n = w.out_features
    out = jax.ffi.ffi_call(
        "jxs_int8_matmul", jax.ShapeDtypeStruct((x2.shape[0], n), jnp.int32), vmap_method="sequential"
    )(x2, w.panels, isa=np.int64(_isa_code()), n=np.int64(n), bounded=np.int64(bounded and w.bounded))
    return out.reshape(*lead, n)


def int8_conv2d(
    x: Any,
    w: Int8Weight,
    window: tuple[int, int],
    *,
    strides: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    bounded: bool = False,
    rescale: Any = None,
) -> jax.Array:
    """Exact int32 2-D convolution of an int8 NHWC input, padded already, with no im2col array in memory.

    ``w`` is the ``(kh, kw, C, N)`` kernel reshaped to ``(kh * kw * C, N)`` and
    packed (``pack_int8``); ``window`` is ``(kh, kw)``. Returns ``(B, OH, OW, N)``
    int32, equal to ``lax.conv_general_dilated`` with VALID padding on the
    padded input. ``bounded`` as in ``int8_matmul``. ``rescale=(x_scale,
    w_scale)`` (``(B,)`` and ``(N,)`` floats) returns ``sums * x_scale[b] *
    w_scale[n]`` as float32 instead, computed as the sums are made.
    """
    x = jnp.asarray(x)
    if x.dtype != jnp.int8 or x.ndim != 4:
        raise ValueError(f"int8_conv2d: x must be an int8 NHWC array, got {x.dtype} {x.shape}")
    (kh, kw), (sh, sw), (dh, dw) = window, strides, dilation
    if w.in_features != kh * kw * x.shape[3]:
        raise ValueError(
            f"int8_conv2d: the weight has {w.in_features} inputs, the window {kh}x{kw} over "
            f"{x.shape[3]} channels needs {kh * kw * x.shape[3]}"
        )
    oh, ow = (x.shape[1] - (kh - 1) * dh - 1) // sh + 1, (x.shape[2] - (kw - 1) * dw - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"int8_conv2d: the dilated window {kh}x{kw} does not fit the input {x.shape[1:3]}")
    n = w.out_features
    attrs = dict(
        isa=np.int64(_isa_code()),
        n=np.int64(n),
        kh=np.int64(kh),
        kw=np.int64(kw),
        sh=np.int64(sh),
        sw=np.int64(sw),
        dh=np.int64(dh),
        dw=np.int64(dw),
        bounded=np.int64(bounded and w.bounded),
    )
    shape = (x.shape[0], oh, ow, n)
    if rescale is None:
        return jax.ffi.ffi_call("jxs_int8_conv2d", jax.ShapeDtypeStruct(shape, jnp.int32), vmap_method="sequential")(
            x, w.panels, **attrs
        )
    sx, sc = (jnp.asarray(a, jnp.float32).reshape(-1) for a in rescale)
    if sx.shape[0] != x.shape[0] or sc.shape[0] != n:
        raise ValueError(
            f"int8_conv2d: rescale needs {x.shape[0]} input scales and {n} weight scales, got "
            f"{sx.shape[0]} and {sc.shape[0]}"
        )
    return jax.ffi.ffi_call("jxs_w8a8_conv2d", jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")(
        x, w.panels, sx, sc, **attrs
    )


def smooth_multipliers(smooth: Any) -> jax.Array:
    """``1 / smooth`` in float32: what a SmoothQuant-smoothed layer multiplies its input by.

    The quantized runtime smooths an input as ``x * (1 / s)`` on every path, XLA's
    and the native kernel's, so the two quantize the same floats (a product by a
    reciprocal computed once, not a division per element: the division cost about
    4% of a W8A8 MiniLM encoder on a Zen 4 EPYC).

    Example:
        >>> import numpy as np
        >>> from jaxopt_serve import native
        >>> np.asarray(native.smooth_multipliers([2.0, 0.5])).tolist()
        [0.5, 2.0]
    """
    return jnp.float32(1) / jnp.asarray(smooth, jnp.float32)


def w8a8_matmul(
    x: Any,
    w: Int8Weight,
    w_scale: Any,
    bias: Any = None,
    *,
    act_scale: Any = None,
    symmetric: bool = True,
    act_bits: int = 8,
    smooth: Any = None,
) -> jax.Array:
    """``x @ dequant(w)`` with int8 activations: ``round(x / s_row) @ w * s_row * w_scale (+ bias)`` in one call.

    ``s_row`` is each row's absmax / 127 (dynamic), or ``act_scale`` (a
    calibrated scalar, static). ``symmetric=False`` (dynamic only): each row's
    range ``[min(x, 0), max(x, 0)]`` in 254 (``act_bits=8``, codes -127..127) or
    127 steps with a zero point, corrected exactly in the int32 sums. ``act_bits=7`` (asymmetric
    only) gives codes in ``[0, 127]``, which the AVX2 path multiplies with
    ``vpmaddubsw`` and no sign fix-up (the activation range PyTorch's x86
    dynamic quantization uses). ``smooth`` (``K`` SmoothQuant factors): what is
    quantized is ``x * smooth_multipliers(smooth)``, each row multiplied in cache as it
    is quantized (the same float products as passing that array in, without a pass
    over ``x`` of its own).
    ``x`` is float ``(..., K)``; returns f32 ``(..., N)``.
    """
    if not symmetric and act_scale is not None:
        raise ValueError("w8a8_matmul: asymmetric activations are dynamic; pass act_scale=None")
    if act_bits not in (7, 8) or (act_bits == 7 and symmetric):
        raise ValueError(
            f"w8a8_matmul: act_bits must be 8, or 7 with symmetric=False; got act_bits={act_bits!r}, "
            f"symmetric={symmetric}"
        )
    x = jnp.asarray(x, jnp.float32)
    x2, lead = _rows(x, w.in_features, "w8a8_matmul")
    n = w.out_features
    w_scale = jnp.asarray(w_scale, jnp.float32).reshape(-1)
    if w_scale.shape[0] != n:
        raise ValueError(f"w8a8_matmul: w_scale has {w_scale.shape[0]} entries for {n} output features")
    b = jnp.zeros((1,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32).reshape(-1)
    s = jnp.ones((1,), jnp.float32) if act_scale is None else jnp.asarray(act_scale, jnp.float32).reshape(1)
    multipliers = jnp.ones((1,), jnp.float32) if smooth is None else smooth_multipliers(smooth).reshape(-1)
    if smooth is not None and multipliers.shape[0] != w.in_features:
        raise ValueError(f"w8a8_matmul: {multipliers.shape[0]} smoothing factors for {w.in_features} input features")
    mode = 1 if act_scale is not None else 0 if symmetric else 2 if act_bits == 8 else 3
    out = jax.ffi.ffi_call(
        "jxs_w8a8_matmul", jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32), vmap_method="sequential"
    )(
        x2,
        w.panels,
        w_scale,
        b,
        s,
        multipliers,
        isa=np.int64(_isa_code()),
        mode=np.int64(mode),
        has_bias=np.int64(bias is not None),
        bounded=np.int64(w.bounded),
        has_smooth=np.int64(smooth is not None),
    )
    return out.reshape(*lead, n)


def int4_matmul(x: Any, w: Int4Weight) -> jax.Array:
    """``x @ dequant(w)`` for a 4-bit weight, float activations (weight-only): f32 ``(..., N)``."""
    x = jnp.asarray(x, jnp.float32)
    x2, lead = _rows(x, w.in_features, "int4_matmul")
    n = w.out_features
    out = jax.ffi.ffi_call(
        "jxs_int4_matmul", jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32), vmap_method="sequential"
    )(x2, w.codes, w.scale, w.zero, isa=np.int64(_isa_code()), group=np.int64(w.group), n=np.int64(n))
    return out.reshape(*lead, n)


# ------------------------------------------------------------------------------------------ attention


def attention_reference(q: Any, k: Any, v: Any, mask: Any = None, *, scale: float | None = None) -> jax.Array:
    """Multi-head attention in XLA's ops: ``softmax(scale q k^T, masked keys at finfo.min) v``.

    ``q``, ``k``, ``v``: ``(batch, length, heads, dim)``; ``mask``: ``(batch, length)``, true for the keys
    to attend to (all when ``None``); ``scale`` defaults to ``dim ** -0.5``. Returns ``(batch, length,
    heads, dim)``. The formulation ``attention`` computes, and its gradient.
    """
    q, k, v = (jnp.asarray(a) for a in (q, k, v))
    dim = q.shape[-1]
    scale = dim**-0.5 if scale is None else scale
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # heads first: batched matmuls
    logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2)) * jnp.asarray(scale, q.dtype)
    if mask is not None:
        logits = jnp.where(jnp.asarray(mask, bool)[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
    return jnp.swapaxes(jnp.matmul(jax.nn.softmax(logits, axis=-1), v), 1, 2)


def attention(q: Any, k: Any, v: Any, mask: Any = None, *, scale: float | None = None) -> jax.Array:
    """``attention_reference`` in one native call on CPU (f32; the fused kernel), XLA's ops elsewhere.

    The kernel reads ``q``, ``k``, ``v`` in the ``(batch, length, heads, dim)``
    layout projections produce and writes the output in it: no transposes, no
    ``(batch, heads, length, length)`` array in memory; masked keys are
    skipped. Its gradient is the reference formulation's (recomputed), so
    training through it works. Falls back to ``attention_reference`` when the
    kernels are off (``native.available()`` is false, e.g. under
    ``use_kernel("xla")``, on GPU/TPU) or the inputs are not f32.

    Example:
        >>> import numpy as np
        >>> from jaxopt_serve import native
        >>> q = k = v = np.random.default_rng(0).normal(size=(2, 5, 3, 4)).astype(np.float32)
        >>> mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
        >>> got, want = native.attention(q, k, v, mask), native.attention_reference(q, k, v, mask)
        >>> bool(np.allclose(got, want, atol=1e-5))
        True
    """
    q, k, v = (jnp.asarray(a) for a in (q, k, v))
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"attention: q, k and v must share one (batch, length, heads, dim) shape, got {q.shape}, "
            f"{k.shape} and {v.shape}"
        )
    if mask is not None and tuple(jnp.shape(mask)) != q.shape[:2]:
        raise ValueError(f"attention: mask must be (batch, length) = {q.shape[:2]}, got {tuple(jnp.shape(mask))}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if not available() or any(a.dtype != jnp.float32 for a in (q, k, v)):
        return attention_reference(q, k, v, mask, scale=scale)
    kept = jnp.ones(q.shape[:2], jnp.int32) if mask is None else jnp.asarray(mask).astype(jnp.int32)
    return _native_attention(q, k, v, kept, _isa_code(), scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _native_attention(q: jax.Array, k: jax.Array, v: jax.Array, kept: jax.Array, isa: int, scale: float) -> jax.Array:
    return jax.ffi.ffi_call("jxs_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")(
        q, k, v, kept, isa=np.int64(isa), scale=np.float32(scale)
    )


def _native_attention_fwd(q, k, v, kept, isa, scale):
    return _native_attention(q, k, v, kept, isa, scale), (q, k, v, kept)


def _native_attention_bwd(isa, scale, residuals, grad):
    q, k, v, kept = residuals
    _, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, kept != 0, scale=scale), q, k, v)
    return (*vjp(grad), None)


_native_attention.defvjp(_native_attention_fwd, _native_attention_bwd)
