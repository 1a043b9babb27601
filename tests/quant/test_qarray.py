"""Tests of jaxopt_serve.quant.qarray: QuantSpec, QArray, quantize_array, pack/unpack, fake_quantize."""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from jaxopt_serve.quant import BITS, QArray, QuantSpec, fake_quantize, pack, quantize_array, unpack
from jaxopt_serve.quant.qarray import _grouped_shape, resolve_axis

# Small settings. database=None keeps hypothesis from writing a .hypothesis/
# folder into the repository.
FAST = settings(max_examples=25, deadline=None, database=None)

# A few fixed shapes, each with a few group sizes along its default group axis
# (the largest axis but the last), keep the number of XLA compilations low:
# compiling is what costs time here, not running.
GROUP_SIZES = {(12,): (3,), (8, 6): (2, 8), (16, 4): (16,), (2, 12, 3): (6,)}
SHAPES = list(GROUP_SIZES)
QRANGE = {"int4": (-8, 7), "ternary": (-1, 1), "binary": (-1, 1)}
# Float32 rounding in x / scale and in (q - zero_point) * scale, in units of one step
# (at most ~255 steps from zero): far below any real off-by-one-step error.
STEP_SLACK = 1e-4


def _finite_floats(max_value=100.0):
    return st.floats(-max_value, max_value, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def float_arrays(draw, shapes=SHAPES, max_value=100.0):
    shape = draw(st.sampled_from(shapes))
    x = draw(hnp.arrays(np.float32, shape, elements=_finite_floats(max_value)))
    # Keep magnitudes where float32 scales stay normal numbers: XLA flushes
    # subnormals to zero, so a group whose absmax is below ~127 * 1.2e-38 gets a
    # zero scale and dequantizes to zero (an error of ~1e-36, below the half-step
    # bound these tests assert). Then spread the magnitudes over several orders,
    # as real weights have.
    x = np.where(np.abs(x) < 1e-6, np.float32(0), x)
    return x * np.float32(10.0 ** draw(st.integers(-3, 1)))


def _per_element_scale(q: QArray) -> np.ndarray:
    """``q.scale`` broadcast to the original shape (through the grouped view for groups)."""
    scale = np.asarray(q.scale)
    if q.granularity == "group":
        grouped = _grouped_shape(q.shape, q.axis, q.group_size)
        return np.broadcast_to(scale, grouped).reshape(q.shape)
    return np.broadcast_to(scale, q.shape)


def _spec_for(draw, qtype, granularity, shape, **kwargs):
    if granularity == "group":
        kwargs["group_size"] = draw(st.sampled_from(GROUP_SIZES[shape]))
    return QuantSpec(qtype=qtype, granularity=granularity, **kwargs)


@functools.cache
def _quantize_fn(spec):
    """``x -> (QArray, dequantized, int values)`` for ``spec``, jitted once per spec (and shape).

    Property tests go through this: one compilation per (spec, shape) instead of
    one per eager op. ``test_qarray_is_a_pytree_and_jit_matches_eager`` checks
    jit and eager agree.
    """

    def run(x):
        q = quantize_array(x, spec)
        return q, q.dequantize(), q.int_values()

    return jax.jit(run)


def _quantize(x, spec):
    if spec.calibration == "mse":
        # The mse search unrolls ~36 candidate clips into one large program that is
        # slow to compile; eagerly, every candidate reuses the same cached ops.
        q = quantize_array(x, spec)
        deq, ints = q.dequantize(), q.int_values()
    else:
        q, deq, ints = _quantize_fn(spec)(x)
    return q, np.asarray(deq), np.asarray(ints)


@functools.cache
def _fake_quantize_value_and_grad(spec):
    return jax.jit(jax.value_and_grad(lambda w, c: jnp.sum(fake_quantize(w, spec) * c), argnums=0))


def _q(x, spec) -> QArray:
    return _quantize(x, spec)[0]


# Jitted once per QArray treedef and shapes (the metadata is static).
_deq = jax.jit(lambda q: q.dequantize())
_ints = jax.jit(lambda q: q.int_values())


def _mse(x, q: QArray) -> float:
    return float(np.mean((np.asarray(_deq(q), np.float64) - np.asarray(x, np.float64)) ** 2))


# --------------------------------------------------------------------------- QuantSpec


def test_spec_defaults_and_bits():
    spec = QuantSpec()
    assert (spec.qtype, spec.granularity, spec.axis, spec.group_size, spec.symmetric, spec.calibration) == (
        "int8",
        "channel",
        None,
        None,
        True,
        "absmax",
    )
    assert [QuantSpec(qtype=t).bits for t in ("int8", "int4", "ternary", "binary")] == [8, 4, 2, 1]
    assert BITS == {"int8": 8, "int4": 4, "ternary": 2, "binary": 1}


def test_spec_rejects_unsupported_qtype_and_names_it():
    with pytest.raises(ValueError, match=r"unsupported qtype 'int3'.*\['binary', 'int4', 'int8', 'ternary'\]"):
        QuantSpec(qtype="int3")


def test_spec_rejects_group_size_with_non_group_granularity():
    for granularity in ("channel", "tensor"):
        with pytest.raises(ValueError, match=f"group_size is only used with granularity='group'.*{granularity!r}"):
            QuantSpec(granularity=granularity, group_size=32)


@pytest.mark.parametrize("group_size", [None, 0, -4, 2.0])
def test_spec_group_needs_positive_int_group_size(group_size):
    with pytest.raises(ValueError, match=re.escape(f"needs a positive int group_size, got {group_size!r}")):
        QuantSpec(granularity="group", group_size=group_size)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(granularity="row"), "granularity must be 'tensor', 'channel' or 'group', got 'row'"),
        (dict(calibration="kl"), "calibration must be 'absmax', 'percentile' or 'mse', got 'kl'"),
        (dict(percentile=50.0), "percentile must be in (50, 100], got 50.0"),
        (dict(percentile=100.5), "percentile must be in (50, 100], got 100.5"),
        (dict(qtype="ternary", symmetric=False), "ternary quantization is symmetric only"),
        (dict(qtype="binary", symmetric=False), "binary quantization is symmetric only"),
    ],
)
def test_spec_rejects_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        QuantSpec(**kwargs)


def test_spec_is_frozen_and_keyword_only():
    spec = QuantSpec(qtype="int4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.qtype = "int8"
    with pytest.raises(TypeError):
        QuantSpec("int4")


# --------------------------------------------------------------------------- resolve_axis


def test_resolve_axis_defaults():
    assert resolve_axis((3, 4), QuantSpec(granularity="tensor")) is None
    assert resolve_axis((3, 4, 5), QuantSpec()) == 2  # channel: last axis
    assert resolve_axis((3, 4), QuantSpec(axis=-2)) == 0  # negative axes made concrete
    # group: the largest axis other than the last (the contraction axis); 1-D: axis 0.
    assert resolve_axis((3, 3, 64, 8), QuantSpec(granularity="group", group_size=8)) == 2
    assert resolve_axis((256, 64), QuantSpec(granularity="group", group_size=64)) == 0
    assert resolve_axis((12,), QuantSpec(granularity="group", group_size=4)) == 0
    assert resolve_axis((6, 8), QuantSpec(granularity="group", group_size=4, axis=-1)) == 1


def test_group_size_that_does_not_divide_names_path_and_shape():
    x = jnp.ones((6, 4))
    spec = QuantSpec(granularity="group", group_size=4)
    with pytest.raises(
        ValueError, match=re.escape("params/dense_0/kernel: group_size 4 does not divide axis 0 of shape (6, 4)")
    ):
        quantize_array(x, spec, name="params/dense_0/kernel")


def test_axis_out_of_range_and_scalar_channel_are_errors():
    with pytest.raises(ValueError, match=re.escape("w: axis 2 is out of range for shape (3, 4)")):
        quantize_array(jnp.ones((3, 4)), QuantSpec(axis=2), name="w")
    with pytest.raises(ValueError, match="w: a scalar cannot be quantized per channel"):
        quantize_array(jnp.float32(1.0), QuantSpec(), name="w")
    q = _q(jnp.float32(-0.5), QuantSpec(granularity="tensor"))  # scalars work per tensor
    assert q.shape == () and float(_deq(q)) == pytest.approx(-0.5, abs=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected_with_the_name(bad):
    x = np.ones((4, 4), np.float32)
    x[1, 2] = bad
    with pytest.raises(
        ValueError, match=re.escape("params/dense_1/kernel: cannot quantize an array holding NaN or inf (shape (4, 4))")
    ):
        quantize_array(x, QuantSpec(), name="params/dense_1/kernel")


def test_integer_arrays_are_rejected_with_the_name():
    with pytest.raises(ValueError, match="step: only float arrays can be quantized, got dtype int32"):
        quantize_array(jnp.arange(8, dtype=jnp.int32), QuantSpec(granularity="tensor"), name="step")


# --------------------------------------------------------------------------- round-to-nearest error bounds


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("qtype", ["int8", "int4"])
@FAST
@given(data=st.data())
def test_symmetric_absmax_error_is_at_most_half_a_step(qtype, granularity, data):
    x = data.draw(float_arrays())
    spec = _spec_for(data.draw, qtype, granularity, x.shape)
    q, deq, ints = _quantize(x, spec)
    scale = _per_element_scale(q)
    assert deq.shape == x.shape and deq.dtype == np.float32
    assert q.zero_point is None
    np.testing.assert_array_less(np.abs(deq - x), scale * (0.5 + STEP_SLACK))
    # Symmetric: the levels are -qmax..qmax (qmin = -qmax - 1 is never used).
    qmax = 2 ** (BITS[qtype] - 1) - 1
    assert ints.dtype == np.int8 and ints.shape == x.shape
    assert ints.min() >= -qmax and ints.max() <= qmax
    # absmax: the largest magnitude of each group lands exactly on +-qmax (unless the group is all zero).
    assert np.abs(ints).max() == (qmax if np.abs(x).max() > 0 else 0)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_scale_shapes_keep_the_rank(granularity):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)), jnp.float32)
    spec = QuantSpec(granularity=granularity, group_size=4 if granularity == "group" else None)
    q = _q(x, spec)
    expected = {"tensor": (1, 1), "channel": (1, 6), "group": (2, 1, 6)}[granularity]
    assert q.scale.shape == expected and q.scale.dtype == jnp.float32
    assert q.values.shape == (8, 6) and q.values.dtype == jnp.int8


def test_channel_scale_is_per_output_channel_absmax():
    x = np.array([[1.0, -0.01, 4.0], [-2.54, 0.02, 0.0]], np.float32)
    q = _q(x, QuantSpec())
    np.testing.assert_allclose(np.asarray(q.scale), [[2.54 / 127, 0.02 / 127, 4.0 / 127]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(_ints(q))[1], [-127, 127, 0])
    # A tiny channel keeps its own resolution instead of rounding to zero under a shared scale.
    assert abs(float(_deq(q)[0, 1]) + 0.01) < 1e-4


def test_explicit_channel_axis_and_group_axis():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 6)), jnp.float32)
    q = _q(x, QuantSpec(axis=0))
    assert q.axis == 0 and q.scale.shape == (8, 1)
    g = _q(x, QuantSpec(granularity="group", group_size=3, axis=1))
    assert g.axis == 1 and g.scale.shape == (8, 2, 1)
    for qa in (q, g):
        np.testing.assert_array_less(np.abs(np.asarray(_deq(qa)) - x), _per_element_scale(qa) * (0.5 + STEP_SLACK))


def test_all_zero_channel_quantizes_to_zero():
    x = np.zeros((4, 3), np.float32)
    x[:, 0] = [1.0, -2.0, 0.5, 0.0]
    q = _q(x, QuantSpec(qtype="int4"))
    deq = np.asarray(_deq(q))
    assert np.all(np.isfinite(np.asarray(q.scale)))
    np.testing.assert_array_equal(deq[:, 1:], 0.0)


@pytest.mark.parametrize("qtype", ["int8", "int4"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@FAST
@given(data=st.data())
def test_asymmetric_error_is_at_most_half_a_step_and_zero_is_exact(qtype, granularity, data):
    x = data.draw(float_arrays())
    x = x + np.float32(data.draw(st.sampled_from([0.0, 1.0, -3.0])) * np.abs(x).max())  # often one-signed
    zero_at = data.draw(st.integers(0, x.size - 1))
    x.reshape(-1)[zero_at] = 0.0
    spec = _spec_for(data.draw, qtype, granularity, x.shape, symmetric=False)
    q, deq, ints = _quantize(x, spec)
    assert q.zero_point is not None
    assert q.zero_point.shape == q.scale.shape and q.zero_point.dtype == jnp.int8
    qmin, qmax = -(2 ** (BITS[qtype] - 1)), 2 ** (BITS[qtype] - 1) - 1
    zp = np.asarray(q.zero_point)
    assert zp.min() >= qmin and zp.max() <= qmax
    assert ints.min() >= qmin and ints.max() <= qmax
    scale = _per_element_scale(q)
    np.testing.assert_array_less(np.abs(deq - x), scale * (0.5 + STEP_SLACK))
    assert abs(deq.reshape(-1)[zero_at]) <= 1e-6 * scale.reshape(-1)[zero_at]


def test_asymmetric_uses_the_full_range_of_a_one_signed_tensor():
    x = np.linspace(0.0, 2.55, 256, dtype=np.float32).reshape(16, 16)
    sym = _q(x, QuantSpec(granularity="tensor"))
    asym = _q(x, QuantSpec(granularity="tensor", symmetric=False))
    # Symmetric wastes the negative half: its step is about twice as large.
    assert float(asym.scale.max()) == pytest.approx(2.55 / 255, rel=1e-5)
    assert float(sym.scale.max()) == pytest.approx(2.55 / 127, rel=1e-5)
    assert int(asym.zero_point.max()) == -128
    assert _mse(x, asym) < _mse(x, sym)


# --------------------------------------------------------------------------- pack / unpack


@functools.cache
def _pack_round_trip_fn(qtype):
    def run(values):
        packed = pack(values, qtype)
        return packed, unpack(packed, qtype, values.shape[0])

    return jax.jit(run)


# Every remainder modulo 2, 4 and 8 values per byte, and more than one byte.
PACK_LENGTHS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 17, 26, 33]


@pytest.mark.parametrize("qtype", ["int4", "ternary", "binary"])
@settings(max_examples=40, deadline=None, database=None)
@given(data=st.data())
def test_pack_unpack_round_trip(qtype, data):
    lo, hi = QRANGE[qtype]
    n = data.draw(st.sampled_from(PACK_LENGTHS))
    elements = st.sampled_from([-1, 1]) if qtype == "binary" else st.integers(lo, hi)
    values = np.asarray(data.draw(st.lists(elements, min_size=n, max_size=n)), np.int8)
    packed, out = _pack_round_trip_fn(qtype)(jnp.asarray(values))
    assert packed.dtype == jnp.uint8
    assert packed.shape == (math.ceil(n * BITS[qtype] / 8),)
    assert out.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(out), values)


@pytest.mark.parametrize("qtype, n", [("int4", 7), ("ternary", 5), ("binary", 13), ("int4", 1), ("binary", 8)])
def test_pack_unpack_edges_of_the_range(qtype, n):
    lo, hi = QRANGE[qtype]
    values = np.resize(np.array([lo, hi], np.int8), n)
    packed, out = _pack_round_trip_fn(qtype)(jnp.asarray(values))
    assert packed.shape == (math.ceil(n * BITS[qtype] / 8),)
    np.testing.assert_array_equal(np.asarray(out), values)


def test_pack_layout_is_lowest_bits_first():
    def packed(values, qtype):
        return np.asarray(_pack_round_trip_fn(qtype)(jnp.array(values, jnp.int8))[0]).tolist()

    # int4 adds 8: [-8, 7] -> [0, 15] -> byte 0 | 15 << 4 = 240.
    assert packed([-8, 7], "int4") == [240]
    # ternary adds 1: [1, 0, -1, 1] -> [2, 1, 0, 2] -> 2 | 1<<2 | 0<<4 | 2<<6 = 134.
    assert packed([1, 0, -1, 1], "ternary") == [134]
    # binary: -1 -> 0, 1 -> 1; [1, -1, 1, 1, -1, -1, -1, 1] -> 1 + 4 + 8 + 128 = 141.
    assert packed([1, -1, 1, 1, -1, -1, -1, 1], "binary") == [141]


# --------------------------------------------------------------------------- sizes


def _kernel(shape=(256, 256), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * 0.05, jnp.float32)


def test_int8_per_channel_size():
    w = _kernel()
    q = _q(w, QuantSpec(qtype="int8"))
    assert q.values.dtype == jnp.int8 and q.values.shape == (256, 256)
    assert q.nbytes == 256 * 256 + 256 * 4
    assert w.nbytes / q.nbytes >= 3.9


def test_int4_per_group_size_counts_scales():
    w = _kernel()
    q = _q(w, QuantSpec(qtype="int4", granularity="group", group_size=64))
    assert q.values.dtype == jnp.uint8 and q.values.shape == (256 * 256 // 2,)
    assert q.scale.shape == (4, 1, 256)
    assert q.nbytes == 256 * 256 // 2 + 4 * 256 * 4
    # 4 bits per value plus one float32 scale per 64 values = 4.5 bits: 32 / 4.5 = 7.11x.
    assert w.nbytes / q.nbytes >= 7.1
    # Larger groups amortize the scales further: 4.25 bits, 7.53x.
    q128 = _q(w, QuantSpec(qtype="int4", granularity="group", group_size=128))
    assert w.nbytes / q128.nbytes >= 7.5


@pytest.mark.parametrize("qtype", ["int4", "ternary", "binary"])
@pytest.mark.parametrize("shape", [(256, 256), (7, 5), (3, 3, 1, 5)])
def test_packed_sizes(qtype, shape):
    w = _kernel(shape)
    q = _q(w, QuantSpec(qtype=qtype))
    n = math.prod(shape)
    assert q.values.dtype == jnp.uint8
    assert q.values.nbytes == math.ceil(n * BITS[qtype] / 8)
    assert q.nbytes == q.values.nbytes + shape[-1] * 4
    assert q.size == n and q.ndim == len(shape) and q.bits == BITS[qtype]


def test_repr_summarizes_metadata():
    q = _q(_kernel((8, 4)), QuantSpec(qtype="int4", granularity="group", group_size=4, symmetric=False))
    assert repr(q) == f"QArray(int4, shape=(8, 4), group, axis=0, group_size=4, asymmetric, {q.nbytes} bytes)"
    assert repr(_q(_kernel((8, 4)), QuantSpec(granularity="tensor"))) == "QArray(int8, shape=(8, 4), tensor, 36 bytes)"


# --------------------------------------------------------------------------- ternary / binary


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("qtype", ["ternary", "binary"])
@settings(max_examples=25, deadline=None, database=None)
@given(data=st.data())
def test_low_bit_values_and_error(qtype, granularity, data):
    x = data.draw(float_arrays())
    assume(np.abs(x).max() > 1e-2)
    spec = _spec_for(data.draw, qtype, granularity, x.shape)
    q, deq, ints = _quantize(x, spec)
    assert ints.shape == x.shape and ints.dtype == np.int8
    allowed = {-1, 0, 1} if qtype == "ternary" else {-1, 1}
    assert set(np.unique(ints).tolist()) <= allowed
    scale = _per_element_scale(q)
    if qtype == "binary":
        np.testing.assert_array_equal(ints, np.where(x >= 0, 1, -1))
        # scale: the mean magnitude of the group, so an all-zero group has scale 0 and dequantizes to 0.
        assert np.all(scale >= 0)
        np.testing.assert_array_equal(deq[scale == 0], 0.0)
    else:
        assert np.all(scale > 0)
    err = np.sum((deq.astype(np.float64) - x.astype(np.float64)) ** 2)
    assert err < np.sum(x.astype(np.float64) ** 2)  # better than approximating by all zeros


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_binary_all_zero_group_dequantizes_to_zero(granularity):
    x = np.zeros((4, 3), np.float32)
    x[:, 0] = [1.0, -2.0, 0.5, 0.25]
    if granularity == "tensor":
        x[:] = 0.0
    q = _q(x, QuantSpec(qtype="binary", granularity=granularity))
    np.testing.assert_array_equal(np.asarray(_deq(q))[:, 1:], 0.0)


def test_ternary_all_zero_group_dequantizes_to_zero():
    x = np.zeros((4, 3), np.float32)
    x[:, 0] = [1.0, -2.0, 0.5, 0.25]
    q = _q(x, QuantSpec(qtype="ternary"))
    np.testing.assert_array_equal(np.asarray(_deq(q))[:, 1:], 0.0)
    assert _mse(x, q) < float(np.mean(x.astype(np.float64) ** 2))


def test_ternary_keeps_large_values_and_zeroes_small_ones():
    x = np.array([[0.9, -0.05], [-1.1, 0.4], [0.02, -0.7]], np.float32)
    q = _q(x, QuantSpec(qtype="ternary", granularity="tensor"))
    np.testing.assert_array_equal(np.asarray(_ints(q)), [[1, 0], [-1, 1], [0, -1]])
    # scale: the mean magnitude of the kept values.
    assert float(q.scale.reshape(())) == pytest.approx((0.9 + 1.1 + 0.4 + 0.7) / 4, rel=1e-6)


def test_binary_scale_is_the_mean_magnitude():
    x = np.array([[0.5, -1.0], [-0.25, 2.0]], np.float32)
    q = _q(x, QuantSpec(qtype="binary"))
    np.testing.assert_allclose(np.asarray(q.scale), [[0.375, 1.5]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(_deq(q)), [[0.375, -1.5], [-0.375, 1.5]], rtol=1e-6)


def test_ternary_mse_calibration_is_no_worse_than_the_fixed_threshold():
    x = np.random.default_rng(3).standard_t(df=3, size=(64, 16)).astype(np.float32)
    fixed = _q(x, QuantSpec(qtype="ternary"))
    tuned = _q(x, QuantSpec(qtype="ternary", calibration="mse"))
    assert set(np.unique(np.asarray(_ints(tuned))).tolist()) <= {-1, 0, 1}
    assert _mse(x, tuned) <= _mse(x, fixed) * (1 + 1e-6)


# --------------------------------------------------------------------------- calibration


def _heavy_tailed(shape=(128, 64), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, size=4, replace=False)] = np.array([40.0, -35.0, 50.0, -45.0], np.float32)
    return x


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_and_mse_clipping_beat_absmax_on_heavy_tails(symmetric):
    x = _heavy_tailed()
    mse = {}
    for calibration in ("absmax", "percentile", "mse"):
        spec = QuantSpec(qtype="int4", granularity="tensor", calibration=calibration, symmetric=symmetric)
        mse[calibration] = _mse(x, _q(x, spec))
    assert mse["mse"] <= mse["absmax"]
    assert mse["mse"] < 0.8 * mse["absmax"]
    assert mse["percentile"] < 0.8 * mse["absmax"]


def test_percentile_clip_is_the_percentile_of_magnitudes():
    x = _heavy_tailed()
    q = _q(x, QuantSpec(qtype="int4", granularity="tensor", calibration="percentile", percentile=99.0))
    clip = np.percentile(np.abs(x), 99.0)
    assert float(q.scale.reshape(())) == pytest.approx(clip / 7, rel=1e-4)
    # The outliers are clipped to the largest level, not wrapped around.
    assert np.asarray(_ints(q)).max() == 7 and np.asarray(_ints(q)).min() == -7
    # percentile=100 is (up to jnp.percentile's float32 interpolation) the absmax.
    full = _q(x, QuantSpec(qtype="int4", granularity="tensor", calibration="percentile", percentile=100.0))
    absmax = _q(x, QuantSpec(qtype="int4", granularity="tensor"))
    np.testing.assert_allclose(np.asarray(full.scale), np.asarray(absmax.scale), rtol=1e-3)


def test_percentile_100_equals_absmax_exactly():
    x = np.arange(100, dtype=np.float32).reshape(100, 1)
    full = quantize_array(x, QuantSpec(granularity="tensor", calibration="percentile", percentile=100.0))
    absmax = quantize_array(x, QuantSpec(granularity="tensor"))
    np.testing.assert_array_equal(np.asarray(full.scale), np.asarray(absmax.scale))


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@settings(max_examples=25, deadline=None, database=None)
@given(data=st.data())
def test_mse_calibration_is_never_worse_than_absmax(granularity, data):
    # One shape and group size: the mse search runs eagerly, and every new shape recompiles its ops.
    x = data.draw(float_arrays(shapes=[(8, 6)]))
    symmetric = data.draw(st.booleans())
    group_size = 2 if granularity == "group" else None
    spec = QuantSpec(qtype="int4", granularity=granularity, group_size=group_size, symmetric=symmetric)
    tuned, tuned_deq, _ = _quantize(x, dataclasses.replace(spec, calibration="mse"))
    base, base_deq, _ = _quantize(x, spec)

    def mse(deq):
        return float(np.mean((deq.astype(np.float64) - x.astype(np.float64)) ** 2))

    assert mse(tuned_deq) <= mse(base_deq) * (1 + 1e-4) + 1e-30  # float32 ties
    np.testing.assert_array_less(np.asarray(tuned.scale), np.asarray(base.scale) * (1 + 1e-6) + 1e-30)


# --------------------------------------------------------------------------- pytree / jit


@pytest.mark.parametrize(
    "spec, leaves",
    [
        (QuantSpec(qtype="int8"), 2),
        (QuantSpec(qtype="int4", granularity="group", group_size=4), 2),
        (QuantSpec(qtype="ternary", granularity="tensor"), 2),
        (QuantSpec(qtype="int8", granularity="tensor", symmetric=False), 3),
    ],
)
def test_qarray_is_a_pytree_and_jit_matches_eager(spec, leaves):
    x = _kernel((8, 6), seed=2)
    q = quantize_array(x, spec)
    flat, treedef = jax.tree.flatten(q)
    assert len(flat) == leaves == len(jax.tree.leaves(q))
    assert flat[0] is q.values and flat[1] is q.scale
    rebuilt = jax.tree.unflatten(treedef, flat)
    assert isinstance(rebuilt, QArray)
    assert (rebuilt.qtype, rebuilt.shape, rebuilt.dtype, rebuilt.granularity, rebuilt.axis, rebuilt.group_size) == (
        q.qtype,
        q.shape,
        q.dtype,
        q.granularity,
        q.axis,
        q.group_size,
    )

    seen = {}

    def dequantize(qa):
        # Metadata arrives static (plain Python), the arrays as tracers.
        seen.update(qtype=qa.qtype, shape=qa.shape, tracer=isinstance(qa.values, jax.core.Tracer))
        return qa.dequantize()

    jitted = jax.jit(dequantize)(q)
    assert seen == dict(qtype=spec.qtype, shape=(8, 6), tracer=True)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(q.dequantize()))

    # A QArray also comes out of jit (quantizing inside a traced function) with the same contents.
    inner = jax.jit(lambda w: quantize_array(w, spec))(x)
    assert isinstance(inner, QArray) and jax.tree.structure(inner) == treedef
    np.testing.assert_allclose(np.asarray(inner.dequantize()), np.asarray(q.dequantize()), rtol=1e-6, atol=1e-7)


def test_metadata_is_part_of_the_treedef():
    x = _kernel((8, 4), seed=4)
    int8 = _q(x, QuantSpec(qtype="int8"))
    other = _q(2 * x, QuantSpec(qtype="int8"))
    per_tensor = _q(x, QuantSpec(qtype="int8", granularity="tensor"))
    assert jax.tree.structure(int8) == jax.tree.structure(other)
    assert jax.tree.structure(int8) != jax.tree.structure(per_tensor)
    doubled = jax.tree.map(lambda a: a * 2 if a.dtype == jnp.float32 else a, int8)
    assert isinstance(doubled, QArray) and doubled.qtype == "int8"
    np.testing.assert_allclose(np.asarray(_deq(doubled)), 2 * np.asarray(_deq(int8)), rtol=1e-6)


def test_dequantize_dtype():
    x = _kernel((8, 4))
    q = _q(x.astype(jnp.bfloat16), QuantSpec(qtype="int4"))
    assert q.dtype == "bfloat16"
    dtypes = jax.jit(lambda q: [q.dequantize(dtype) for dtype in (None, jnp.float32, np.dtype("float16"), "float32")])(
        q
    )
    assert [d.dtype for d in dtypes] == [jnp.bfloat16, jnp.float32, jnp.float16, jnp.float32]
    np.testing.assert_allclose(np.asarray(dtypes[1]), np.asarray(x), atol=float(q.scale.max()) * 0.51 + 0.01)


# --------------------------------------------------------------------------- fake_quantize


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(qtype="int8", calibration="mse"),
        QuantSpec(qtype="int4", granularity="group", group_size=4),
        QuantSpec(qtype="int4", symmetric=False, calibration="percentile"),
        QuantSpec(qtype="ternary", granularity="tensor"),
        QuantSpec(qtype="binary"),
    ],
)
def test_fake_quantize_forward_matches_and_gradient_is_identity(spec):
    x = _kernel((8, 6), seed=5)
    expected = np.asarray(_deq(_q(x, spec)))
    cotangent = jnp.asarray(np.random.default_rng(6).normal(size=x.shape), jnp.float32)
    if spec.calibration == "mse":  # eagerly (slow to compile; see _quantize)
        out = fake_quantize(x, spec)
        grad = jax.grad(lambda w: jnp.sum(fake_quantize(w, spec) * cotangent))(x)
    else:
        out = jax.jit(fake_quantize, static_argnums=1)(x, spec)
        _, grad = _fake_quantize_value_and_grad(spec)(x, cotangent)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(cotangent))


@settings(max_examples=25, deadline=None, database=None)
@given(x=float_arrays(shapes=[(8, 6)]), qtype=st.sampled_from(["int8", "int4", "ternary", "binary"]))
def test_fake_quantize_property(x, qtype):
    spec = QuantSpec(qtype=qtype)
    _, deq, _ = _quantize(x, spec)
    out = jax.jit(fake_quantize, static_argnums=1)(jnp.asarray(x), spec)
    np.testing.assert_allclose(np.asarray(out), deq, rtol=1e-6, atol=1e-30)
    cotangent = np.linspace(-2, 2, x.size, dtype=np.float32).reshape(x.shape)
    value, grad = _fake_quantize_value_and_grad(spec)(jnp.asarray(x), jnp.asarray(cotangent))
    terms = deq.astype(np.float64) * cotangent
    assert abs(float(value) - terms.sum()) <= 1e-5 * np.abs(terms).sum() + 1e-30  # float32 summation
    np.testing.assert_array_equal(np.asarray(grad), cotangent)


def test_fake_quantize_keeps_the_input_dtype():
    x = _kernel((8, 4)).astype(jnp.bfloat16)
    out = fake_quantize(x, QuantSpec(qtype="int4"))
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape


# --------------------------------------------------------------------------- sharding


def test_sharded_qarray_matches_replicated():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = jax.devices("cpu")
    assert len(devices) == 8
    mesh = Mesh(np.array(devices), ("x",))
    w = _kernel((64, 128), seed=7)
    q = _q(w, QuantSpec(qtype="int8"))
    assert q.scale.shape == (1, 128)

    def place(spec):
        sharding = NamedSharding(mesh, spec)
        return dataclasses.replace(
            q, values=jax.device_put(q.values, sharding), scale=jax.device_put(q.scale, sharding)
        )

    sharded, replicated = place(P(None, "x")), place(P())
    assert sharded.values.sharding.spec == P(None, "x") and sharded.scale.sharding.spec == P(None, "x")
    assert {s.data.shape for s in sharded.values.addressable_shards} == {(64, 16)}
    assert {s.data.shape for s in sharded.scale.addressable_shards} == {(1, 16)}
    assert len(sharded.values.addressable_shards) == 8
    assert replicated.values.sharding.is_fully_replicated

    x = jnp.asarray(np.random.default_rng(8).normal(size=(4, 64)), jnp.float32)
    matmul = jax.jit(lambda x, q: x @ q.dequantize())
    out_sharded, out_replicated = matmul(x, sharded), matmul(x, replicated)
    assert out_sharded.shape == (4, 128)
    np.testing.assert_allclose(np.asarray(out_sharded), np.asarray(out_replicated), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out_sharded), np.asarray(x @ q.dequantize()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out_sharded), np.asarray(x @ w), atol=0.05)
