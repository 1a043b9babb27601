import jax
import numpy as np
import pytest

from jaxopt_serve.artifact import ArtifactError, load_artifact, save_artifact
from jaxopt_serve.models import MLPConfig, init_variables, predict_fn
from jaxopt_serve.quant import QuantRule, QuantSpec, check_qvariables, quantize, quantized_artifact
from jaxopt_serve.quant.runtime import ASYM_COLLECTION, SMOOTH_COLLECTION, mark_asymmetric, quantized_predict_fn
from jaxopt_serve.quant.smooth import search_alpha, smooth_quantize

CONFIG = MLPConfig(features=(64,), num_classes=8, input_shape=(32,))
RULES = [QuantRule(r"params/.*/kernel", QuantSpec(qtype="int8"))]


@pytest.fixture(scope="module")
def outlier_case():
    variables = jax.tree.map(np.asarray, init_variables(CONFIG, 0))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 32)).astype(np.float32)
    x[:, 3] *= 60.0  # one outlier channel, as BERT activations have
    return variables, x


def _error(out, ref):
    return float(np.abs(np.asarray(out) - np.asarray(ref)).mean())


def test_smoothing_cuts_w8a8_error_on_an_outlier_channel(outlier_case):
    variables, x = outlier_case
    ref = predict_fn(CONFIG)(variables, x)
    plain = quantize(variables, RULES).variables
    smooth = smooth_quantize(CONFIG, variables, x[:64], RULES, alpha=0.5)
    assert set(smooth[SMOOTH_COLLECTION]) == {"dense_0", "classifier"}
    dynamic = jax.jit(quantized_predict_fn(CONFIG, mode="dynamic"))
    assert _error(dynamic(smooth, x), ref) < 0.5 * _error(dynamic(plain, x), ref)


def test_weight_only_with_smoothing_stays_the_float_function(outlier_case):
    """(x / s)(s W) = x W: smoothing changes only what is quantized, not the function."""
    variables, x = outlier_case
    smooth = smooth_quantize(CONFIG, variables, x[:64], RULES, alpha=0.5)
    ref = predict_fn(CONFIG)(variables, x)
    plain = quantize(variables, RULES).variables
    wo = jax.jit(quantized_predict_fn(CONFIG, mode="weight_only"))
    assert _error(wo(smooth, x), ref) <= 2 * _error(wo(plain, x), ref) + 1e-3


def test_smoothed_artifacts_round_trip(tmp_path, outlier_case):
    variables, x = outlier_case
    smooth = smooth_quantize(CONFIG, variables, x[:64], RULES)
    path = tmp_path / "smooth.jxs"
    save_artifact(path, quantized_artifact(CONFIG, smooth, (32,)))
    loaded = load_artifact(path).variables
    np.testing.assert_array_equal(loaded[SMOOTH_COLLECTION]["dense_0"], smooth[SMOOTH_COLLECTION]["dense_0"])
    dynamic = jax.jit(quantized_predict_fn(CONFIG, mode="dynamic"))
    np.testing.assert_allclose(dynamic(loaded, x), dynamic(smooth, x), rtol=1e-6, atol=1e-6)


def test_alpha_outside_unit_interval_is_an_error(outlier_case):
    variables, x = outlier_case
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        smooth_quantize(CONFIG, variables, x, RULES, alpha=1.5)


def test_alpha_search_is_no_worse_than_any_fixed_alpha_on_the_calibration_batch(outlier_case):
    variables, x = outlier_case
    ref = predict_fn(CONFIG)(variables, x[:64])
    dynamic = jax.jit(quantized_predict_fn(CONFIG, mode="dynamic"))
    searched = _error(dynamic(smooth_quantize(CONFIG, variables, x[:64], RULES, alpha=[0.2, 0.5, 0.8]), x[:64]), ref)
    fixed = [
        _error(dynamic(smooth_quantize(CONFIG, variables, x[:64], RULES, alpha=a), x[:64]), ref) for a in (0.2, 0.8)
    ]
    assert searched <= 1.05 * min(fixed)


def test_search_alpha_reports_every_candidate_and_picks_the_least_error():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(128, 16)).astype(np.float32)
    x[:, 0] *= 80.0
    best, errors = search_alpha(x, rng.normal(size=(16, 4)).astype(np.float32), QuantSpec(), [0.0, 0.3, 0.6, 0.9])
    assert len(errors) == 4 and best == [0.0, 0.3, 0.6, 0.9][int(np.argmin(errors))]
    assert errors[0] > min(errors)  # no smoothing is not the best with an outlier channel


def test_asymmetric_marks_cut_error_on_one_signed_inputs_and_round_trip(tmp_path, outlier_case):
    variables, _ = outlier_case
    x = np.maximum(np.random.default_rng(2).normal(size=(128, 32)), 0).astype(np.float32)  # ReLU-like input
    ref = predict_fn(CONFIG)(variables, x)
    dynamic = jax.jit(quantized_predict_fn(CONFIG, mode="dynamic"))
    sym = smooth_quantize(CONFIG, variables, x, RULES, alpha=0.5)
    asym = smooth_quantize(CONFIG, variables, x, RULES, alpha=0.5, asymmetric=".*")
    assert set(asym[ASYM_COLLECTION]) == {"dense_0", "classifier"}
    assert _error(dynamic(asym, x), ref) < 0.8 * _error(dynamic(sym, x), ref)
    path = tmp_path / "asym.jxs"
    save_artifact(path, quantized_artifact(CONFIG, asym, (32,)))
    loaded = load_artifact(path).variables
    assert set(loaded[ASYM_COLLECTION]) == {"dense_0", "classifier"}
    np.testing.assert_allclose(dynamic(loaded, x), dynamic(asym, x), rtol=1e-6, atol=1e-6)


def test_bad_asymmetric_marks_are_named(outlier_case):
    variables, x = outlier_case
    with pytest.raises(ValueError, match="matches no quantized kernel"):
        smooth_quantize(CONFIG, variables, x[:8], RULES, asymmetric="nonexistent_layer")
    q = quantize(variables, RULES).variables
    with pytest.raises(ArtifactError, match="quant_asym/dense_9"):
        check_qvariables(CONFIG, {**q, ASYM_COLLECTION: {"dense_9": np.bool_(True)}}, (32,))
    with pytest.raises(ArtifactError, match="boolean True"):
        check_qvariables(CONFIG, mark_asymmetric(q, "dense_0") | {ASYM_COLLECTION: {"dense_0": np.float32(1)}}, (32,))


def test_nnx_smoothquant_matches_linen_on_the_same_weights(outlier_case):
    """NNX and Linen run SmoothQuant through the same traced-program rewrite, so the same weights give the same
    quality (it was once off by orders of magnitude in NNX, where the smoothing division was skipped)."""
    from jaxopt_serve.models import NNXMLPConfig

    variables, x = outlier_case
    nnx_config = NNXMLPConfig(features=CONFIG.features, num_classes=CONFIG.num_classes, input_shape=CONFIG.input_shape)
    ref = predict_fn(CONFIG)(variables, x)
    errors = {}
    for config in (CONFIG, nnx_config):
        np.testing.assert_allclose(predict_fn(config)(variables, x), ref, rtol=1e-5, atol=1e-5)  # the same function
        smooth = smooth_quantize(config, variables, x[:64], RULES, alpha=0.5)
        assert set(smooth[SMOOTH_COLLECTION]) == {"dense_0", "classifier"}
        errors[config.name] = _error(jax.jit(quantized_predict_fn(config, mode="dynamic"))(smooth, x), ref)
    plain = _error(jax.jit(quantized_predict_fn(CONFIG, mode="dynamic"))(quantize(variables, RULES).variables, x), ref)
    assert errors["nnx_mlp"] < 0.5 * plain
    assert abs(errors["nnx_mlp"] - errors[CONFIG.name]) <= 1e-3 * errors[CONFIG.name]


def test_gptq_rounding_of_smoothed_kernels_cuts_the_w8a8_error(outlier_case):
    """GPTQ on the smoothed kernels, with the Hessian of the smoothed inputs: same storage, less error."""
    variables, _ = outlier_case
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(512, 32)) @ (rng.normal(size=(32, 32)) * np.linspace(3.0, 0.1, 32)[:, None])).astype(
        np.float32
    )
    x[:, 3] *= 20.0
    ref = predict_fn(CONFIG)(variables, x[256:])
    dynamic = jax.jit(quantized_predict_fn(CONFIG, mode="dynamic"))
    nearest = smooth_quantize(CONFIG, variables, x[:256], RULES, alpha=0.5, asymmetric="classifier")
    gptq = smooth_quantize(CONFIG, variables, x[:256], RULES, alpha=0.5, asymmetric="classifier", rounding="gptq")
    assert _error(dynamic(gptq, x[256:]), ref) < 0.9 * _error(dynamic(nearest, x[256:]), ref)
    for layer in ("dense_0", "classifier"):
        np.testing.assert_array_equal(gptq[SMOOTH_COLLECTION][layer], nearest[SMOOTH_COLLECTION][layer])
        a, b = nearest["params"][layer]["kernel"], gptq["params"][layer]["kernel"]
        np.testing.assert_array_equal(b.scale, a.scale)  # per-channel ranges are round-to-nearest's
        assert not np.array_equal(b.values, a.values)
    assert set(gptq[ASYM_COLLECTION]) == {"classifier"}
    with pytest.raises(ValueError, match="rounding must be 'nearest' or 'gptq', got 'stochastic'"):
        smooth_quantize(CONFIG, variables, x[:8], RULES, rounding="stochastic")


def test_row_sample_is_uniform_over_every_batch():
    """The alpha search's rows: batches sorted by length must not leave it the first (shortest) ones only."""
    from jaxopt_serve.quant.smooth import RowSample

    sample = RowSample(1000)
    for batch in range(20):
        sample.add(np.full((500, 2), batch, np.float32))
    counts = np.bincount(sample.rows()[:, 0].astype(int), minlength=20)
    assert sample.seen == 10_000 and counts.sum() == 1000 and counts.min() >= 20, counts
    small = RowSample(8)
    small.add(np.arange(5, dtype=np.float32)[:, None])
    np.testing.assert_array_equal(small.rows()[:, 0], np.arange(5))  # under the cap: every row, in order
