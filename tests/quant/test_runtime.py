"""Quantized execution: every mode close to float, integer dots really reach the compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_serve import native
from jaxopt_serve.models import CNNConfig, MLPConfig, NNXMLPConfig, TransformerConfig, init_variables, predict_fn
from jaxopt_serve.quant import QuantRule, QuantSpec, quantize
from jaxopt_serve.quant.calibrate import calibrate
from jaxopt_serve.quant.runtime import quantized_dot, quantized_predict_fn

MODELS = {
    "mlp": MLPConfig(features=(64, 32)),
    "cnn": CNNConfig(channels=(8, 16), hidden=16),
    "transformer": TransformerConfig(vocab_size=64, hidden_size=32, num_heads=4, mlp_dim=64),
    "nnx_mlp": NNXMLPConfig(features=(64, 32)),
}


def _inputs(config, batch, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, *config.example_shape())
    if config.input_dtype == "int32":
        return jnp.asarray(rng.integers(0, config.vocab_size, size=shape), jnp.int32)
    return jnp.asarray(rng.uniform(0, 1, size=shape), jnp.float32)


def _cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    config = MODELS[request.param]
    variables = init_variables(config, 0)
    return config, variables, quantize(variables).variables


# int8 per-channel weights with per-row int8 activations: relative error of a
# layer is ~1%; over 3-4 layers of random-init models the logits keep cosine > 0.999.
@pytest.mark.parametrize(("mode", "batch"), [("weight_only", 5), ("dynamic", 5), ("auto", 1)])
def test_modes_are_close_to_float(model, mode, batch):
    config, variables, qvariables = model
    x = _inputs(config, batch)
    ref = predict_fn(config)(variables, x)
    out = jax.jit(quantized_predict_fn(config, mode=mode))(qvariables, x)
    assert out.shape == ref.shape
    assert _cosine(out, ref) > 0.999


def test_static_mode_after_calibration(model):
    config, variables, qvariables = model
    calibrated = calibrate(config, qvariables, np.asarray(_inputs(config, 32, seed=3)), method="absmax")
    x = _inputs(config, 4, seed=4)
    out = jax.jit(quantized_predict_fn(config, mode="static"))(calibrated, x)
    assert _cosine(out, predict_fn(config)(variables, x)) > 0.995


def test_static_mode_without_calibration_is_an_error(model):
    config, _, qvariables = model
    with pytest.raises(ValueError, match="calibrat"):
        quantized_predict_fn(config, mode="static")(qvariables, _inputs(config, 2))


def test_jit_and_eager_agree(model):
    config, _, qvariables = model
    x = _inputs(config, 3, seed=1)
    predict = quantized_predict_fn(config, mode="dynamic")
    np.testing.assert_allclose(jax.jit(predict)(qvariables, x), predict(qvariables, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_dynamic_mode_runs_an_int8_dot_and_weight_only_does_not(name):
    config = MODELS[name]
    qvariables = quantize(init_variables(config, 0)).variables
    x = _inputs(config, 4)
    # Integer convolutions run as windows + one int8 dot (intconv.int8_conv): XLA:CPU's own int8 convolution
    # returns wrong values under some shardings. So both models must show int8 dots, and no int8 convolution.
    # With the native kernels available (the default on x86) every int8 product is one of their FFI calls;
    # forced off, XLA's int8 -> int32 dot.
    op = "dot_general"
    if native.available():
        text = jax.jit(quantized_predict_fn(config, mode="dynamic")).lower(qvariables, x).as_text()
        assert "jxs_" in text and not [line for line in text.splitlines() if "xi8>" in line and "stablehlo.dot" in line]
    with native.use_kernel("xla"):
        dynamic = jax.jit(quantized_predict_fn(config, mode="dynamic")).lower(qvariables, x).as_text()
    assert "jxs_" not in dynamic
    weight_only = jax.jit(quantized_predict_fn(config, mode="weight_only")).lower(qvariables, x).as_text()
    int_ops = [
        line for line in dynamic.splitlines() if f"stablehlo.{op}" in line and "tensor<" in line and "xi8>" in line
    ]
    assert int_ops and all("xi32>" in line.split("->")[-1] for line in int_ops)
    assert not [line for line in dynamic.splitlines() if "stablehlo.convolution" in line and "xi8>" in line]
    assert not [
        line for line in weight_only.splitlines() if f"stablehlo.{op}" in line and "xi8>" in line.split("->")[0]
    ]


def test_int4_group_and_ternary_kernels_run_in_every_mode():
    config = MODELS["mlp"]
    variables = init_variables(config, 0)
    x = _inputs(config, 4)
    ref = predict_fn(config)(variables, x)
    for spec, floor in [
        (QuantSpec(qtype="int4", granularity="group", group_size=16), 0.97),
        (QuantSpec(qtype="int4"), 0.97),
        (QuantSpec(qtype="ternary"), 0.7),
    ]:
        q = quantize(variables, [QuantRule(r"params/(.*/)?kernel", spec)]).variables
        for mode in ("weight_only", "dynamic"):
            assert _cosine(jax.jit(quantized_predict_fn(config, mode=mode))(q, x), ref) > floor, (spec, mode)


def test_asymmetric_kernels_match_their_dequantized_model():
    config = MODELS["mlp"]
    variables = init_variables(config, 0)
    q = quantize(variables, [QuantRule(r"params/(.*/)?kernel", QuantSpec(symmetric=False))]).variables
    x = _inputs(config, 4)
    dense = predict_fn(config)(
        jax.tree.map(
            lambda leaf: leaf.dequantize() if hasattr(leaf, "dequantize") else leaf,
            q,
            is_leaf=lambda leaf: hasattr(leaf, "dequantize"),
        ),
        x,
    )
    out = quantized_predict_fn(config, mode="dynamic")(q, x)
    assert _cosine(out, dense) > 0.999


def test_quantized_embedding_is_a_clear_error():
    config = MODELS["transformer"]
    q = quantize(init_variables(config, 0), [QuantRule(r".*word_embeddings/embedding", QuantSpec())]).variables
    with pytest.raises(ValueError, match="word_embeddings/embedding: this quantized leaf is consumed by `gather`"):
        quantized_predict_fn(config)(q, _inputs(config, 2))


def test_float_variables_run_the_float_model():
    config = MODELS["cnn"]
    variables = init_variables(config, 0)
    x = _inputs(config, 2)
    np.testing.assert_array_equal(quantized_predict_fn(config)(variables, x), predict_fn(config)(variables, x))


def test_quantized_dot_pads_a_single_row_and_checks_shapes():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)
    q = quantize({"params": {"kernel": w}}).variables["params"]["kernel"]
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 16)), jnp.float32)
    np.testing.assert_allclose(quantized_dot(x, q, mode="dynamic"), x @ w, atol=0.1)
    with pytest.raises(ValueError, match=r"does not end with the kernel's input dims \(16,\)"):
        quantized_dot(jnp.ones((2, 15)), q)
    with pytest.raises(ValueError, match="mode must be one of"):
        quantized_dot(x, q, mode="fast")


def test_calibration_with_wrong_shape_names_it():
    config = MODELS["cnn"]
    q = quantize(init_variables(config, 0)).variables
    with pytest.raises(ValueError, match=r"calibration samples of shape \(4, 8, 8, 3\)"):
        calibrate(config, q, np.ones((4, 8, 8, 3), np.float32))


def test_calibration_methods_give_different_scales():
    config = MODELS["mlp"]
    q = quantize(init_variables(config, 0)).variables
    samples = np.array(_inputs(config, 64, seed=5))
    samples[0, 0, 0, 0] = 50.0  # one outlier
    scales = {
        m: float(calibrate(config, q, samples, method=m)["quant_act"]["dense_0"])
        for m in ("absmax", "percentile", "mse")
    }
    assert scales["absmax"] == pytest.approx(50.0 / 127.0)
    assert scales["percentile"] < scales["absmax"]
    assert scales["mse"] <= scales["absmax"]  # one outlier costs more clipped than kept


def test_sharded_and_replicated_quantized_variables_agree():
    config = MODELS["mlp"]
    q = quantize(init_variables(config, 0)).variables
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")), ("x",))
    P, S = jax.sharding.PartitionSpec, jax.sharding.NamedSharding

    def place(path, leaf):
        # shard the output-feature axis of dense_0's int8 values and scales across 8 devices
        name = jax.tree_util.keystr(path)
        if "dense_0" in name and "kernel" in name:
            return jax.device_put(leaf, S(mesh, P(None, "x")))
        return jax.device_put(leaf, S(mesh, P()))

    sharded = jax.tree_util.tree_map_with_path(place, q)
    assert sharded["params"]["dense_0"]["kernel"].values.sharding.spec == P(None, "x")
    replicated = jax.device_put(q, S(mesh, P()))
    x = _inputs(config, 8)
    predict = jax.jit(quantized_predict_fn(config, mode="dynamic"))
    np.testing.assert_allclose(predict(sharded, x), predict(replicated, x), rtol=1e-5, atol=1e-5)


def test_serving_layout_gives_the_same_outputs_and_saves_canonically(tmp_path):
    from jaxopt_serve.artifact import load_artifact, save_artifact
    from jaxopt_serve.quant import quantized_artifact, serving_layout

    config = MODELS["mlp"]
    q = quantize(init_variables(config, 0)).variables
    x = _inputs(config, 4)
    # Packed for the native kernels where they run, (out, in) for XLA's integer dot otherwise.
    for kernel_path in [*native.supported_kernels()[:1], "xla"]:
        with native.use_kernel(kernel_path):
            served = serving_layout(q)
            kernel = served["params"]["dense_0"]["kernel"]
            if kernel_path == "xla":
                assert kernel.transposed and kernel.values.shape == (64, 64) and kernel.shape == (64, 64)
            else:
                assert kernel.packed and kernel.values.shape == (4, 17, 16, 4) and kernel.shape == (64, 64)
            np.testing.assert_array_equal(kernel.int_values(), q["params"]["dense_0"]["kernel"].int_values())
            for mode in ("dynamic", "static", "weight_only"):
                calibrated = calibrate(config, served, x, method="absmax") if mode == "static" else served
                reference = calibrate(config, q, x, method="absmax") if mode == "static" else q
                predict = jax.jit(quantized_predict_fn(config, mode=mode))
                np.testing.assert_allclose(predict(calibrated, x), predict(reference, x), rtol=1e-6, atol=1e-6)
    save_artifact(tmp_path / "q.jxs", quantized_artifact(config, served, config.example_shape()))
    loaded = load_artifact(tmp_path / "q.jxs").variables["params"]["dense_0"]["kernel"]
    assert not loaded.transposed and not loaded.packed
    np.testing.assert_array_equal(loaded.values, q["params"]["dense_0"]["kernel"].values)


def test_kernels_of_more_than_two_axes_are_packed_once_as_the_model_contracts_them():
    """DenseGeneral-style kernels (per-head projections) are packed once as the matrix of the axes every product
    contracts by the rest: outputs bit-identical to packing them inside every call; a kernel contracted two ways,
    or with scales along its contracted axes, stays as it is."""
    from jaxopt_serve.engine import InferenceEngine
    from jaxopt_serve.model import Model
    from jaxopt_serve.quant import leading_contractions, serving_layout

    rng = np.random.default_rng(0)
    shapes = {
        "qkv": (32, 4, 16),
        "out": (4, 16, 32),
        "einsum": (4, 16, 32),
        "tied": (32, 2, 16),
        "grouped": (32, 2, 16),
    }
    params = {name: {"kernel": rng.normal(size=shape).astype(np.float32)} for name, shape in shapes.items()}

    def dot(a, w, contract):  # as flax.linen.DenseGeneral contracts its kernel
        return jax.lax.dot_general(a, w, ((tuple(range(a.ndim - len(contract), a.ndim)), contract), ((), ())))

    def attend(p, x):
        h = dot(x, p["qkv"]["kernel"], (0,))  # (b, 4, 16)
        y = dot(h, p["out"]["kernel"], (0, 1)) + jnp.einsum("bhd,hdo->bo", h, p["einsum"]["kernel"])  # (b, 32)
        a = dot(y, p["tied"]["kernel"], (0,))  # the tied kernel: first on axis 0 ...
        return y + dot(a, p["tied"]["kernel"], (1, 2)) + dot(y, p["grouped"]["kernel"], (0,)).sum(axis=(1, 2))[:, None]

    x = rng.normal(size=(3, 32)).astype(np.float32)
    model = Model.function(attend, params, x)
    rules = [QuantRule("params/grouped/kernel", QuantSpec(granularity="group", group_size=16)), QuantRule(".*kernel")]
    q = quantize(model.variables, rules).variables
    contractions = leading_contractions(model, q, x)
    # einsum lists the contracted axes in another order (1, 0): still the first two
    assert contractions == {
        "params/einsum/kernel": 2,
        "params/grouped/kernel": 1,
        "params/out/kernel": 2,
        "params/qkv/kernel": 1,
    }
    assert all(not leaf.packed for leaf in jax.tree.leaves(serving_layout(q), is_leaf=lambda v: hasattr(v, "packed")))
    predict = jax.jit(quantized_predict_fn(model, mode="dynamic"))
    for kernel_path in native.supported_kernels()[:1]:
        with native.use_kernel(kernel_path):
            served = serving_layout(q, contractions)["params"]
            assert [served[name]["kernel"].packed for name in shapes] == [1, 2, 2, 0, 0]
            for name in shapes:
                np.testing.assert_array_equal(served[name]["kernel"].int_values(), q["params"][name]["kernel"].values)
            np.testing.assert_array_equal(predict({"params": served}, x), predict(q, x))
            engine = InferenceEngine(model, q, max_batch=4, quant_mode="dynamic")
            assert engine.variables["params"]["out"]["kernel"].packed == 2
            np.testing.assert_allclose(engine(x), predict(q, x), rtol=1e-6, atol=1e-6)


def test_convolution_kernels_are_packed_once_when_stored_hwio():
    """Ungrouped 2-D convolutions on HWIO kernels (Flax's) are packed once as their (kh * kw * in, out) matrix,
    strided and dilated ones included; a depthwise one stays as it is; outputs bit-identical in every mode."""
    import flax.linen as nn

    from jaxopt_serve.model import Model
    from jaxopt_serve.quant import leading_contractions, serving_layout

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(16, (3, 3), name="c0")(x))
            x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="c1")(x))
            x = nn.relu(nn.Conv(16, (3, 3), feature_group_count=16, name="dw")(x))
            x = nn.relu(nn.Conv(32, (3, 3), kernel_dilation=2, padding="VALID", name="c2")(x))
            return nn.Dense(10, name="d")(x.mean((1, 2)))

    x = np.random.default_rng(0).normal(size=(3, 12, 12, 3)).astype(np.float32)
    net = Net()
    model = Model.linen(net, net.init(jax.random.PRNGKey(0), x), x)
    q = quantize(model.variables).variables
    contractions = leading_contractions(model, q, x)
    assert contractions == {"params/c0/kernel": 3, "params/c1/kernel": 3, "params/c2/kernel": 3}
    for kernel_path in native.supported_kernels()[:1]:
        with native.use_kernel(kernel_path):
            served = serving_layout(q, contractions)
            assert {k: v["kernel"].packed for k, v in served["params"].items()} == {
                "c0": 3,
                "c1": 3,
                "c2": 3,
                "d": 1,
                "dw": 0,
            }
            for mode in ("dynamic", "static"):
                predict = jax.jit(quantized_predict_fn(model, mode=mode))
                if mode == "static":
                    np.testing.assert_array_equal(
                        predict(calibrate(model, served, x, method="absmax"), x),
                        predict(calibrate(model, q, x, method="absmax"), x),
                    )
                else:
                    np.testing.assert_array_equal(predict(served, x), predict(q, x))


@pytest.mark.parametrize("symmetric_weights", [True, False])
def test_asymmetric_activations_match_the_float_dot_and_beat_symmetric_on_one_signed_rows(symmetric_weights):
    from jaxopt_serve.quant import QuantSpec, quantize_array, quantized_dot

    rng = np.random.default_rng(3)
    w = rng.normal(size=(48, 12)).astype(np.float32)
    x = (np.maximum(rng.normal(size=(16, 48)), 0) + 0.1 * rng.normal(size=(16, 48))).astype(np.float32)
    q = quantize_array(jnp.asarray(w), QuantSpec(symmetric=symmetric_weights))
    exact = x @ np.asarray(q.dequantize())
    asym = np.asarray(quantized_dot(jnp.asarray(x), q, mode="dynamic", act_symmetric=False))
    sym = np.asarray(quantized_dot(jnp.asarray(x), q, mode="dynamic"))
    np.testing.assert_allclose(asym, exact, atol=0.05 * np.abs(exact).max())
    assert np.abs(asym - exact).mean() < 0.75 * np.abs(sym - exact).mean()
    one_row = np.asarray(quantized_dot(jnp.asarray(x[:1]), q, mode="dynamic", act_symmetric=False))
    np.testing.assert_allclose(one_row, asym[:1], rtol=1e-5, atol=1e-5)  # the padded single-row path agrees


def test_seven_bit_asymmetric_marks_run_alike_on_every_path_and_round_trip(tmp_path):
    """bits=7 marks: the native kernels (unsigned codes) and XLA's integer dot give the same outputs; on ReLU
    inputs the grid is as fine as the symmetric one; the marks travel with artifacts; bad marks are named."""
    from jaxopt_serve import load_artifact, quantized_artifact, save_artifact
    from jaxopt_serve.quant.runtime import mark_asymmetric

    cfg = MLPConfig(input_shape=(48,), features=(64, 32), num_classes=5)
    variables = init_variables(cfg, 0)
    q = quantize(variables).variables
    marked = mark_asymmetric(q, ".*", bits=7)
    assert {int(v) for v in marked["quant_asym"].values()} == {7}
    rng = np.random.default_rng(4)
    x = rng.normal(size=(37, 48)).astype(np.float32)
    ref = np.asarray(predict_fn(cfg)(variables, x))
    run = jax.jit(quantized_predict_fn(cfg, mode="dynamic"))
    outs = {}
    for kernel_path in [*native.supported_kernels(), "xla"]:
        with native.use_kernel(kernel_path):
            outs[kernel_path] = np.asarray(jax.jit(quantized_predict_fn(cfg, mode="dynamic"))(marked, x))
    for kernel_path, out in outs.items():
        np.testing.assert_allclose(out, outs["xla"], rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=kernel_path)
    err7 = np.abs(outs["xla"] - ref).mean()
    err8 = np.abs(np.asarray(run(mark_asymmetric(q, ".*"), x)) - ref).mean()
    assert err8 < err7 < 0.05 * np.abs(ref).mean()  # half the steps of the 8-bit grid: coarser, still close
    path = tmp_path / "asym7.jxs"
    save_artifact(path, quantized_artifact(cfg, marked, cfg.input_shape))
    loaded = load_artifact(path).variables
    assert {int(v) for v in loaded["quant_asym"].values()} == {7}
    np.testing.assert_allclose(run(loaded, x), run(marked, x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="bits must be 8 or 7, got 6"):
        mark_asymmetric(q, ".*", bits=6)
    with pytest.raises(ValueError, match=r"quant_asym/dense_0: a mark must be True \(8 bits\) or int8 7"):
        run({**q, "quant_asym": {"dense_0": np.float32(7)}}, x)


def test_asymmetric_marks_reach_nnx_linear_layers():
    from jaxopt_serve.quant.runtime import mark_asymmetric

    cfg = NNXMLPConfig()
    variables = init_variables(cfg, 0)
    q = quantize(variables).variables
    marked = mark_asymmetric(q, ".*")
    assert sorted(marked["quant_asym"]) == sorted(q["params"])
    x = np.maximum(np.random.default_rng(0).normal(size=(8, *cfg.input_shape)), 0).astype(np.float32)
    ref = np.asarray(predict_fn(cfg)(variables, x))
    run = quantized_predict_fn(cfg, mode="dynamic")
    assert np.abs(np.asarray(run(marked, x)) - ref).mean() < 0.9 * np.abs(np.asarray(run(q, x)) - ref).mean()


def _biased_model():
    """A plain-JAX model with Dense-style biases (a vector, a per-head matrix), a residual and a reused product."""
    from jaxopt_serve.model import Model

    def f(params, x):
        h = x @ params["w1"] + params["b1"]  # fusable: one bias per output feature
        heads = jax.lax.dot_general(h, params["w2"], (((1,), (0,)), ((), ()))) + params["b2"]  # (heads, dim)
        g = heads.reshape(x.shape[0], -1) @ params["w3"]
        return g + h, g * 2.0  # a residual (not a bias) and a second use of g: neither is fused

    rng = np.random.default_rng(3)
    params = {
        "w1": rng.normal(size=(24, 32)),
        "b1": rng.normal(size=32),
        "w2": rng.normal(size=(32, 2, 16)) / 5,
        "b2": rng.normal(size=(2, 16)),
        "w3": rng.normal(size=(32, 32)) / 5,
    }
    params = {k: v.astype(np.float32) for k, v in params.items()}
    return Model.function(f, params, np.zeros((1, 24), np.float32), name="biased"), rng


def test_dense_biases_go_into_the_product_and_nothing_else_does(monkeypatch):
    """``y + bias`` after a quantized product is computed in the native epilogue: the bits of the program's add.

    Plain, asymmetric and smoothed layers, on every kernel path; XLA's path (no epilogue) and the native ones
    also agree with each other, smoothing included (both scale by ``1 / s``).
    """
    from jaxopt_serve.quant import mark_asymmetric, runtime, serving_layout
    from jaxopt_serve.quant.smooth import smooth_quantize

    model, rng = _biased_model()
    x = rng.normal(size=(50, 24)).astype(np.float32)
    rules = [QuantRule("params/w.")]
    plain = quantize(model.variables, rules).variables
    variants = {
        "plain": plain,
        "asymmetric": mark_asymmetric(plain, "w[12]"),
        "smoothed": smooth_quantize(model, model.variables, [x], rules, alpha=0.5, asymmetric=".*"),
    }
    real_interpret, real_bias = runtime.interpret, runtime._epilogue_bias
    into_kernel = []

    def counting(*args):
        bias = real_bias(*args)
        into_kernel.append(bias is not None)
        return bias

    monkeypatch.setattr(runtime, "_epilogue_bias", counting)
    ref = model(model.variables, x)
    for name, variables in variants.items():
        outputs = {}
        for kernel_path in [*native.supported_kernels(), "xla"]:
            with native.use_kernel(kernel_path):
                served = serving_layout(variables)
                into_kernel.clear()
                got = jax.jit(quantized_predict_fn(model, mode="dynamic"))(served, x)
                fused = sum(into_kernel)
                monkeypatch.setattr(
                    runtime, "interpret", lambda *a, **k: real_interpret(*a, **{**k, "fuse_bias": False})
                )
                want = jax.jit(quantized_predict_fn(model, mode="dynamic"))(served, x)
                monkeypatch.setattr(runtime, "interpret", real_interpret)
            # b1 and b2 (over the heads' free axes) reach the kernel; the reused product and XLA's path get none
            assert fused == (2 if kernel_path != "xla" else 0), (name, kernel_path, fused)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            outputs[kernel_path] = got
        for kernel_path, got in outputs.items():
            np.testing.assert_allclose(got[0], outputs["xla"][0], rtol=1e-5, atol=1e-5, err_msg=f"{name} {kernel_path}")
        assert _cosine(outputs["xla"][0], ref[0]) > 0.999, name
