import jax
import numpy as np
import pytest

from jaxopt_serve.models import MLPConfig, init_variables
from jaxopt_serve.quant import QuantRule, QuantSpec, quantize
from jaxopt_serve.quant.gptq import gptq_quantize
from jaxopt_serve.quant.runtime import observe_inputs

CONFIG = MLPConfig(features=(64,), num_classes=8, input_shape=(32,))
INT4 = QuantSpec(qtype="int4", granularity="group", group_size=16, symmetric=False)


@pytest.fixture(scope="module")
def correlated_case():
    """Inputs with strongly correlated features: where error feedback has something to use."""
    variables = jax.tree.map(np.asarray, init_variables(CONFIG, 0))
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(32, 32)) * np.linspace(3.0, 0.1, 32)[:, None]
    x = (rng.normal(size=(512, 32)) @ mixing).astype(np.float32)
    return variables, x


def _layer_error(variables, qvariables, x, layer="dense_0"):
    """Mean squared change of the layer's output x W on held-out inputs."""
    w = variables["params"][layer]["kernel"]
    q = np.asarray(qvariables["params"][layer]["kernel"].dequantize())
    return float(np.mean((x @ w - x @ q) ** 2))


@pytest.mark.parametrize(
    "spec",
    [INT4, QuantSpec(qtype="int4", granularity="group", group_size=8), QuantSpec(qtype="int8", granularity="channel")],
    ids=["int4-g16-asym", "int4-g8-sym", "int8"],
)
def test_gptq_lowers_the_layer_output_error_of_round_to_nearest(correlated_case, spec):
    variables, x = correlated_case
    rules = [QuantRule(r"params/dense_0/kernel", spec)]
    rtn = quantize(variables, rules).variables
    gptq = gptq_quantize(CONFIG, variables, x[:256], rules)
    assert _layer_error(variables, gptq, x[256:]) < 0.8 * _layer_error(variables, rtn, x[256:])


def test_gptq_result_is_the_rules_qarray(correlated_case):
    """Same spec, layout and size as round-to-nearest, so serving and artifacts do not change."""
    variables, x = correlated_case
    rules = [QuantRule(r"params/.*/kernel", INT4)]
    rtn = quantize(variables, rules).variables
    gptq = gptq_quantize(CONFIG, variables, x[:128], rules)
    for layer in ("dense_0", "classifier"):
        a, b = rtn["params"][layer]["kernel"], gptq["params"][layer]["kernel"]
        assert (a.qtype, a.shape, a.granularity, a.axis, a.group_size, a.nbytes) == (
            b.qtype,
            b.shape,
            b.granularity,
            b.axis,
            b.group_size,
            b.nbytes,
        )
        assert b.scale.shape == a.scale.shape and b.zero_point.shape == a.zero_point.shape
        q = np.asarray(b.int_values())
        assert q.min() >= -8 and q.max() <= 7
    np.testing.assert_array_equal(gptq["params"]["dense_0"]["bias"], variables["params"]["dense_0"]["bias"])
    assert set(observe_inputs(CONFIG, gptq, x[:4])) == {"dense_0", "classifier"}


def test_ternary_rules_keep_round_to_nearest(correlated_case):
    variables, x = correlated_case
    rules = [QuantRule(r"params/.*/kernel", QuantSpec(qtype="ternary"))]
    gptq = gptq_quantize(CONFIG, variables, x[:64], rules)
    rtn = quantize(variables, rules).variables
    np.testing.assert_array_equal(gptq["params"]["dense_0"]["kernel"].values, rtn["params"]["dense_0"]["kernel"].values)


def test_damp_must_be_positive(correlated_case):
    variables, x = correlated_case
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(CONFIG, variables, x[:8], [QuantRule(r".*kernel", INT4)], damp=0.0)


def test_gptq_corrects_a_dense_general_kernel_with_channel_scales_on_its_last_axis():
    """An attention projection (in, heads, head_dim) quantized per channel keeps one scale per head_dim index;
    GPTQ rounds it against those scales."""
    from jaxopt_serve.model import Model

    rng = np.random.default_rng(4)
    params = {"w": rng.normal(size=(32, 4, 8)).astype(np.float32)}
    mixing = rng.normal(size=(32, 32)) * np.linspace(3.0, 0.1, 32)[:, None]
    x = (rng.normal(size=(384, 32)) @ mixing).astype(np.float32)
    model = Model.function(lambda p, x: jax.numpy.einsum("bi,ihd->bhd", x, p["w"]), params, x[:2])
    rules = [QuantRule(r"params/w", QuantSpec(qtype="int8"))]
    rtn = quantize(model.variables, rules).variables["params"]["w"]
    gptq = gptq_quantize(model, model.variables, x[:256], rules)["params"]["w"]
    assert rtn.scale.shape == (1, 1, 8)
    np.testing.assert_array_equal(gptq.scale, rtn.scale)
    w = params["w"].reshape(32, -1)

    def error(q):
        return float(np.mean((x[256:] @ w - x[256:] @ np.asarray(q.dequantize()).reshape(32, -1)) ** 2))

    assert error(gptq) < 0.8 * error(rtn)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_gptq_with_an_uncorrelated_hessian_is_round_to_nearest(symmetric):
    """With a diagonal Hessian no error has anywhere to go: GPTQ must give round-to-nearest's codes,
    zero points included, on a (in, heads, head_dim) kernel."""
    from jaxopt_serve.quant.gptq import gptq_kernel
    from jaxopt_serve.quant.qarray import quantize_array

    w = np.random.default_rng(5).normal(size=(16, 4, 3)).astype(np.float32)
    spec = QuantSpec(qtype="int8", symmetric=symmetric)
    rtn = quantize_array(w, spec)
    q = gptq_kernel(w, np.diag(np.linspace(1.0, 2.0, 16)), spec, rtn)
    np.testing.assert_array_equal(q.values, rtn.values)
    assert (q.zero_point is None) == symmetric


def test_smoothed_gptq_on_a_kernel_contracted_over_two_axes():
    """smooth_quantize(rounding="gptq") equals gptq_quantize on the same smoothed float kernels (the Hessian of
    x / s over both contracted axes, divided once), and improves on round-to-nearest."""
    from jaxopt_serve.model import Model
    from jaxopt_serve.quant import smooth_quantize
    from jaxopt_serve.quant.runtime import SMOOTH_COLLECTION

    rng = np.random.default_rng(6)
    params = {"w": rng.normal(size=(4, 8, 6)).astype(np.float32)}
    x = (rng.normal(size=(256, 32)) @ (rng.normal(size=(32, 32)) * np.linspace(3.0, 0.1, 32)[:, None])).reshape(
        256, 4, 8
    )
    x = x.astype(np.float32)
    x[:, 1, 2] *= 30.0

    def apply(p, x):
        return jax.lax.dot_general(x, p["w"], (((1, 2), (0, 1)), ((), ())))

    model = Model.function(apply, params, x[:2])
    rules = [QuantRule(r"params/w", QuantSpec(qtype="int8", symmetric=False))]
    gptq = smooth_quantize(model, model.variables, x[:192], rules, alpha=0.5, rounding="gptq")
    nearest = smooth_quantize(model, model.variables, x[:192], rules, alpha=0.5)
    s = gptq[SMOOTH_COLLECTION]["w"]
    assert s.shape == (4, 8)
    smoothed = {"params": {"w": params["w"] * s[..., None]}, SMOOTH_COLLECTION: {"w": s}}
    direct = gptq_quantize(model, smoothed, x[:192], rules)
    np.testing.assert_array_equal(gptq["params"]["w"].values, direct["params"]["w"].values)
    flat = x[192:].reshape(64, -1)

    def error(q):
        w = np.asarray(q.dequantize()) / s[..., None]
        return float(np.mean((flat @ params["w"].reshape(32, -1) - flat @ w.reshape(32, -1)) ** 2))

    assert error(gptq["params"]["w"]) < 0.8 * error(nearest["params"]["w"])
    with pytest.raises(ValueError, match="already hold 'quant_smooth'"):
        smooth_quantize(model, smoothed, x[:8], rules)
