"""The native int8 / int4 kernels: exact integer sums, the float epilogue, dispatch, jit and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxopt_serve import native
from jaxopt_serve.models import MLPConfig, init_variables
from jaxopt_serve.quant import quantize, quantized_predict_fn

KERNELS = native.supported_kernels()
needs_native = pytest.mark.skipif(not KERNELS, reason=f"native kernels not built: {native.load_error()}")


def _xla_int32(xq, wq):
    return np.asarray(jax.lax.dot_general(xq, wq, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32))


def _xla_w8a8(x, wq, sw, act_scale=None, symmetric=True, act_bits=8):
    """The quantized runtime's formulation: per-row (or static) scale, int32 dot, acc * sx * sw.

    The activation codes are computed in numpy (IEEE division, round half to even, as the kernels do);
    XLA may turn ``x / s`` into ``x * (1 / s)``, which moves a code that sits within an ulp of a half.
    """
    x = np.asarray(x, np.float32)
    zero = None
    if not symmetric:
        steps, offset = (254.0, 127.0) if act_bits == 8 else (127.0, 0.0)
        lo = np.minimum(x.min(axis=1, keepdims=True), 0).astype(np.float32)
        hi = np.maximum(x.max(axis=1, keepdims=True), 0).astype(np.float32)
        sx = np.where(hi > lo, (hi - lo) / np.float32(steps), 1).astype(np.float32)
        zero = np.round(-lo / sx) - np.float32(offset)
        xq = np.clip(np.round(x / sx) + zero, -offset, steps - offset).astype(np.int8)
    else:
        if act_scale is None:
            absmax = np.abs(x).max(axis=1, keepdims=True)
            sx = np.where(absmax > 0, absmax / np.float32(127), 1).astype(np.float32)
        else:
            sx = np.float32(act_scale)
        xq = np.clip(np.round(x / sx), -127, 127).astype(np.int8)
    acc = _xla_int32(xq, wq)
    if zero is not None:
        acc = acc - zero.astype(np.int32) * wq.astype(np.int32).sum(axis=0)
    return (acc.astype(np.float32) * sx * sw).astype(np.float32)


@needs_native
@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 13), k=st.integers(1, 70), n=st.integers(1, 40), seed=st.integers(0, 2**16), bounded=st.booleans()
)
def test_int32_sums_equal_xla_bit_for_bit_on_every_kernel(m, k, n, seed, bounded):
    """Any int8 on the exact path (-128 included: the widest products); [-127, 127] on the bounded one."""
    rng = np.random.default_rng(seed)
    lo = -127 if bounded else -128
    xq = rng.integers(lo, 128, (m, k)).astype(np.int8)
    wq = rng.integers(lo, 128, (k, n)).astype(np.int8)
    if bounded:  # the extremes, where an int16 pair sum would saturate first
        xq[0, :] = -127
        wq[:, 0] = 127
    want = _xla_int32(xq, wq)
    packed = native.pack_int8(wq)
    assert packed.bounded == bool(wq.min() > -128)
    for kernel in KERNELS:
        with native.use_kernel(kernel):
            got = np.asarray(jax.jit(lambda x, p: native.int8_matmul(x, p, bounded=bounded))(xq, packed))
        np.testing.assert_array_equal(got, want, err_msg=f"{kernel} m={m} k={k} n={n} bounded={bounded}")


@needs_native
@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("m,k,n", [(100, 50, 20), (60, 1024, 1040)])  # rows split over threads; panels split
def test_both_work_splits_are_exact(m, k, n, bounded):
    rng = np.random.default_rng(5)
    lo = -127 if bounded else -128
    xq = rng.integers(lo, 128, (m, k)).astype(np.int8)
    wq = rng.integers(lo, 128, (k, n)).astype(np.int8)
    got = np.asarray(jax.jit(lambda x, p: native.int8_matmul(x, p, bounded=bounded))(xq, native.pack_int8(wq)))
    np.testing.assert_array_equal(got, _xla_int32(xq, wq))


@needs_native
@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 70), k=st.integers(1, 90), n=st.integers(1, 40), seed=st.integers(0, 2**16), bounded=st.booleans()
)
def test_nonnegative_rows_take_the_unsigned_path_exactly(m, k, n, seed, bounded):
    """Rows with no negative value (a ReLU's output) skip the sign fix-up; mixed with signed rows in one call
    (bounded), or all of them with weights holding -128 (the widest pair sum, 2 * 127 * 128)."""
    rng = np.random.default_rng(seed)
    xq = rng.integers(0, 128, (m, k)).astype(np.int8)
    xq[0, :] = 127
    if bounded:
        xq[rng.random(m) < 0.5] *= -1  # some rows signed: those blocks keep the bounded path
    wq = rng.integers(-127 if bounded else -128, 128, (k, n)).astype(np.int8)
    if not bounded:
        wq[:, 0] = -128
    want = _xla_int32(xq, wq)
    for kernel in KERNELS:
        with native.use_kernel(kernel):
            got = np.asarray(jax.jit(lambda x, p: native.int8_matmul(x, p, bounded=bounded))(xq, native.pack_int8(wq)))
        np.testing.assert_array_equal(got, want, err_msg=f"{kernel} m={m} k={k} n={n} bounded={bounded}")


def test_pack_int8_round_trips_and_checks_the_bound():
    wq = np.arange(-128, 127, dtype=np.int8)[: 37 * 5].reshape(37, 5)
    packed = native.pack_int8(wq)
    assert not packed.bounded and packed.panels.shape == (1, 64 // 4 + 1, 16, 4)  # K 37 padded to 64, column sums
    np.testing.assert_array_equal(native.unpack_int8(packed.panels, 37, 5), wq)
    with pytest.raises(ValueError, match="bounded=True, but the weight holds -128"):
        native.pack_int8(wq, bounded=True)
    assert native.pack_int8(np.maximum(wq, -127)).bounded


@pytest.mark.parametrize("fill", [-128, 127, None])
def test_pack_int8_stores_each_panels_column_sums_as_little_endian_int32(fill):
    """The kernels read a panel's last quad as 16 int32 column sums; sums past 16 bits (K = 4,000 of -128) too."""
    rng = np.random.default_rng(1)
    wq = np.full((4000, 20), fill, np.int8) if fill is not None else rng.integers(-128, 128, (4000, 20), np.int8)
    panels = np.asarray(native.pack_int8(wq).panels)
    sums = np.ascontiguousarray(panels[:, -1]).view("<i4").reshape(-1)  # (P, 16, 4) bytes -> P * 16 int32
    np.testing.assert_array_equal(sums, np.pad(wq.astype(np.int32).sum(axis=0), (0, 12)))


@needs_native
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("how", ["dynamic", "dynamic_relu", "static", "asymmetric", "asymmetric7"])
@pytest.mark.parametrize("m", [37, 130])  # one block of rows; chunks of rows over threads (small weight)
def test_w8a8_epilogue_matches_the_xla_formulation(kernel, how, m):
    static = how == "static"
    symmetric = not how.startswith("asymmetric")
    bits = 7 if how == "asymmetric7" else 8
    rng = np.random.default_rng(1)
    x = rng.normal(size=(m, 200)).astype(np.float32)
    if how == "dynamic_relu":
        x[: m // 2] = np.maximum(x[: m // 2], 0)  # nonnegative rows (unsigned path) next to signed ones
    x[3] = 0.0  # an all-zero row takes scale 1
    w = rng.normal(size=(200, 70)).astype(np.float32)
    sw = (np.abs(w).max(0) / 127).astype(np.float32)
    wq = np.clip(np.round(w / sw), -128 if bits == 7 else -127, 127).astype(np.int8)
    if bits == 7:
        wq[:, 1] = -128  # the unsigned path takes any int8 weight
    act = float(np.abs(x).max() / 127) if static else None
    bias = rng.normal(size=70).astype(np.float32)
    with native.use_kernel(kernel):
        got = jax.jit(
            lambda x, p: native.w8a8_matmul(x, p, sw, bias, act_scale=act, symmetric=symmetric, act_bits=bits)
        )(x, native.pack_int8(wq))
    want = _xla_w8a8(x, wq, sw, act, symmetric=symmetric, act_bits=bits) + bias
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@needs_native
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_w8a8_smoothing_inside_the_kernel_equals_scaling_first(kernel, symmetric):
    """SmoothQuant factors passed to the kernel give the bits of x * (1 / s) passed in (the same IEEE products)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(45, 200)).astype(np.float32)
    x[:, 9] *= 50.0
    s = rng.uniform(0.2, 8.0, size=200).astype(np.float32)
    wq = rng.integers(-127, 128, size=(200, 70)).astype(np.int8)
    sw = rng.uniform(0.001, 0.01, size=70).astype(np.float32)
    packed = native.pack_int8(wq)
    with native.use_kernel(kernel):
        fused = native.w8a8_matmul(x, packed, sw, symmetric=symmetric, smooth=s)
        scaled = native.w8a8_matmul(x * np.asarray(native.smooth_multipliers(s)), packed, sw, symmetric=symmetric)
    np.testing.assert_array_equal(np.asarray(fused), np.asarray(scaled))
    np.testing.assert_array_equal(np.asarray(native.smooth_multipliers(s)), np.float32(1) / s)
    with pytest.raises(ValueError, match="199 smoothing factors for 200 input features"):
        native.w8a8_matmul(x, packed, sw, smooth=s[:199])


@needs_native
@pytest.mark.parametrize("how", ["symmetric", "asymmetric", "asymmetric7"])
@pytest.mark.parametrize("m", [37, 130])  # one block of rows; chunks of rows over threads (small weight)
def test_w8a8_kernels_agree_bit_for_bit_with_smoothing_and_bias(how, m):
    """Every instruction-set path quantizes, multiplies and finishes alike: the same codes, sums and floats."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(m, 200)).astype(np.float32)
    x[:, 9] *= 50.0
    x[: m // 3] = np.maximum(x[: m // 3], 0)
    s = rng.uniform(0.2, 8.0, size=200).astype(np.float32)
    wq = rng.integers(-127, 128, size=(200, 70)).astype(np.int8)
    sw = rng.uniform(0.001, 0.01, size=70).astype(np.float32)
    bias = rng.normal(size=70).astype(np.float32)
    packed = native.pack_int8(wq)
    kwargs = {"symmetric": how == "symmetric", "act_bits": 7 if how == "asymmetric7" else 8}
    outs = {}
    for kernel in KERNELS:
        with native.use_kernel(kernel):
            outs[kernel] = np.asarray(native.w8a8_matmul(x, packed, sw, bias, smooth=s, **kwargs))
    for kernel, out in outs.items():
        np.testing.assert_array_equal(out, outs[KERNELS[0]], err_msg=f"{kernel} vs {KERNELS[0]}")


@needs_native
@pytest.mark.parametrize("kernel", KERNELS)
def test_int4_weight_only_matches_the_dequantized_weight(kernel):
    rng = np.random.default_rng(2)
    k, n, group = 100, 37, 32  # K not a multiple of the group, N not of the 8-column panels: padded
    g = -(-k // group)
    codes = rng.integers(0, 16, (k, n)).astype(np.uint8)
    zero = rng.integers(0, 16, (g, n)).astype(np.float32)
    scale = rng.uniform(0.01, 0.1, (g, n)).astype(np.float32)
    w = (codes - np.repeat(zero, group, 0)[:k]) * np.repeat(scale, group, 0)[:k]
    x = rng.normal(size=(5, 3, k)).astype(np.float32)  # leading axes are rows
    with native.use_kernel(kernel):
        got = np.asarray(jax.jit(native.int4_matmul)(x, native.pack_int4(codes, zero, scale, group)))
    want = x @ w
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_dispatch_names_and_the_xla_switch():
    with pytest.raises(ValueError, match="unknown kernel 'avx9'"):
        with native.use_kernel("avx9"):
            pass
    with native.use_kernel("xla"):
        assert not native.available() and native.kernel_isa() is None
    if KERNELS:
        assert native.kernel_isa() == KERNELS[0]
        for kernel in KERNELS:
            with native.use_kernel(kernel):
                assert native.kernel_isa() == kernel


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"2-D int8 \(in, out\) weight, got float32 \(3,\)"):
        native.pack_int8(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="group must be a positive multiple of 16, got 10"):
        native.pack_int4(np.zeros((20, 4), np.uint8), np.zeros((2, 4)), np.ones((2, 4)), 10)
    if KERNELS:
        with pytest.raises(ValueError, match="input has 5 features on its last axis, the weight expects 4"):
            native.w8a8_matmul(np.zeros((2, 5), np.float32), native.pack_int8(np.zeros((4, 3), np.int8)), np.ones(3))


def test_a_missing_library_falls_back_to_xla_with_the_reason(monkeypatch):
    config = MLPConfig(features=(64,))
    q = quantize(init_variables(config, 0)).variables
    x = np.random.default_rng(3).normal(size=(4, 64)).astype(np.float32)
    want = np.asarray(jax.jit(quantized_predict_fn(config, mode="dynamic"))(q, x))
    monkeypatch.setattr(native, "_library", lambda: (None, "the native kernels were not built (test)"))
    assert native.supported_kernels() == [] and not native.available()
    assert native.load_error() == "the native kernels were not built (test)"
    text = jax.jit(quantized_predict_fn(config, mode="dynamic")).lower(q, x).as_text()
    assert "jxs_" not in text
    np.testing.assert_allclose(
        np.asarray(jax.jit(quantized_predict_fn(config, mode="dynamic"))(q, x)), want, rtol=1e-6, atol=1e-6
    )


@needs_native
def test_kernels_under_sharding_equal_one_device():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(8), ("data",))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, 96)).astype(np.float32)
    wq = rng.integers(-127, 128, (96, 40)).astype(np.int8)
    sw = np.full(40, 0.01, np.float32)
    packed = native.pack_int8(wq)
    f = jax.jit(lambda x, p: native.w8a8_matmul(x, p, sw))
    one = np.asarray(f(x, packed))
    sharded = np.asarray(f(jax.device_put(x, NamedSharding(mesh, P("data"))), packed))
    np.testing.assert_array_equal(sharded, one)


def test_a_machine_without_a_compiler_installs_with_a_warning(tmp_path):
    """setup.py's build with a failing compiler: the build succeeds, says why, and leaves no library."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "setup.py", tmp_path / "setup.py")
    (tmp_path / "jaxopt_serve" / "native").mkdir(parents=True)
    shutil.copy(root / "jaxopt_serve" / "native" / "qgemm.cc", tmp_path / "jaxopt_serve" / "native" / "qgemm.cc")
    env = {**os.environ, "CC": "false", "CXX": "false"}
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "native kernels were not built" in done.stdout + done.stderr
    assert "Install a C++ compiler" in done.stdout + done.stderr
    assert not list((tmp_path / "jaxopt_serve" / "native").glob("_qgemm*"))


@needs_native
@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(3, 12),
    w=st.integers(3, 12),
    c=st.integers(1, 20),
    n=st.integers(1, 40),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.integers(1, 2),
    dil=st.integers(1, 2),
    fill=st.sampled_from(["signed", "nonnegative", "bounded"]),
    seed=st.integers(0, 2**16),
)
def test_int8_conv2d_equals_lax_bit_for_bit(b, h, w, c, n, kh, kw, stride, dil, fill, seed):
    """The im2col-in-cache convolution (through ``int8_conv``) on every kernel path: signed inputs with -128
    (exact path), nonnegative inputs with -128 weights (unsigned path), bounded mixed rows (bounded path)."""
    from jaxopt_serve.quant.intconv import int8_conv

    rng = np.random.default_rng(seed)
    lo = {"signed": -128, "nonnegative": 0, "bounded": -127}[fill]
    x = rng.integers(lo, 128, (b, h, w, c)).astype(np.int8)
    k = rng.integers(-127 if fill == "bounded" else -128, 128, (kh, kw, c, n)).astype(np.int8)
    kwargs = dict(
        window_strides=(stride, 1), padding="SAME", rhs_dilation=(dil, 1), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    want = np.asarray(jax.lax.conv_general_dilated(x.astype(np.int32), k.astype(np.int32), **kwargs))
    for kernel in KERNELS:
        with native.use_kernel(kernel):
            got = jax.jit(lambda a, q: int8_conv(a, q, **kwargs, bounded=fill == "bounded"))(x, k)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{kernel} {fill}")


@needs_native
def test_int8_conv2d_chunks_rows_over_threads_exactly():
    """More output pixels than one chunk of rows, several panels of output channels."""
    from jaxopt_serve.quant.intconv import int8_conv

    rng = np.random.default_rng(9)
    x = rng.integers(-127, 128, (2, 20, 20, 8)).astype(np.int8)
    x[0] = np.abs(x[0])  # the first image's rows take the unsigned path, the second's the bounded one
    k = rng.integers(-127, 128, (3, 3, 8, 40)).astype(np.int8)
    kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    want = np.asarray(jax.lax.conv_general_dilated(x.astype(np.int32), k.astype(np.int32), **kwargs))
    got = jax.jit(lambda a, q: int8_conv(a, q, **kwargs, bounded=True))(x, k)
    np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match="the weight has 72 inputs, the window 3x3 over 4 channels needs 36"):
        native.int8_conv2d(x[..., :4], native.pack_int8(k.reshape(72, 40)), (3, 3))


@needs_native
@pytest.mark.parametrize("kernel", [*KERNELS, "xla"])
def test_int8_conv_rescale_is_the_float_of_the_sums(kernel):
    """``rescale=(x_scale, w_scale)``: the native kernel's fused epilogue and the XLA path agree with
    ``sums * x_scale[b] * w_scale[f]`` computed from the exact int32 sums."""
    from jaxopt_serve.quant.intconv import int8_conv

    rng = np.random.default_rng(11)
    x = rng.integers(-127, 128, (3, 9, 9, 5)).astype(np.int8)
    k = rng.integers(-127, 128, (3, 3, 5, 20)).astype(np.int8)
    sx, sw = rng.uniform(0.01, 0.1, 3).astype(np.float32), rng.uniform(0.01, 0.1, 20).astype(np.float32)
    kwargs = dict(window_strides=(2, 2), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NCHW"))
    sums = np.asarray(jax.lax.conv_general_dilated(x.astype(np.int32), k.astype(np.int32), **kwargs))
    want = sums.astype(np.float32) * sx[:, None, None, None] * sw[None, :, None, None]
    with native.use_kernel(kernel):
        got = jax.jit(lambda a, q: int8_conv(a, q, **kwargs, bounded=True, rescale=(sx, sw)))(x, k)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


# ------------------------------------------------------------------------------------------ attention


@needs_native
@pytest.mark.parametrize("b,t,h,d", [(1, 1, 1, 1), (2, 13, 3, 20), (3, 40, 2, 40), (2, 33, 1, 5)])
def test_attention_equals_the_xla_formulation_on_every_kernel(b, t, h, d):
    """Ragged lengths and head sizes (not multiples of any vector width), partly and fully masked key rows."""
    rng = np.random.default_rng(t * 100 + d)
    q, k, v = (rng.normal(size=(b, t, h, d)).astype(np.float32) * 2 for _ in range(3))
    mask = rng.random((b, t)) < 0.7
    mask[0] = False  # no key kept: every query gets the mean of all values, as softmax over equal logits gives
    want = np.asarray(native.attention_reference(q, k, v, mask))
    for kernel in KERNELS:
        with native.use_kernel(kernel):
            got = np.asarray(jax.jit(lambda q, k, v, m: native.attention(q, k, v, m))(q, k, v, mask))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5, err_msg=f"{kernel} b={b} t={t} h={h} d={d}")
    np.testing.assert_allclose(want[0], np.broadcast_to(v[0].mean(0), want[0].shape), rtol=1e-5, atol=1e-6)


@needs_native
def test_attention_gradient_is_the_reference_gradient_and_the_fallback_is_the_reference():
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(2, 9, 2, 8)).astype(np.float32) for _ in range(3))
    mask = np.ones((2, 9), bool)
    mask[1, 5:] = False
    loss = lambda fn: lambda q, k, v: (fn(q, k, v, mask, scale=0.3) ** 2).sum()  # noqa: E731
    got = jax.grad(loss(native.attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(native.attention_reference), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    with native.use_kernel("xla"):
        np.testing.assert_array_equal(
            jax.jit(lambda *a: native.attention(*a, mask))(q, k, v),
            jax.jit(lambda *a: native.attention_reference(*a, mask))(q, k, v),
        )
    with pytest.raises(ValueError, match=r"mask must be \(batch, length\) = \(2, 9\)"):
        native.attention(q, k, v, mask[:, :4])
    with pytest.raises(ValueError, match="share one"):
        native.attention(q, k[:, :3], v)
