"""auto mode's measured choice (quant.measure): the faster form wins, once per shape, and the runtime runs it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_serve import native
from jaxopt_serve.model import Model
from jaxopt_serve.quant import QuantRule, QuantSpec, measure, quantize
from jaxopt_serve.quant.runtime import execution_report, quantized_predict_fn, serving_layout

# 64 rows x 256 x 256 = 2**22 multiply-adds: just large enough to be measured; 256 x 256 kernels are large
# enough for the rule's int8 product too.
ROWS, WIDTH = 64, 256
needs_native = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not native.available(), reason="measuring applies on CPU with native kernels"
)


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.delenv(measure.MEASURE_ENV, raising=False)
    measure.clear()
    yield
    measure.clear()


@pytest.fixture(scope="module")
def two_layer():
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(WIDTH, WIDTH)).astype(np.float32) / 16,
        "w2": rng.normal(size=(WIDTH, 8)).astype(np.float32) / 16,  # small: keeps the rule
    }

    def f(p, x):
        return jax.nn.relu(x @ p["w1"]) @ p["w2"]

    x = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    model = Model.function(f, params, x)
    q = serving_layout(quantize(model.variables, [QuantRule("params/w.*", QuantSpec())]).variables)
    return model, q, x


@pytest.fixture(scope="module")
def first_only(two_layer):
    """The same model with only w1 quantized (so "dynamic" and a measured int8 w1 run the same program)."""
    model, _, x = two_layer
    rules = [QuantRule("params/w1", QuantSpec()), QuantRule("params/w2", None)]
    return serving_layout(quantize(model.variables, rules).variables)


def _fake_times(monkeypatch, int8_ms, float_ms):
    """Make every measurement report these medians (the compiled forms still run once each)."""
    seen = []

    def fake(calls):
        seen.append(sorted(calls))
        for call in calls.values():
            jax.block_until_ready(call())
        return {"dynamic": int8_ms, "weight_only": float_ms}

    monkeypatch.setattr(measure, "_median_ms", fake)
    return seen


def test_choose_keeps_the_faster_form_and_measures_each_key_once():
    built = []

    def build(mode):
        built.append(mode)
        if mode == "dynamic":
            return lambda x: x + 1.0
        return lambda x: jax.lax.fori_loop(0, 200, lambda i, a: jnp.tanh(a @ a) / 64, x)  # far slower

    x = np.ones((128, 128), np.float32)
    choice = measure.choose(("k", 1), "params/layer", build, (x,))
    assert choice.mode == "dynamic" and choice.int8_ms < choice.float_ms
    assert choice.layer == "params/layer" and choice.shape == (128, 128)
    assert measure.choose(("k", 1), "other", build, (x,)) is choice  # stored: not measured again
    assert sorted(built) == ["dynamic", "weight_only"]
    assert measure.measured() == [choice]


@needs_native
def test_auto_runs_the_measured_faster_form(two_layer, first_only, monkeypatch):
    model, q, x = two_layer
    seen = _fake_times(monkeypatch, int8_ms=5.0, float_ms=1.0)  # the float form "wins"
    assert execution_report(model, q, x, mode="auto") == {
        "params/w1": [("dot_general", "dequantized")],
        "params/w2": [("dot_general", "dequantized")],  # 256 x 8: under the rule's size, never measured
    }
    assert seen == [["dynamic", "weight_only"]]
    (choice,) = measure.measured()
    assert (choice.layer, choice.shape, choice.mode) == ("params/w1", (ROWS, WIDTH), "weight_only")
    out = jax.jit(quantized_predict_fn(model, mode="auto"))(q, x)
    weight_only = jax.jit(quantized_predict_fn(model, mode="weight_only"))(q, x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(weight_only))
    assert len(seen) == 1  # the jit trace reused the stored choice

    measure.clear()
    _fake_times(monkeypatch, int8_ms=1.0, float_ms=5.0)
    assert execution_report(model, first_only, x, mode="auto")["params/w1"] == [("dot_general", "int8")]
    out = jax.jit(quantized_predict_fn(model, mode="auto"))(first_only, x)
    dynamic = jax.jit(quantized_predict_fn(model, mode="dynamic"))(first_only, x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dynamic))


@needs_native
def test_small_layers_explicit_modes_and_rules_setting_keep_the_rule(two_layer, monkeypatch):
    model, q, x = two_layer
    seen = _fake_times(monkeypatch, int8_ms=5.0, float_ms=1.0)
    # Half the rows: under MIN_MACS, so the rule (int8 for a 256 x 256 kernel) without measuring.
    assert execution_report(model, q, x[: ROWS // 2], mode="auto")["params/w1"] == [("dot_general", "int8")]
    monkeypatch.setenv(measure.MEASURE_ENV, "rules")
    assert execution_report(model, q, x, mode="auto")["params/w1"] == [("dot_general", "int8")]
    assert seen == [] and measure.measured() == []
    # The explicit modes never measure.
    monkeypatch.delenv(measure.MEASURE_ENV)
    assert execution_report(model, q, x, mode="dynamic")["params/w1"] == [("dot_general", "int8")]
    assert seen == []


def test_a_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(measure.MEASURE_ENV, "fastest")
    with pytest.raises(ValueError, match="JAXOPT_SERVE_AUTO must be 'measure' or 'rules', got 'fastest'"):
        measure.enabled()


@needs_native
def test_a_convolution_is_measured_per_batch_size(monkeypatch):
    from jaxopt_serve.models import CNNConfig, init_variables, predict_fn

    seen = _fake_times(monkeypatch, int8_ms=1.0, float_ms=5.0)
    # The first convolution (3 x 3 x 3 x 32: the rule keeps it float) at 64 x 64 pixels, batch 32 and 64.
    cnn = CNNConfig(in_channels=3, example_size=64, channels=(32,), hidden=8)
    variables = init_variables(cnn, 0, (64, 64, 3))
    q = serving_layout(quantize(variables, [QuantRule("params/conv_0/kernel", QuantSpec())]).variables)
    model = Model.from_config(cnn, variables)
    for batch in (32, 64):
        x = np.random.default_rng(batch).uniform(size=(batch, 64, 64, 3)).astype(np.float32)
        assert execution_report(model, q, x, mode="auto")["params/conv_0/kernel"] == [("conv_general_dilated", "int8")]
    assert [c.shape for c in measure.measured()] == [(32, 64, 64, 3), (64, 64, 64, 3)]
    assert len(seen) == 2
    out = jax.jit(quantized_predict_fn(model, mode="auto"))(q, x)
    ref = predict_fn(cnn)(variables, x)
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())


@needs_native
def test_a_kernel_reshaped_before_its_convolution_is_counted_as_the_convolution_sees_it(monkeypatch):
    seen = _fake_times(monkeypatch, int8_ms=1.0, float_ms=5.0)
    rng = np.random.default_rng(0)
    params = {"k": rng.normal(size=(27, 32)).astype(np.float32) / 8}  # stored 2-D, used as a 3x3x3x32 kernel

    def f(p, x):
        kernel = p["k"].reshape(3, 3, 3, 32)
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x = rng.uniform(size=(8, 64, 64, 3)).astype(np.float32)  # 8 x 64 x 64 x 32 outputs x 27 = 28M multiply-adds
    model = Model.function(f, params, x)
    q = quantize(model.variables, [QuantRule("params/k", QuantSpec())]).variables
    assert execution_report(model, q, x, mode="auto") == {"params/k": [("conv_general_dilated", "int8")]}
    assert [c.shape for c in measure.measured()] == [(8, 64, 64, 3)] and len(seen) == 1
    out = jax.jit(quantized_predict_fn(model, mode="auto"))(q, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(f(params, x)), atol=0.05 * float(np.abs(f(params, x)).max()))
