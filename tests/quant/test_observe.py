"""Calibration over many batches, on a model the package does not define (a plain function)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_serve.model import Model
from jaxopt_serve.quant import QuantRule, QuantSpec, calibrate, gptq_quantize, quantize, smooth_quantize
from jaxopt_serve.quant.observe import calibration_batches
from jaxopt_serve.quant.runtime import SMOOTH_COLLECTION, observe_inputs, quantized_predict_fn


def mlp(params, inputs):
    h = jax.nn.gelu(inputs["x"] @ params["w1"] + params["b1"])
    return jnp.einsum("bi,io->bo", h * inputs["gate"], params["w2"])


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(32, 64)).astype(np.float32) / 6,
        "b1": np.zeros(64, np.float32),
        "w2": rng.normal(size=(64, 8)).astype(np.float32) / 8,
    }
    x = {"x": rng.normal(size=(96, 32)).astype(np.float32), "gate": rng.uniform(size=(96, 1)).astype(np.float32)}
    x["x"][:, 5] *= 40.0  # an outlier channel for SmoothQuant
    model = Model.function(mlp, params, jax.tree.map(lambda a: a[:2], x))
    return model, x


def _split(x, sizes):
    out, start = [], 0
    for n in sizes:
        out.append(jax.tree.map(lambda a, s=start, n=n: a[s : s + n], x))
        start += n
    return out


def test_batches_of_a_dataset_and_of_a_stream(case):
    model, x = case
    chunks = list(calibration_batches(model, x, 40))
    assert [len(c[0]["x"]) for c in chunks] == [40, 40, 16]
    stream = list(calibration_batches(model, iter(_split(x, [50, 46])), 999))
    assert [len(c[0]["x"]) for c in stream] == [50, 46]


def test_gptq_hessian_accumulates_over_batches(case):
    """H = sum of X^T X over batches: a stream of batches gives the same kernels as one batch holding them all."""
    model, x = case
    rules = [QuantRule(r"params/w.", QuantSpec(qtype="int4", granularity="group", group_size=16))]
    whole = gptq_quantize(model, model.variables, [x], rules)
    streamed = gptq_quantize(model, model.variables, iter(_split(x, [30, 30, 36])), rules)
    rtn = quantize(model.variables, rules).variables
    for name in ("w1", "w2"):
        np.testing.assert_array_equal(whole["params"][name].values, streamed["params"][name].values)
        assert not np.array_equal(whole["params"][name].values, rtn["params"][name].values), "GPTQ changed nothing"


def test_calibrate_and_smooth_see_every_batch(case):
    model, x = case
    rules = [QuantRule(r"params/w.")]
    q = quantize(model.variables, rules).variables
    whole = calibrate(model, q, x, method="absmax", batch_size=96)["quant_act"]
    streamed = calibrate(model, q, _split(x, [10, 86]), method="absmax")["quant_act"]
    first_only = calibrate(model, q, _split(x, [10]), method="absmax")["quant_act"]
    assert sorted(whole) == ["w1", "w2"]
    for key in whole:
        assert float(whole[key]) == pytest.approx(float(streamed[key]), rel=1e-6)
    assert any(float(first_only[k]) < float(whole[k]) for k in whole), "the later batch holds larger activations"
    smooth_whole = smooth_quantize(model, model.variables, [x], rules)[SMOOTH_COLLECTION]
    smooth_streamed = smooth_quantize(model, model.variables, _split(x, [48, 48]), rules)[SMOOTH_COLLECTION]
    for key in ("w1", "w2"):
        np.testing.assert_allclose(smooth_whole[key], smooth_streamed[key], rtol=1e-6)


def test_method_and_kwargs_belong_to_the_model(case):
    model, x = case
    with pytest.raises(ValueError, match="build the Model with them"):
        calibrate(model, quantize(model.variables, [QuantRule("params/w1")]).variables, x, call_method="encode")


def test_smoothed_layers_are_observed_and_calibrated_as_they_are_served(case):
    """A smoothed layer divides its input by its factors in calibration too, so later layers see the served
    activations (it once skipped the division there: static scales off by 20x and more)."""
    model, x = case
    rules = [QuantRule(r"params/w.")]
    plain = quantize(model.variables, rules).variables
    smoothed = smooth_quantize(model, model.variables, [x], rules, alpha=0.5)
    s = smoothed[SMOOTH_COLLECTION]
    seen, seen_plain = observe_inputs(model, smoothed, x), observe_inputs(model, plain, x)
    np.testing.assert_allclose(seen["w1"], seen_plain["w1"] / s["w1"], rtol=1e-6)
    later = np.asarray(seen["w2"]) * s["w2"]  # the second layer's input, back in the float model's units
    assert np.abs(later - seen_plain["w2"]).mean() < 0.05 * np.abs(seen_plain["w2"]).mean()
    ref = model(model.variables, x)
    static = jax.jit(quantized_predict_fn(model, mode="static"))
    err_smooth = np.abs(static(calibrate(model, smoothed, x, method="absmax"), x) - ref).mean()
    err_plain = np.abs(static(calibrate(model, plain, x, method="absmax"), x) - ref).mean()
    assert err_smooth < err_plain, (err_smooth, err_plain)
