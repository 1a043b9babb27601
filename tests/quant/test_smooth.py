import jax
import numpy as np
import pytest

from jaxopt_serve.artifact import load_artifact, save_artifact
from jaxopt_serve.models import MLPConfig, init_variables, predict_fn
from jaxopt_serve.quant import QuantRule, QuantSpec, quantize, quantized_artifact
from jaxopt_serve.quant.runtime import SMOOTH_COLLECTION, quantized_predict_fn
from jaxopt_serve.quant.smooth import smooth_quantize

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
