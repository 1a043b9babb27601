import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_serve.models import MLPConfig, init_variables, make_apply
from jaxopt_serve.prune import (
    add_group_lasso,
    add_l1,
    add_l2,
    group_lasso_penalty,
    group_norms,
    l1_penalty,
    l2_penalty,
    model_groups,
    regularized,
)
from jaxopt_serve.train import classification_loss, fit


def test_penalties_on_a_hand_made_tree():
    params = {"d": {"kernel": jnp.array([[1.0, -2.0], [0.0, 3.0]]), "bias": jnp.array([10.0, 10.0])}}
    assert float(l1_penalty(params)) == 6.0  # biases are not selected by default
    assert float(l2_penalty(params)) == 7.0  # (1 + 4 + 9) / 2
    assert float(l1_penalty(params, pattern=r"params/d/bias")) == 20.0


def test_group_lasso_sums_scaled_unit_norms():
    config = MLPConfig(features=(3,), num_classes=2, input_shape=(2,))
    params = jax.tree.map(jnp.ones_like, init_variables(config, 0)["params"])
    groups = model_groups(config)
    # unit i of dense_0: kernel column (2), bias (1), classifier row (2): 5 ones, norm sqrt(5), scaled by sqrt(5)
    assert float(group_lasso_penalty(params, groups)) == pytest.approx(3 * 5.0, rel=1e-5)
    np.testing.assert_allclose(group_norms(params, groups)["dense_0"], np.sqrt(5.0) * np.ones(3), rtol=1e-5)


@pytest.mark.parametrize("transform, penalty", [(add_l1, l1_penalty), (add_l2, l2_penalty)])
def test_transforms_add_the_penalty_gradient(transform, penalty):
    params = {"d": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]])}}
    updates = {"d": {"kernel": jnp.zeros((2, 2))}}
    out, _ = transform(0.1).update(updates, transform(0.1).init(params), params)
    expected = jax.tree.map(lambda g: 0.1 * g, jax.grad(penalty)(params))
    np.testing.assert_allclose(out["d"]["kernel"], expected["d"]["kernel"], rtol=1e-6)


def test_group_lasso_drives_half_the_hidden_neurons_to_zero(digits):
    """Budget: 400 Adam steps at lr 3e-3, strength 3e-3, on the digits MLP (64-wide hidden layers)."""
    config = MLPConfig(features=(64, 64))
    variables = init_variables(config, 0)
    groups = model_groups(config)
    loss = classification_loss(make_apply(config))
    optimizer = optax.chain(add_group_lasso(3e-3, groups), optax.adam(3e-3))
    result = fit(
        loss, variables, (digits.x_train, digits.y_train), optimizer=optimizer, steps=400, batch_size=64, progress=False
    )
    before = group_norms(variables["params"], groups)
    after = group_norms(result.variables["params"], groups)
    for name in before:
        near_zero = np.asarray(after[name]) < 0.05 * float(np.median(before[name]))
        assert near_zero.mean() >= 0.5, f"{name}: only {near_zero.sum()} of {near_zero.size} groups near zero"
    plain = fit(
        loss,
        variables,
        (digits.x_train, digits.y_train),
        optimizer=optax.adam(3e-3),
        steps=400,
        batch_size=64,
        progress=False,
    )
    plain_norms = group_norms(plain.variables["params"], groups)
    assert (np.asarray(plain_norms["dense_0"]) < 0.05 * float(np.median(before["dense_0"]))).mean() < 0.1


def test_regularized_loss_reports_the_penalty():
    config = MLPConfig(features=(4,), num_classes=2, input_shape=(3,))
    variables = init_variables(config, 0)
    loss_fn = regularized(classification_loss(make_apply(config)), l2_penalty, 0.5)
    batch = (jnp.ones((2, 3)), jnp.array([0, 1]))
    total, (_, metrics) = loss_fn(variables["params"], {}, batch, jax.random.key(0))
    assert float(total) == pytest.approx(float(metrics["loss"] + 0.5 * metrics["penalty"]), rel=1e-6)
    assert float(metrics["penalty"]) == pytest.approx(float(l2_penalty(variables["params"])), rel=1e-6)
    with pytest.raises(ValueError, match="strength must be >= 0"):
        regularized(loss_fn, l2_penalty, -1.0)
