"""Output shapes at several input and batch sizes, and jit vs eager agreement, for every reference model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_serve.models import (
    CNNConfig,
    MLPConfig,
    NNXMLPConfig,
    TransformerConfig,
    init_variables,
    make_apply,
    predict_fn,
)

# (config, per-example input shapes to try); every model gets two or more sizes.
CASES = {
    "mlp": (MLPConfig(features=(16, 8), num_classes=5, input_shape=(6, 6, 1)), [(6, 6, 1), (36,)]),
    "cnn": (CNNConfig(channels=(4, 8), hidden=8, num_classes=7), [(8, 8, 1), (13, 21, 1), (1, 1, 1)]),
    "transformer": (
        TransformerConfig(vocab_size=40, max_len=32, hidden_size=16, num_heads=2, mlp_dim=24, num_classes=3),
        [(5,), (32,)],
    ),
    "nnx_mlp": (NNXMLPConfig(features=(12,), num_classes=4, input_shape=(2, 3)), [(2, 3), (6,)]),
}


def _inputs(config, batch, shape, seed=0):
    rng = np.random.default_rng(seed)
    if config.input_dtype == "int32":
        return jnp.asarray(rng.integers(0, config.vocab_size, size=(batch, *shape)), jnp.int32)
    return jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    config, shapes = CASES[request.param]
    return config, shapes, init_variables(config, 0)


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(case, batch):
    config, shapes, variables = case
    predict = predict_fn(config)
    for shape in shapes:
        out = predict(variables, _inputs(config, batch, shape))
        assert out.shape == (batch, config.num_classes)
        assert out.dtype == jnp.float32
        assert bool(jnp.isfinite(out).all())


def test_jit_matches_eager(case):
    config, shapes, variables = case
    predict = predict_fn(config)
    x = _inputs(config, 4, shapes[0], seed=1)
    # Same program, so only float reassociation differences are allowed.
    np.testing.assert_allclose(jax.jit(predict)(variables, x), predict(variables, x), rtol=1e-5, atol=1e-5)


def test_different_inputs_give_different_outputs(case):
    """Guards against a model that ignores its input (e.g. a broken mask or pooling)."""
    config, shapes, variables = case
    predict = predict_fn(config)
    a = predict(variables, _inputs(config, 2, shapes[0], seed=2))
    b = predict(variables, _inputs(config, 2, shapes[0], seed=3))
    assert not np.allclose(a, b)


def test_cnn_runs_on_224x224x3_images():
    config = CNNConfig(channels=(8, 16), hidden=16, in_channels=3, num_classes=1000)
    variables = init_variables(config, 0, (224, 224, 3))
    out = jax.jit(predict_fn(config))(variables, _inputs(config, 2, (224, 224, 3)))
    assert out.shape == (2, 1000)
    assert bool(jnp.isfinite(out).all())


def test_cnn_rejects_wrong_channel_count():
    config = CNNConfig(channels=(4,), hidden=0)
    variables = init_variables(config, 0)
    with pytest.raises(ValueError, match=r"1 channels, got shape \(2, 8, 8, 3\)"):
        predict_fn(config)(variables, jnp.zeros((2, 8, 8, 3)))


def test_cnn_train_mode_updates_batch_stats():
    config = CNNConfig(channels=(4,), hidden=0)
    variables = init_variables(config, 0)
    _, updates = make_apply(config)(variables, _inputs(config, 8, (8, 8, 1)), train=True)
    assert set(updates) == {"batch_stats"}
    before = variables["batch_stats"]["bn_0"]["mean"]
    after = updates["batch_stats"]["bn_0"]["mean"]
    assert after.shape == before.shape and not np.allclose(after, before)
