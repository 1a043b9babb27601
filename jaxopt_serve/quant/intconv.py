"""An exact ``int8 x int8 -> int32`` convolution that stays exact under any sharding.

The bug: on XLA:CPU (jaxlib 0.10.2), a jitted ``lax.conv_general_dilated(int8,
int8, preferred_element_type=int32)`` can lose YNNPACK when a sharding gathers
its result along channels. The gather gives the result a channel-major layout
(``s32[...]{2,1,0,3}``). XLA's generic convolution then writes only the low
byte of each int32 (the sum mod 256) and leaves the other three bytes as
garbage. The fix: ``int8_conv`` emits no HLO convolution. It copies the
shifted windows into one array (im2col, slices only) and runs one int8
``lax.dot_general`` that accumulates in int32. The result is exact, no mesh is
needed, and int8 dots are compiled correctly. This also avoids an XLA
partitioning bug that counts a convolution several times when its input rows
are split across devices (float too).

Minimal reproduction (prints a nonzero difference, e.g. 41216; 0 is correct)::

    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()).reshape(1, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (1, 1, 1, 32)).astype(np.int8)
    w = rng.integers(-128, 128, (1, 1, 32, 2)).astype(np.int8)
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.int32)
    f = jax.jit(conv, out_shardings=NamedSharding(mesh, P()))  # gathers channels
    out = f(x, jax.device_put(w, NamedSharding(mesh, P(None, None, None, "model"))))
    print(np.abs(np.asarray(out, np.int64) - x.reshape(1, 32).astype(np.int64) @ w.reshape(32, 2)).max())
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_serve import native


def native_conv2d_applies(spatial_dims: int, groups: int, lhs_dilation: Sequence[int]) -> bool:
    """Whether ``int8_conv`` runs on ``native.int8_conv2d``, which builds the im2col rows in cache.

    True when the native kernels run here and the convolution is 2-D, ungrouped and without input dilation.
    """
    return native_conv2d_kind(spatial_dims, groups, lhs_dilation) and native.available()


def native_conv2d_kind(spatial_dims: int, groups: int, lhs_dilation: Sequence[int]) -> bool:
    """Whether a convolution is of the kind ``native.int8_conv2d`` runs (2-D, ungrouped, no input dilation),
    whether or not the native kernels are built here."""
    return groups == 1 and spatial_dims == 2 and all(d == 1 for d in lhs_dilation)


def int8_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
    *,
    bounded: bool = False,
    rescale: tuple[Any, Any] | None = None,
    packed_rhs: Any = None,
) -> jax.Array:
    """The exact int32 result of ``lax.conv_general_dilated`` on int8 operands, under any sharding.

    Takes the same arguments as ``jax.lax.conv_general_dilated`` and returns
    the same array, but computes it as im2col (the shifted windows of
    ``lhs`` copied into one array) followed by one ``int8 x int8 -> int32``
    ``lax.dot_general``. Works inside ``jit`` whatever the mesh or sharding.
    See the module docstring for the XLA:CPU bug this avoids.

    Args:
        lhs: int8 input, laid out as ``dimension_numbers`` says (default NCHW).
        rhs: int8 kernel (default OIHW).
        window_strides: one stride per spatial dimension (default all 1).
        padding: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"`` or one
            ``(low, high)`` pair per spatial dimension. Pairs may be negative.
        lhs_dilation: input dilation (transposed convolution). Default all 1.
        rhs_dilation: kernel dilation (atrous convolution). Default all 1.
        dimension_numbers: as in ``lax.conv_general_dilated``, e.g.
            ``("NHWC", "HWIO", "NHWC")``.
        feature_group_count: grouped (e.g. depthwise) convolution.
        batch_group_count: as in ``lax.conv_general_dilated``.
        precision: passed to the dot. Integer dots ignore it.
        preferred_element_type: ``None`` or int32. Accepted so this function
            can replace ``lax.conv_general_dilated`` in existing calls.
        out_sharding: as in ``lax.conv_general_dilated`` (``None``: XLA
            chooses). With the other arguments, this means a traced
            ``conv_general_dilated`` equation's params can be passed through
            unchanged.
        bounded: the caller guarantees both operands in ``[-127, 127]`` (as
            symmetric quantization makes them), so the native CPU kernel may
            take its faster path; values outside that promise give wrong sums.
        rescale: ``(x_scale, w_scale)``, one float per example and one per output
            feature: returns ``sums * x_scale[b] * w_scale[f]`` as float32 (the
            W8A8 rescale; fused into the native kernel where it runs).
        packed_rhs: the kernel already packed for the native kernel (``native.Int8Weight``
            of its ``(*window, in) x out`` matrix, as ``serving_layout`` packs an HWIO
            kernel once); ``rhs`` then only gives the kernel's shape (an int8 array or
            ``jax.ShapeDtypeStruct``). Only for an ungrouped 2-D convolution the native
            kernel runs (``native_conv2d_applies``).

    Returns:
        The int32 convolution, shaped and laid out like
        ``lax.conv_general_dilated(..., preferred_element_type=jnp.int32)``.

    Raises:
        TypeError: ``lhs`` or ``rhs`` is not int8, or
            ``preferred_element_type`` is not int32.
        ValueError: the arguments are invalid for ``lax.conv_general_dilated``.
            The message is the one that function gives.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x = jnp.asarray(rng.integers(-128, 128, (2, 5, 5, 8)), jnp.int8)
        >>> w = jnp.asarray(rng.integers(-128, 128, (3, 3, 8, 4)), jnp.int8)
        >>> kw = dict(window_strides=(2, 2), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        >>> y = jax.jit(lambda x, w: int8_conv(x, w, **kw))(x, w)
        >>> y.shape, y.dtype
        ((2, 3, 3, 4), dtype('int32'))
        >>> ref = jax.lax.conv_general_dilated(x.astype(jnp.int32), w.astype(jnp.int32), **kw)
        >>> bool((y == ref).all())
        True
    """
    for name, a in (("lhs", lhs), ("rhs", rhs)):
        dtype = jnp.dtype(a.dtype) if hasattr(a, "dtype") else jnp.result_type(a)  # rhs may be a ShapeDtypeStruct
        if dtype != jnp.int8:
            raise TypeError(f"int8_conv: {name} must be int8, got {dtype}")
    if preferred_element_type is not None and jnp.dtype(preferred_element_type) != jnp.int32:
        raise TypeError(f"int8_conv: the result is int32, got preferred_element_type={preferred_element_type!r}")
    nd = lhs.ndim - 2
    window_strides = tuple(window_strides) if window_strides is not None else (1,) * nd
    lhs_dilation = tuple(lhs_dilation) if lhs_dilation is not None else (1,) * nd
    rhs_dilation = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * nd
    conv_args = dict(
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
    )
    # Shape inference by lax itself: same validation, same error messages, same output shape.
    out = jax.eval_shape(
        functools.partial(jax.lax.conv_general_dilated, preferred_element_type=jnp.int32, **conv_args),
        jax.ShapeDtypeStruct(lhs.shape, jnp.int8),
        jax.ShapeDtypeStruct(rhs.shape, jnp.int8),
    )
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if isinstance(padding, str):  # as lax.conv_general_dilated resolves it
        window = [(rhs.shape[d] - 1) * r + 1 for d, r in zip(dn.rhs_spec[2:], rhs_dilation)]
        padding = jax.lax.padtype_to_pads([lhs.shape[d] for d in dn.lhs_spec[2:]], window, window_strides, padding)
    out_spatial = [out.shape[d] for d in dn.out_spec[2:]]
    if 0 in out.shape:
        return jnp.zeros(out.shape, jnp.int32 if rescale is None else jnp.float32)

    # Canonical layouts: x (batch, *spatial, features), k (*window, in, out).
    x = jnp.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
    k_axes = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])
    k_shape = tuple(rhs.shape[a] for a in k_axes)
    window_shape, cin, cout = k_shape[:nd], k_shape[nd], k_shape[nd + 1]
    if any(lo or hi or d > 1 for (lo, hi), d in zip(padding, lhs_dilation)):
        x = jax.lax.pad(
            x, np.int8(0), [(0, 0, 0), *((lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)), (0, 0, 0)]
        )

    # Groups become a leading batch axis of the dot: g (groups), x (g, batch, *spatial, in), k (g, *window, in, out/g).
    groups = max(feature_group_count, batch_group_count)
    if feature_group_count > 1:
        x = jnp.moveaxis(x.reshape(*x.shape[:-1], groups, cin), -2, 0)
    elif batch_group_count > 1:
        x = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
    else:
        x = x[None]
    native_path = native_conv2d_applies(nd, groups, lhs_dilation)
    if packed_rhs is not None and not native_path:
        raise ValueError("int8_conv: packed_rhs is for ungrouped 2-D convolutions on the native kernel")
    if packed_rhs is None:
        k = jnp.moveaxis(jnp.transpose(rhs, k_axes).reshape(*window_shape, cin, groups, cout // groups), -2, 0)

    if native_path:
        # The native kernel builds the im2col rows per chunk of output pixels in cache (no patches array).
        packed = packed_rhs
        if packed is None:
            packed = native.pack_int8(k[0].reshape(math.prod(window_shape) * cin, cout), bounded)
        y = native.int8_conv2d(
            x[0],
            packed,
            tuple(window_shape),
            strides=tuple(window_strides),
            dilation=tuple(rhs_dilation),
            bounded=bounded,
            rescale=None if rescale is None else _rescale_vectors(rescale, lhs.shape[dn.lhs_spec[0]], cout),
        )
        return _to_layout(y, dn, nd, out, out_sharding)
    # im2col: one strided slice per window offset, concatenated on the feature axis ((window, in) order, like k).
    columns = []
    for offset in itertools.product(*(range(n) for n in window_shape)):
        start = [0, 0, *(o * r for o, r in zip(offset, rhs_dilation)), 0]
        limit = [
            x.shape[0],
            x.shape[1],
            *(s + (n - 1) * st + 1 for s, n, st in zip(start[2:-1], out_spatial, window_strides)),
            x.shape[-1],
        ]
        columns.append(jax.lax.slice(x, start, limit, (1, 1, *window_strides, 1)))
    patches = columns[0] if len(columns) == 1 else jnp.concatenate(columns, axis=-1)
    kernel = k.reshape(groups, math.prod(window_shape) * cin, cout // groups)

    if groups == 1 and native.available():  # the native int8 GEMM (exact, like the dot below)
        y = native.int8_matmul(patches[0], native.pack_int8(kernel[0], bounded), bounded=bounded)
    elif groups == 1:
        y = jax.lax.dot_general(
            patches[0], kernel[0], (((nd + 1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.int32
        )
    else:
        y = jax.lax.dot_general(
            patches, kernel, (((nd + 2,), (1,)), ((0,), (0,))), precision=precision, preferred_element_type=jnp.int32
        )
        y = jnp.moveaxis(y, 0, -2).reshape(*y.shape[1:-1], cout)  # (batch, *spatial, g * out/g)
    if rescale is not None:
        sx, sw = _rescale_vectors(rescale, y.shape[0], cout)
        y = y.astype(jnp.float32) * sx.reshape(-1, *(1,) * (nd + 1)) * sw
    return _to_layout(y, dn, nd, out, out_sharding)


def _rescale_vectors(rescale: tuple[Any, Any], batch: int, features: int) -> tuple[jax.Array, jax.Array]:
    """``(x_scale (batch,), w_scale (features,))`` float32 from scalars or arrays of those sizes."""
    sx, sw = (jnp.asarray(a, jnp.float32).reshape(-1) for a in rescale)
    return jnp.broadcast_to(sx, (batch,)), jnp.broadcast_to(sw, (features,))


def _to_layout(y: jax.Array, dn: Any, nd: int, out: Any, out_sharding: Any) -> jax.Array:
    """A canonical result (batch, *spatial, features) in the requested output layout (and sharding)."""
    canonical = {dn.out_spec[0]: 0, dn.out_spec[1]: nd + 1, **{d: 1 + i for i, d in enumerate(dn.out_spec[2:])}}
    y = jnp.transpose(y, [canonical[a] for a in range(nd + 2)])
    assert y.shape == out.shape, (y.shape, out.shape)
    return y if out_sharding is None else jax.sharding.reshard(y, out_sharding)
