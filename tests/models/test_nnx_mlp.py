import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_serve.models import MLPConfig, NNXMLPConfig, init_variables, nnx_module, nnx_variables, predict_fn

CONFIG = NNXMLPConfig(features=(16, 8), num_classes=3)


def test_variables_are_a_plain_dict_with_linen_style_paths():
    variables = init_variables(CONFIG, 0)
    assert set(variables) == {"params"}
    params = variables["params"]
    assert set(params) == {"dense_0", "dense_1", "classifier"}
    assert params["dense_0"]["kernel"].shape == (64, 16)
    linen = init_variables(MLPConfig(features=(16, 8), num_classes=3), 0)
    assert jax.tree.map(jnp.shape, linen["params"]) == jax.tree.map(jnp.shape, params)


def test_state_round_trips_to_an_equal_module():
    model = CONFIG.build(rngs=nnx.Rngs(3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
    variables = nnx_variables(model)
    rebuilt = nnx_module(CONFIG, variables)
    np.testing.assert_array_equal(rebuilt(x), model(x))
    np.testing.assert_array_equal(predict_fn(CONFIG)(variables, x), model(x))


def test_changed_variables_change_the_module():
    model = CONFIG.build(rngs=nnx.Rngs(3))
    variables = nnx_variables(model)
    zeroed = jax.tree.map(jnp.zeros_like, variables)
    x = jnp.ones((2, 8, 8, 1))
    np.testing.assert_array_equal(nnx_module(CONFIG, zeroed)(x), jnp.zeros((2, 3)))
