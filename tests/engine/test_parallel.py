import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import random_variables
from jaxopt_serve.engine import InferenceEngine, ShardingRule, make_mesh, model_parallel_rules, pmap_predict_fn
from jaxopt_serve.models import CNNConfig, MLPConfig, TransformerConfig
from jaxopt_serve.quant import QuantRule, QuantSpec, quantize

CNN = CNNConfig(channels=(8, 16), hidden=16)
ENCODER = TransformerConfig(
    vocab_size=30, max_len=16, seq_len=12, hidden_size=16, num_heads=4, mlp_dim=16, num_classes=4
)
MLP = MLPConfig(features=(32, 16))


def _case(name):
    if name == "cnn":
        return (
            CNN,
            jax.tree.map(np.asarray, random_variables(CNN, seed=4)),
            np.random.default_rng(0).normal(size=(12, 8, 8, 1)).astype(np.float32),
        )
    if name == "encoder":
        v = random_variables(ENCODER, seed=5)
        v = jax.tree.map(lambda a: np.asarray(a) * 0.3, v)  # keep softmax and LayerNorm well conditioned
        return ENCODER, v, np.random.default_rng(1).integers(0, 30, size=(12, 12)).astype(np.int32)
    v = jax.tree.map(np.asarray, random_variables(MLP, seed=6))
    q = quantize(v, [QuantRule(r"params/.*/kernel", QuantSpec(qtype="int8"))]).variables
    return MLP, q, np.random.default_rng(2).normal(size=(12, 8, 8, 1)).astype(np.float32)


LAYOUTS = {
    "data parallel": dict(data=8, model=1),
    "model parallel": dict(data=1, model=4),
    "2-D": dict(data=2, model=4),
}


@pytest.fixture(scope="module", params=["cnn", "encoder", "int8 mlp"])
def case(request):
    config, variables, x = _case(request.param)
    reference = InferenceEngine(config, variables, max_batch=16)(x)
    return config, variables, x, reference


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_outputs_equal_single_device_outputs(case, layout):
    config, variables, x, reference = case
    shape = LAYOUTS[layout]
    rules = model_parallel_rules(config) if shape["model"] > 1 else ()
    engine = InferenceEngine(config, variables, max_batch=16, mesh=make_mesh(**shape), rules=rules)
    np.testing.assert_allclose(engine(x), reference, rtol=1e-4, atol=1e-5)
    if rules:  # the variables really are split
        specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(engine.variables)}
        assert any("model" in s for s in specs)


def test_pmap_outputs_equal_single_device_outputs(case):
    config, variables, x, reference = case
    np.testing.assert_allclose(pmap_predict_fn(config)(variables, x), reference, rtol=1e-4, atol=1e-5)


def test_quantized_kernels_shard_their_values_and_scales():
    config, q, x = _case("int8 mlp")
    engine = InferenceEngine(
        config, q, max_batch=16, mesh=make_mesh(data=2, model=4), rules=model_parallel_rules(config)
    )
    kernel = engine.variables["params"]["dense_0"]["kernel"]
    assert kernel.values.sharding.spec == P(None, "model")
    assert kernel.scale.sharding.spec == P(None, "model")
    assert engine.variables["params"]["dense_1"]["kernel"].values.sharding.spec == P("model", None)


def test_mesh_that_does_not_divide_the_devices_is_an_error():
    with pytest.raises(ValueError, match="a 3 x 1 mesh needs a device count divisible by 3; there are 8 devices"):
        make_mesh(data=3)


def test_rule_that_does_not_divide_a_dimension_names_the_path():
    rules = [ShardingRule(r"params/classifier/kernel", (None, "model"))]
    with pytest.raises(
        ValueError,
        match=r"params/classifier/kernel: dimension 1 \(size 10\) of shape \(16, 10\) "
        r"is not divisible by mesh axis 'model' of size 4",
    ):
        InferenceEngine(CNN, random_variables(CNN), mesh=make_mesh(data=2, model=4), rules=rules)


def test_pmap_path_takes_any_model_with_pytree_inputs_and_outputs():
    import jax.numpy as jnp

    from jaxopt_serve.model import Model
    from jaxopt_serve.quant import model_rules, quantize, quantized_predict_fn

    def f(params, inputs):
        return {"y": inputs["x"] @ params["w"], "label": jnp.argmax(inputs["x"], -1)}

    rng = np.random.default_rng(0)
    x = {"x": rng.normal(size=(11, 16)).astype(np.float32)}
    model = Model.function(f, {"w": rng.normal(size=(16, 8)).astype(np.float32)}, x)
    q = quantize(model.variables, model_rules(model)).variables
    out = pmap_predict_fn(model, quant_mode="dynamic")(q, x)  # 11 rows over 8 devices: padded, then cut back
    ref = quantized_predict_fn(model, mode="dynamic")(q, x)
    assert out["label"].dtype == np.int32 and out["y"].shape == (11, 8)
    np.testing.assert_array_equal(out["label"], ref["label"])
    np.testing.assert_allclose(out["y"], ref["y"], rtol=1e-6, atol=1e-6)
